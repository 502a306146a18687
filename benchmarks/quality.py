"""Quality at equal size and equal steps: an ablation of the Graph-of-Heads router.

Every model: 2 layers, d_model 64, 8 heads, d_ff 128, pre-LN, trained with the
graphheads trainer (AdamW, warm-up + cosine, load-balance weight 0.01). MoH and every
GoH variant use 2 shared heads plus the top-2 of the 6 routed heads (50% of the heads).
Variants change one thing against the GoH defaults (complete graph with learnable edge
weights, F 16, 2 GCN layers, graph scale starting at 0):

    MHA, MoH, GoH             dense attention, the linear MoH router, the defaults
    GoH alpha=1               the graph branch on from the start (no zero-init)
    GoH F=8, GoH L=1, L=3     node feature width, message-passing depth
    GoH ring/empty/dense      graph kinds (fixed ring, no edges, learnable dense adjacency)
    GoH coact                 a fixed graph from the head co-activation of the trained
                              MoH model of the same seed and task
    GoH carry                 head states carried through depth
    GoH graphconv/lightgcn    other message-passing layers
    GoH v0.1                  the router as released before (``--old-code``: a checkout)

Tasks: byte-level language modelling of English text that ships offline (eval bits per
byte) and multi-query associative recall (8 key-value pairs, 32 symbols; eval token
accuracy). Each run is its own process (one thread; ``--workers`` at a time) and is
appended to ``WORK/runs.jsonl`` when it finishes: an interrupted ablation resumes where
it stopped. The text is frozen in ``WORK/corpus.txt`` at the first run. Prints mean and
standard deviation over seeds, writes all runs as JSON and a plot to ``--out``.

    python benchmarks/quality.py --seeds 0 1 2 --workers 2 --out docs/img
    git worktree add /tmp/v01 bc8daa8   # the router before zero-init, for "GoH v0.1"
    python benchmarks/quality.py --seeds 0 1 2 --old-code /tmp/v01 --out docs/img
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import runlog  # noqa: E402

MODEL = {"d_model": 64, "num_heads": 8, "num_layers": 2, "d_ff": 128, "norm_first": True}
GOH = {"attention": "goh", "num_shared": 2, "top_k": 2, "graph": "complete"}
VARIANTS: dict[str, dict] = {
    "MHA": {"attention": "mha"},
    "MoH": {"attention": "moh", "num_shared": 2, "top_k": 2},
    "GoH": GOH,
    "GoH alpha=1": {**GOH, "graph_scale_init": 1.0},
    "GoH F=8": {**GOH, "graph_feature_dim": 8},
    "GoH L=1": {**GOH, "graph_layers": 1},
    "GoH L=3": {**GOH, "graph_layers": 3},
    "GoH ring": {**GOH, "graph": "ring", "graph_learnable": "fixed"},
    "GoH empty": {**GOH, "graph": "empty", "graph_learnable": "fixed"},
    "GoH dense": {**GOH, "graph_learnable": "dense"},
    "GoH coact": {**GOH, "graph_learnable": "fixed", "_coactivation": True},
    "GoH carry": {**GOH, "carry_head_states": True},
    "GoH graphconv": {**GOH, "graph_conv": "graphconv"},
    "GoH lightgcn": {**GOH, "graph_conv": "lightgcn"},
    "GoH v0.1": {**GOH, "_old_code": True},
}
COMMON = {"eval_every": 10**6, "checkpoint_every": 10**6, "log_every": 10**6}


def bench_config(bench: str, work: pathlib.Path, steps: int) -> tuple[dict, dict]:
    """(data, train) sections of the run config of one benchmark."""
    if bench == "text":
        data = {"text": str(work / "corpus.txt"), "seq_len": 128}
        train = {"batch_size": 16, "warmup_steps": 100, "eval_batches": 8, "eval_batch_size": 32}
    else:
        data = {"tasks": ["mqar"], "length": 8, "num_symbols": 32}
        train = {"batch_size": 32, "warmup_steps": 100, "eval_batches": 8}
    return data, {**COMMON, **train, "steps": steps}


def coactivation(trainer, bench: str) -> list[list[list[float]]]:
    """Per layer (h, h): the fraction of held-out real tokens that use both heads."""
    import torch

    from graphheads.data import ByteTextDataset

    model, data = trainer.model.eval(), trainer.data
    gen = torch.Generator().manual_seed(12345)
    totals: list | None = None
    count = 0
    with torch.no_grad():
        for _ in range(8):
            if isinstance(data, ByteTextDataset):
                batch = data.sample(32, gen, split="val")
            else:
                batch = data.sample(32, gen, task="mqar")
            out = model(batch.inputs, key_padding_mask=batch.padding)
            real = torch.ones_like(batch.inputs, dtype=torch.bool)
            if batch.padding is not None:
                real = ~batch.padding
            active = [r.active_heads[real].float() for r in out.routing]  # (tokens, h) each
            both = [a.T @ a for a in active]
            totals = both if totals is None else [t + m for t, m in zip(totals, both, strict=True)]
            count += int(real.sum())
    assert totals is not None
    return [(m / count).tolist() for m in totals]


def run_one(spec: dict) -> dict:
    """Train one (variant, bench, seed) and return its record (runs in a worker)."""
    import torch

    torch.set_num_threads(1)
    from graphheads.train import RunConfig, Trainer

    variant = {k: v for k, v in VARIANTS[spec["variant"]].items() if not k.startswith("_")}
    data, train = bench_config(spec["bench"], pathlib.Path(spec["work"]), spec["steps"])
    config = RunConfig.from_dict(
        {"model": {**MODEL, **variant}, "data": data, "train": {**train, "seed": spec["seed"]}}
    )
    start = time.perf_counter()
    trainer = Trainer(config, None, progress=False)
    if spec.get("coactivation") is not None:
        from graphheads import GraphRouter, HeadGraph

        routers = [m for m in trainer.model.modules() if isinstance(m, GraphRouter)]
        for router, together in zip(routers, spec["coactivation"], strict=True):
            h = len(together)
            pairs = [(i, j) for i in range(h) for j in range(h) if i != j and together[i][j] > 0]
            router.graph = HeadGraph.from_edges(
                h, pairs, [together[i][j] for i, j in pairs], num_shared=router.num_shared
            )
    final = runlog.completed(trainer.fit()).final_eval
    record = {
        **{k: spec[k] for k in ("variant", "bench", "seed", "steps")},
        "loss": final["loss"],
        "metric": final["bits_per_byte"] if spec["bench"] == "text" else final["accuracy"]["mqar"],
        "seconds": time.perf_counter() - start,
    }
    if spec["variant"] == "MoH":
        record["coactivation"] = coactivation(trainer, spec["bench"])
    return record


def launch(spec: dict, old_code: pathlib.Path | None) -> dict:
    old = VARIANTS[spec["variant"]].get("_old_code")
    if old:
        assert old_code is not None
    return runlog.launch(__file__, spec, str(old_code) if old else None)


def stat(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def report(records: list[dict], out: pathlib.Path, seeds: list[int]) -> None:
    import matplotlib.pyplot as plt

    by: dict = {}
    for r in records:
        by.setdefault((r["variant"], r["bench"]), []).append(r)
    names = [v for v in VARIANTS if any((v, b) in by for b in ("text", "mqar"))]

    def paired(name: str, bench: str) -> str:
        """Mean ± std over seeds of (variant - MoH), the same seed's evaluation batches."""
        moh = {r["seed"]: r["metric"] for r in by.get(("MoH", bench), [])}
        diffs = [
            r["metric"] - moh[r["seed"]] for r in by.get((name, bench), []) if r["seed"] in moh
        ]
        if name == "MoH" or len(diffs) < 2:
            return "-"
        return f"{statistics.mean(diffs):+.3f} ± {statistics.stdev(diffs):.3f}"

    print(
        "| model | text bits/byte | text: minus MoH, paired | MQAR accuracy | MQAR solved "
        "| s per run (text, MQAR) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        text, mqar = by.get((name, "text"), []), by.get((name, "mqar"), [])
        solved = sum(r["metric"] > 0.99 for r in mqar)
        seconds = [
            f"{statistics.mean(r['seconds'] for r in runs):.0f}" if runs else "-"
            for runs in (text, mqar)
        ]
        print(
            f"| {name} | {stat([r['metric'] for r in text]) if text else '-'} "
            f"| {paired(name, 'text')} | {stat([r['metric'] for r in mqar]) if mqar else '-'} "
            f"| {solved}/{len(mqar)} | {', '.join(seconds)} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    kept = [{k: v for k, v in r.items() if k != "coactivation"} for r in records]
    (out / "quality.json").write_text(json.dumps(kept, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    panels = (
        (axes[0], "text", "text bits per byte (lower is better)"),
        (axes[1], "mqar", "MQAR token accuracy (higher is better)"),
    )
    for ax, bench, label in panels:
        shown = [n for n in names if (n, bench) in by]
        values = [[r["metric"] for r in by[(n, bench)]] for n in shown]
        means = [statistics.mean(v) for v in values]
        spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        colors = [
            "#7570b3" if n == "MHA" else "#d95f02" if n == "MoH" else "#1b9e77" for n in shown
        ]
        ax.bar(range(len(shown)), means, yerr=spreads, color=colors, capsize=3)
        ax.set_xticks(range(len(shown)), shown, rotation=45, ha="right", fontsize=8)
        ax.set_title(label)
        if means:
            low = min(m - s for m, s in zip(means, spreads, strict=True))
            high = max(m + s for m, s in zip(means, spreads, strict=True))
            pad = 0.15 * (high - low) + 1e-3
            ax.set_ylim(low - pad, high + pad)
            if "MoH" in shown:
                ax.axhline(means[shown.index("MoH")], color="#d95f02", lw=0.8, ls="--")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"equal size, equal steps, 4 of 8 heads active; mean ± std over seeds {seeds}")
    fig.savefig(out / "quality.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--benches", nargs="+", default=["text", "mqar"], choices=["text", "mqar"])
    parser.add_argument("--text-steps", type=int, default=2000)
    parser.add_argument("--mqar-steps", type=int, default=2000)
    runlog.add_runner_arguments(parser, "runs/quality")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/img"))
    parser.add_argument("--old-code", type=pathlib.Path, help="a checkout for 'GoH v0.1'")
    args = parser.parse_args()
    if runlog.run_worker_or_prepare(args, run_one):
        return
    runlog.frozen_corpus(args.work)
    runs_file = args.work / "runs.jsonl"
    variants = [v for v in args.variants if v != "GoH v0.1" or args.old_code is not None]
    if args.report_only:
        variants = []
    done = {(r["variant"], r["bench"], r["seed"]) for r in runlog.load_records(runs_file)}
    # MoH first: the co-activation variant reads the trained MoH model's co-activation
    order = sorted(variants, key=lambda v: (v != "MoH", v == "GoH coact"))
    todo = [
        {
            "variant": v,
            "bench": b,
            "seed": s,
            "steps": args.text_steps if b == "text" else args.mqar_steps,
            "work": str(args.work),
        }
        for v in order
        for b in args.benches
        for s in args.seeds
        if (v, b, s) not in done
    ]
    start = time.perf_counter()
    pending = [t for t in todo if t["variant"] != "GoH coact"]
    later = [t for t in todo if t["variant"] == "GoH coact"]
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        for batch in (pending, later):
            moh = {
                (r["bench"], r["seed"]): r
                for r in runlog.load_records(runs_file)
                if "coactivation" in r
            }
            for spec in batch:
                if spec["variant"] == "GoH coact":
                    key = (spec["bench"], spec["seed"])
                    if key not in moh:
                        print(f"skip GoH coact {key}: no MoH run to measure", flush=True)
                        continue
                    spec["coactivation"] = moh[key]["coactivation"]
            futures = [
                pool.submit(launch, spec, args.old_code)
                for spec in batch
                if spec["variant"] != "GoH coact" or "coactivation" in spec
            ]
            for future in concurrent.futures.as_completed(futures):
                record = future.result()
                runlog.append_record(runs_file, record)
                print(
                    f"{record['bench']:5s} {record['variant']:14s} seed {record['seed']}: "
                    f"metric {record['metric']:.4f} ({record['seconds']:.0f} s)",
                    flush=True,
                )
    print(f"\n{time.perf_counter() - start:.0f} s in all\n")
    report(runlog.load_records(runs_file), args.out, args.seeds)


if __name__ == "__main__":
    main()

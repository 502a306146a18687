"""Does the head graph matter? A resumable, paired study of the graph-router (issue 33).

Every run is one process (one thread, ``--workers`` at a time) that trains one
(variant, bench, heads, seed) with the graphheads trainer and appends one line to
``WORK/runs.jsonl`` when it finishes: an interrupted study resumes where it stopped.
Runs of the same seed see the same training batches and evaluation samples, so every
comparison is a paired difference, reported as its mean with a 95% t-interval, and with
the smallest effect the study could detect (80% power, paired t-test).

Variants (routed ones: 2 shared heads plus routed heads; graph scale 0 at init except
in "GoH zero-u"):

    MHA                dense attention
    MoH                MoH's linear router
    GoH null           the per-head MLP router: the graph-router on the empty graph
                       (self-loops only: no messages between heads), the null a graph
                       must beat
    GoH complete       the defaults (complete graph, learnable edge weights, 2 GCN layers)
    GoH ring           a fixed ring
    GoH learned        a dense learnable adjacency grown from the ring
    GoH gatv2          token-conditional: GATv2 attention over the complete graph's heads
    GoH carry          head states carried through depth
    GoH L0, GoH no bias, GoH zero-u
                       the early-training diagnosis: the graph branch without message
                       passing; without its learned per-head prior (score_bias frozen at
                       0); its readout at 0 and scale at 1 instead of the scale at 0

With ``--match-params`` the feed-forward width of each variant is set so that every
model has the parameter count of "GoH complete" (within 0.5%); the table states them.

Benches: ``text`` (byte-level LM on the standard-library text, benchmarks/corpus.py
``stdlib_text``, 2.1 MB, frozen in WORK/stdlib.txt; the last 10% held out; d_model 128,
4 layers, pre-LN, seq 128, batch 16, warm-up 40, routed models 2 shared heads + the
top-(H/2 - 2) of the H - 2 routed heads: half the heads on; metric held-out bits per
byte, lower is better), ``llama-text`` (the same with the Llama-style block of
benchmarks/continued.py: RMSNorm, SwiGLU d_ff 352, rotary positions), ``mqar`` (8
key-value pairs over 32 symbols, d_model 64, 2 layers; token accuracy; solved above 0.99),
``hops`` (pointer chasing, 6 links, 2 hops; accuracy). ``--heads 8 32`` runs both head
counts at the same width.

    python benchmarks/study.py --benches hops --seeds 0 1 2 3 4 5 6 7 8 9 --steps 1500
    python benchmarks/study.py --report-only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import pathlib
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import runlog  # noqa: E402

BASE = {"d_model": 64, "num_layers": 2, "d_ff": 128, "norm_first": True}  # mqar, hops
TEXT_BASE = {"d_model": 128, "num_layers": 4, "d_ff": 128, "norm_first": True}
LLAMA_BASE = {"block": "llama", "d_model": 128, "num_layers": 4, "d_ff": 352}  # continued.py's
TEXT_BENCHES = ("text", "llama-text")
GOH = {"attention": "goh", "graph": "complete"}
VARIANTS: dict[str, dict] = {
    "MHA": {"attention": "mha"},
    "MoH": {"attention": "moh"},
    "GoH null": {**GOH, "graph": "empty", "graph_learnable": "fixed"},
    "GoH complete": GOH,
    "GoH ring": {**GOH, "graph": "ring", "graph_learnable": "fixed"},
    "GoH learned": {**GOH, "graph": "ring", "graph_learnable": "dense"},
    "GoH gatv2": {**GOH, "graph_conv": "gatv2"},
    "GoH carry": {**GOH, "carry_head_states": True},
    # the early-training diagnosis: what in the graph branch could make GoH trail MoH
    "GoH L0": {**GOH, "graph_layers": 0},  # the branch without message passing
    "GoH no bias": {**GOH, "_freeze": "score_bias"},  # no learned per-head prior
    "GoH zero-u": {**GOH, "_zero_readout": True},  # readout u at 0, scale at 1 (LoRA-like)
}
REFERENCE = "GoH complete"  # --match-params matches every model to its size
BENCHES = {
    "text": {"higher_is_better": False, "solved": None},
    "llama-text": {"higher_is_better": False, "solved": None},
    "mqar": {"higher_is_better": True, "solved": 0.99},
    "hops": {"higher_is_better": True, "solved": 0.99},
}
# two-sided 97.5% quantiles of Student's t, df 1..30 (then the normal's 1.96)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


# one-sided 80% quantiles of Student's t, df 1..30 (then the normal's 0.842)
T80 = [1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873,
       0.870, 0.868, 0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857,
       0.856, 0.856, 0.855, 0.855, 0.854, 0.854]  # fmt: skip


def t975(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def t80(df: int) -> float:
    return T80[df - 1] if 1 <= df <= len(T80) else 0.842


def model_section(variant: str, heads: int, d_ff: int | None = None, bench: str = "mqar") -> dict:
    """Text: 2 shared heads + the top-(H/2 - 2) of the H - 2 routed heads (half the heads
    on); tasks: 2 shared + the top-((H - 2)/2) of the routed heads (5 of 8 on)."""
    base = {"text": TEXT_BASE, "llama-text": LLAMA_BASE}.get(bench, BASE)
    settings = {**base, "num_heads": heads, **VARIANTS[variant]}
    if settings["attention"] != "mha":
        if heads < 6:
            raise ValueError(f"study: routed variants need at least 6 heads, got {heads}")
        top_k = heads // 2 - 2 if bench in TEXT_BENCHES else (heads - 2) // 2
        settings.update(num_shared=2, top_k=top_k)
    if d_ff is not None:
        settings["d_ff"] = d_ff
    return settings


def without_hooks(model: dict) -> dict:
    return {k: v for k, v in model.items() if not k.startswith("_")}


def apply_hooks(net, model: dict) -> None:
    """The diagnosis variants' changes to the graph-routers after the model is built
    (before the optimiser's first step): ``_freeze`` a parameter, ``_zero_readout``."""
    import torch

    from graphheads.goh import GraphRouter

    for router in (m for m in net.modules() if isinstance(m, GraphRouter)):
        if "_freeze" in model:
            getattr(router, model["_freeze"]).requires_grad_(False)
        if model.get("_zero_readout"):
            with torch.no_grad():
                router.score.weight.zero_()
                router.graph_scale.fill_(1.0)


def data_section(bench: str, work: pathlib.Path) -> tuple[dict, dict]:
    """(data, train) sections of one bench."""
    if bench in TEXT_BENCHES:
        data = {"text": str(work / "stdlib.txt"), "seq_len": 128}
        train = {"batch_size": 16, "eval_batches": 16, "eval_batch_size": 32, "warmup_steps": 40}
    elif bench == "mqar":  # as benchmarks/quality.py: bimodal at this size
        data = {"tasks": ["mqar"], "length": 8, "num_symbols": 32}
        train = {"batch_size": 32, "eval_batches": 8, "eval_batch_size": 64}
    else:
        data = {"tasks": ["hops"], "length": 6, "num_symbols": 16, "hops": 2}
        train = {"batch_size": 32, "eval_batches": 8, "eval_batch_size": 64}
    return data, {"warmup_steps": 100, **train, "checkpoint_every": 10**6, "log_every": 50}


def parameter_count(model: dict, data: dict, work: pathlib.Path) -> int:
    from graphheads.train import RunConfig
    from graphheads.train.evaluation import build_data, build_model

    config = RunConfig.from_dict({"model": without_hooks(model), "data": data})
    built = build_data(config.data)
    net = build_model(config.model_config(built.vocab_size, built.max_seq_len), "lm")
    return sum(p.numel() for p in net.parameters())


def matched_d_ff(variant: str, heads: int, bench: str, work: pathlib.Path, target: int) -> int:
    """The d_ff that brings ``variant`` to ``target`` parameters (they grow linearly)."""
    data, _ = data_section(bench, work)
    low, high = (
        parameter_count(model_section(variant, heads, d, bench), data, work) for d in (64, 192)
    )
    return max(1, round(64 + (target - low) * (192 - 64) / (high - low)))


def metric_of(record: dict, bench: str) -> float:
    if bench in TEXT_BENCHES:
        return float(record["bits_per_byte"])
    return float(next(iter(record["accuracy"].values())))


def run_one(spec: dict) -> dict:
    """Train one run (in a worker process) and return its record."""
    import torch

    torch.set_num_threads(1)
    from graphheads.train import RunConfig, Trainer

    work = pathlib.Path(spec["work"])
    data, train = data_section(spec["bench"], work)
    train = {
        **train,
        "steps": spec["steps"],
        "eval_every": spec["eval_every"],
        "seed": spec["seed"],
    }
    model = model_section(spec["variant"], spec["heads"], spec.get("d_ff"), spec["bench"])
    config = RunConfig.from_dict({"model": without_hooks(model), "data": data, "train": train})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, folder, progress=False)
        apply_hooks(trainer.model, model)
        runlog.completed(trainer.fit())
        lines = (pathlib.Path(folder) / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if r["kind"] == "eval"]
    curve = [(r["step"], metric_of(r, spec["bench"])) for r in evals]
    return {
        **{k: spec[k] for k in ("variant", "bench", "heads", "seed", "steps")},
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "d_ff": model["d_ff"],
        "metric": curve[-1][1],
        "curve": curve,
        "seconds": time.perf_counter() - start,
    }


def settings_keys(spec: dict) -> tuple[str, str]:
    """(the run's settings, its comparison group): hashes of everything a run computes
    from (model, data and training sections), and of the data and training alone, so a
    study resumed or rerun with other settings never mixes or pairs their runs."""
    data, train = data_section(spec["bench"], pathlib.Path("WORK"))
    train = {**train, "steps": spec["steps"], "eval_every": spec["eval_every"]}
    model = model_section(spec["variant"], spec["heads"], spec.get("d_ff"), spec["bench"])

    def digest(value: object) -> str:
        return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]

    return digest([model, data, train]), digest([data, train, spec["heads"]])


def launch(spec: dict) -> dict:
    return runlog.launch(__file__, spec)


def paired(diffs: list[float]) -> tuple[float, float, float]:
    """Mean, 95% t-interval half-width, and the smallest effect an n-pair t-test detects
    with 80% power at 5% (``(t_0.975 + t_0.8) sd / sqrt(n)``, from the observed sd: a
    rough guide). Each interval is for one comparison (no multiplicity correction)."""
    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return mean, math.inf, math.inf
    se = statistics.stdev(diffs) / math.sqrt(n)
    return mean, t975(n - 1) * se, (t975(n - 1) + t80(n - 1)) * se


def comparison_groups(records: list[dict]):
    """Per (bench, heads, group): the runs of each variant by seed, for variants whose
    runs in the group share one settings hash, and the variants that have runs of
    several settings (a rerun with other settings: never mixed or paired)."""
    for key in sorted({(r["bench"], r["heads"], r.get("group", "")) for r in records}):
        runs = [r for r in records if (r["bench"], r["heads"], r.get("group", "")) == key]
        by, mixed = {}, []
        for variant in VARIANTS:
            mine = [r for r in runs if r["variant"] == variant]
            if len({r.get("settings") for r in mine}) > 1:
                mixed.append(variant)
            elif mine:
                by[variant] = {r["seed"]: r for r in mine}
        yield key, runs, by, mixed


def report(records: list[dict]) -> str:
    """Markdown tables: per (bench, heads), each variant's mean, its paired difference
    to MoH and to the null (GoH null) with 95% intervals, solve rates, parameters."""
    lines = []
    for (bench, heads, group), runs, by, mixed in comparison_groups(records):
        solved = BENCHES[bench]["solved"]
        unit = "bits/byte" if bench in TEXT_BENCHES else "accuracy"
        steps = sorted({r["steps"] for r in runs})
        lines += [
            f"### {bench}, {heads} heads, {'/'.join(map(str, steps))} steps (settings {group})",
            "",
            f"| variant | params | seeds | {unit} | minus MoH (95% CI) | minus null (95% CI) |"
            + (" solved |" if solved else ""),
            "| --- | --- | --- | --- | --- | --- |" + (" --- |" if solved else ""),
        ]
        for variant, seeds in by.items():
            values = [r["metric"] for r in seeds.values()]
            cells = []
            for other in ("MoH", "GoH null"):
                common = sorted(set(seeds) & set(by.get(other, {})))
                if variant == other or len(common) < 2:
                    cells.append("-")
                    continue
                mean, half, mde = paired(
                    [seeds[s]["metric"] - by[other][s]["metric"] for s in common]
                )
                cells.append(
                    f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] (MDE {mde:.3f})"
                )
            params = sorted({r["params"] for r in seeds.values()})
            row = (
                f"| {variant} | {', '.join(map(str, params))} | {len(values)} | "
                f"{statistics.mean(values):.3f} | {cells[0]} | {cells[1]} |"
            )
            if solved:
                row += f" {sum(v > solved for v in values)}/{len(values)} |"
            lines.append(row)
        if mixed:
            lines += ["", f"Left out, with runs of several settings here: {', '.join(mixed)}."]
        lines.append("")
    return "\n".join(lines)


def plot_curves(records: list[dict], out: pathlib.Path) -> None:
    """Per (bench, heads): each variant's mean paired difference to MoH along training."""
    import matplotlib.pyplot as plt

    for (bench, heads, group), _, by, _ in comparison_groups(records):
        moh = {seed: dict(map(tuple, r["curve"])) for seed, r in by.get("MoH", {}).items()}
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        for variant, seeds_runs in by.items():
            mine = {seed: dict(map(tuple, r["curve"])) for seed, r in seeds_runs.items()}
            seeds = sorted(set(mine) & set(moh))
            if variant == "MoH" or len(seeds) < 2:
                continue
            steps = sorted(set.intersection(*(set(mine[s]) & set(moh[s]) for s in seeds)))
            means, halves = [], []
            for step in steps:
                mean, half, _ = paired([mine[s][step] - moh[s][step] for s in seeds])
                means.append(mean)
                halves.append(half)
            line = ax.plot(steps, means, marker="o", ms=3, label=variant)[0]
            ax.fill_between(steps, [m - h for m, h in zip(means, halves, strict=True)],
                            [m + h for m, h in zip(means, halves, strict=True)],
                            color=line.get_color(), alpha=0.12)  # fmt: skip
        if not ax.lines:  # no variant paired with MoH here
            plt.close(fig)
            continue
        ax.axhline(0, color="black", lw=0.8)
        text = bench in TEXT_BENCHES
        unit = "bits/byte, below 0: better" if text else "accuracy, above 0: better"
        ax.set_xlabel("step")
        ax.set_ylabel(f"minus MoH, paired ({unit})")
        ax.set_title(f"{bench}, {heads} heads: mean paired difference to MoH, 95% CI")
        ax.legend(fontsize=7)
        fig.savefig(out / f"curves_{bench}_{heads}_{group}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)), help="seeds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="models (see the module's docstring)")  # fmt: skip
    parser.add_argument("--benches", nargs="+", default=["hops"], choices=list(BENCHES),
                        help="tasks (see the module's docstring)")  # fmt: skip
    parser.add_argument("--heads", type=int, nargs="+", default=[8],
                        help="head counts, each at the same width")  # fmt: skip
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each run")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between evaluations")
    parser.add_argument("--match-params", action="store_true",
                        help='every model at the parameter count of "GoH complete"')  # fmt: skip
    runlog.add_runner_arguments(parser, "runs/study")
    args = parser.parse_args()
    if runlog.run_worker_or_prepare(args, run_one):
        return
    if set(TEXT_BENCHES) & set(args.benches):
        runlog.frozen_corpus(args.work, "stdlib.txt")
    runs_file = args.work / "runs.jsonl"
    done = {(r["seed"], r.get("settings")) for r in runlog.load_records(runs_file)}
    todo = []
    for bench in [] if args.report_only else args.benches:
        data, _ = data_section(bench, args.work)
        for heads in args.heads:
            target = parameter_count(model_section(REFERENCE, heads, bench=bench), data, args.work)
            for variant in args.variants:
                d_ff = None
                if args.match_params and variant != REFERENCE:
                    d_ff = matched_d_ff(variant, heads, bench, args.work, target)
                spec = {"variant": variant, "bench": bench, "heads": heads,
                        "steps": args.steps, "eval_every": args.eval_every, "d_ff": d_ff,
                        "work": str(args.work)}  # fmt: skip
                spec["settings"], spec["group"] = settings_keys(spec)
                todo += [
                    {**spec, "seed": s} for s in args.seeds if (s, spec["settings"]) not in done
                ]
    todo.sort(key=lambda spec: spec["seed"])  # seed by seed: early pairs are complete
    if not args.report_only:
        asked = len(args.benches) * len(args.heads) * len(args.variants) * len(args.seeds)
        print(f"{len(todo)} runs to do, {asked - len(todo)} done in {runs_file}", flush=True)
    start = time.perf_counter()
    failed = []
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(launch, spec): spec for spec in todo}
        for future in concurrent.futures.as_completed(futures):
            spec = futures[future]
            try:
                record = future.result()
            except RuntimeError as err:  # the others go on, and are kept
                failed.append(spec)
                print(f"FAILED {spec['variant']} {spec['bench']} seed {spec['seed']}: {err}")
                continue
            record.update(settings=spec["settings"], group=spec["group"])
            runlog.append_record(runs_file, record)
            print(
                f"{record['bench']} h{record['heads']} {record['variant']:13s} seed "
                f"{record['seed']}: {record['metric']:.4f} ({record['seconds']:.0f} s)",
                flush=True,
            )
    records = runlog.load_records(runs_file)
    text = report(records)
    print(f"\n{time.perf_counter() - start:.0f} s\n\n{text}")
    (args.work / "report.md").write_text(text)
    plot_curves(records, args.work)
    if failed:
        sys.exit(f"{len(failed)} runs failed (see above); rerun to retry them")


if __name__ == "__main__":
    main()

"""MoH-LLaMA3's continued tuning, with the dense control the paper lacks (issue 33).

1. Pretrain one dense Llama-style byte LM (``block="llama"``) on the standard-library
   text (benchmarks/corpus.py ``stdlib_text``, 2.1 MB, frozen in WORK/stdlib.txt).
2. Training-free: keep 50% of each layer's heads (a static mask: the other heads' columns
   of ``out_proj`` zeroed) chosen by head importance (Michel et al. 2019) alone, by a
   head graph of the dense model's head similarity (heads joined by the cosine similarity
   of what they add to the residual stream; clustered into H/2 groups, the most important
   head of each kept), at random, or the first half; held-out bits/byte, no training.
3. Convert the dense run (``graphheads convert --run``: routers started so that with every
   head on the model is the dense one) to MoH and GoH at 75% and 50% of the heads, and
   continue each for the same steps and tokens as the dense model continued alongside
   (``--attention mha``: the same weights, schedule and batches, no routing), several
   data seeds each. Held-out bits/byte curves (step 0 = the converted model untrained),
   paired differences to the dense control with 95% intervals, and the tokens each needs
   to get back to the dense model's bits/byte at conversion.

Every continuation is its own process (one thread, ``--workers`` at a time), appended to
WORK/runs.jsonl when it finishes: an interrupted study resumes where it stopped.

    python benchmarks/continued.py --pretrain-steps 3000 --steps 1000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import pathlib
import random
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import runlog  # noqa: E402
from study import LLAMA_BASE, paired  # noqa: E402

MODEL = {**LLAMA_BASE, "num_heads": 8}  # the study's llama-text model
DATA = {"seq_len": 128}
TRAIN = {"batch_size": 16, "eval_batches": 16, "eval_batch_size": 32, "log_every": 50}
# name: (attention, num_shared, top_k); 75% = 2 shared + 4 of 6 routed, 50% = 2 + 2
VARIANTS = {
    "dense": ("mha", None, None),
    "MoH 75%": ("moh", 2, 4),
    "MoH 50%": ("moh", 2, 2),
    "GoH 75%": ("goh", 2, 4),
    "GoH 50%": ("goh", 2, 2),
}


def pretrain(work: pathlib.Path, steps: int) -> pathlib.Path:
    """The dense run (resumes if interrupted)."""
    import torch

    from graphheads.train import RunConfig, Trainer

    torch.set_num_threads(2)
    config = RunConfig.from_dict(
        {
            "model": {**MODEL, "attention": "mha"},
            "data": {**DATA, "text": str(work / "stdlib.txt")},
            "train": {**TRAIN, "steps": steps, "eval_every": 500, "checkpoint_every": 500},
        }
    )
    out = work / "dense"
    runlog.completed(Trainer(config, out, progress=True).fit())  # stopped: rerun resumes
    return out


def held_out(model, data, *, seed: int = 0) -> float:
    """Held-out bits/byte on the evaluation windows a run of ``seed`` evaluates on."""
    from graphheads.train import evaluate

    t = TRAIN
    result = evaluate(
        model, data, batches=t["eval_batches"], batch_size=t["eval_batch_size"], seed=seed
    )
    return float(result["bits_per_byte"])


def head_statistics(model, data, batches: int = 8):
    """Per layer: head importance (after Michel et al.: the sum over batches of |dL/d xi_h|,
    xi_h a gate on head h's output, here the gradient of a scale on its ``out_proj``
    columns; the absolute value is taken per batch of 16 windows, not per example) and
    the head-similarity matrix (cosine of the heads' contributions to the residual stream
    over all tokens). Calibration batches come from the training split."""
    import torch
    import torch.nn.functional as F

    from graphheads.attention import MultiHeadAttention

    attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    h, e = attns[0].num_heads, attns[0].head_dim
    importance = torch.zeros(len(attns), h)
    gram = torch.zeros(len(attns), h, h)
    inputs: list = [None] * len(attns)

    def keep(i):
        def hook(_m, args):
            inputs[i] = args[0]

        return hook

    handles = [a.out_proj.register_forward_pre_hook(keep(i)) for i, a in enumerate(attns)]
    generator = torch.Generator().manual_seed(1234)
    try:
        for _ in range(batches):
            batch = data.sample(16, generator)
            logits = model(batch.inputs).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
            weights = [a.out_proj.weight for a in attns]
            grads = torch.autograd.grad(loss, weights)
            with torch.no_grad():
                for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
                    importance[i] += (w * g).view(w.size(0), h, e).sum((0, 2)).abs()
                    x = inputs[i].flatten(0, 1).view(-1, h, e)  # (n, h, e)
                    parts = torch.einsum("nhe,dhe->nhd", x, w.view(-1, h, e))
                    gram[i] += torch.einsum("nhd,ngd->hg", parts, parts)
    finally:
        for handle in handles:
            handle.remove()
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()
    similarity = gram / (norms.unsqueeze(2) * norms.unsqueeze(1)).clamp_min(1e-12)
    return importance, similarity


def graph_selection(importance, similarity, keep: int) -> list[int]:
    """Cluster the heads of one layer on the similarity graph (average linkage on
    1 - cosine) into ``keep`` groups and keep the most important head of each."""
    groups = [[i] for i in range(len(importance))]
    while len(groups) > keep:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                sim = statistics.mean(float(similarity[i, j]) for i in groups[a] for j in groups[b])
                if best is None or sim > best[0]:
                    best = (sim, a, b)
        _, a, b = best
        groups[a] += groups.pop(b)
    return sorted(max(g, key=lambda i: float(importance[i])) for g in groups)


def masked_copy(model, keep: list[list[int]]):
    """A copy of ``model`` whose attention layers use only the heads ``keep[layer]``."""
    import copy

    import torch

    from graphheads.attention import MultiHeadAttention

    pruned = copy.deepcopy(model)
    attns = [m for m in pruned.modules() if isinstance(m, MultiHeadAttention)]
    with torch.no_grad():
        for attn, heads in zip(attns, keep, strict=True):
            h, e = attn.num_heads, attn.head_dim
            w = attn.out_proj.weight.view(-1, h, e)
            for head in set(range(h)) - set(heads):
                w[:, head].zero_()
    return pruned


def training_free(work: pathlib.Path) -> dict:
    import torch

    from graphheads.train import load_run

    torch.set_num_threads(2)
    model, _, data, step = load_run(work / "dense")
    importance, similarity = head_statistics(model, data)
    h = importance.size(1)
    keep = h // 2
    selections = {
        "importance": [sorted(row.topk(keep).indices.tolist()) for row in importance],
        "similarity graph": [
            graph_selection(importance[i], similarity[i], keep) for i in range(len(importance))
        ],
        "first half": [list(range(keep))] * len(importance),
    }
    rng = random.Random(0)
    for draw in range(5):
        selections[f"random {draw}"] = [
            sorted(rng.sample(range(h), keep)) for _ in range(len(importance))
        ]
    with torch.no_grad():
        result = {"step": step, "dense": held_out(model, data)}
        for name, keep_heads in selections.items():
            result[name] = held_out(masked_copy(model, keep_heads), data)
    result["selections"] = selections
    result["head_importance"] = importance.tolist()
    result["head_similarity"] = similarity.tolist()
    return result


def run_one(spec: dict) -> dict:
    """Convert the dense run and continue it (in a worker process)."""
    import torch

    torch.set_num_threads(1)
    from graphheads.train import RunConfig, Trainer, load_run
    from graphheads.train.conversion import RUN_FILE, convert_run

    work = pathlib.Path(spec["work"])
    attention, shared, top_k = VARIANTS[spec["variant"]]
    name = f"{spec['variant'].replace(' ', '_').replace('%', '')}-s{spec['seed']}"
    out = work / "cont" / spec["key"] / name
    if not out.exists():
        convert_run(
            work / "dense", out, attention=attention, num_shared=shared, top_k=top_k,
            overrides=[f"train.steps={spec['steps']}", f"train.seed={100 + spec['seed']}",
                       f"train.lr={spec['lr']}", f"train.warmup_steps={spec['warmup']}",
                       f"train.eval_every={spec['eval_every']}", "train.checkpoint_every=1000000"],
        )  # fmt: skip
    start_file = out / "start.json"  # the converted model before training, kept for resumes
    if not start_file.exists():
        model, _, data, _ = load_run(out)
        start = held_out(model, data, seed=100 + spec["seed"])  # the trainer's eval windows
        start_file.write_text(json.dumps(start))
    start = json.loads(start_file.read_text())
    started = time.perf_counter()
    trainer = Trainer(RunConfig.load(out / RUN_FILE), out, progress=False)
    runlog.completed(trainer.fit())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    curve = [(r["step"], r["bits_per_byte"]) for r in map(json.loads, lines) if r["kind"] == "eval"]
    curve.insert(0, (0, start))
    return {
        **{k: spec[k] for k in ("variant", "seed", "steps", "lr", "key")},
        "curve": curve,
        "metric": curve[-1][1],
        "seconds": time.perf_counter() - started,
    }


def launch(spec: dict) -> dict:
    return runlog.launch(__file__, spec)


def report(records: list[dict], free: dict | None, tokens_per_step: int) -> str:
    lines = []
    if free is not None:
        lines += [
            f"### Training-free: 50% of the heads of the dense model (step {free['step']})",
            "",
            "| heads kept | held-out bits/byte |",
            "| --- | --- |",
            f"| all (dense) | {free['dense']:.3f} |",
        ]
        randoms = [v for k, v in free.items() if k.startswith("random ")]
        for name in ("importance", "similarity graph", "first half"):
            lines.append(f"| {name} | {free[name]:.3f} |")
        if randoms:
            lines.append(
                f"| random (mean of {len(randoms)}, range {min(randoms):.3f}-{max(randoms):.3f})"
                f" | {statistics.mean(randoms):.3f} |"
            )
        lines.append("")
    if not records:
        return "\n".join(lines)
    by = {v: {r["seed"]: r for r in records if r["variant"] == v} for v in VARIANTS}
    base = by["dense"]
    lines += [
        "### Continued training after conversion",
        "",
        "| variant | seeds | step 0 | final | minus dense control (95% CI) | "
        "bytes to get back to the dense model at conversion |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for variant, seeds in by.items():
        if not seeds:
            continue
        first = statistics.mean(dict(map(tuple, r["curve"]))[0] for r in seeds.values())
        final = statistics.mean(r["metric"] for r in seeds.values())
        common = sorted(set(seeds) & set(base))
        cell = "-"
        if variant != "dense" and len(common) >= 2:
            mean, half, _ = paired([seeds[s]["metric"] - base[s]["metric"] for s in common])
            cell = f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"
        reached = "-"
        if variant != "dense":
            cells = []  # the dense model at conversion = the dense control's step 0, per seed
            for seed, r in sorted(seeds.items()):
                if seed not in base:
                    cells.append(f"seed {seed}: n/a (no control)")
                    continue
                target = dict(map(tuple, base[seed]["curve"]))[0]
                hit = [s for s, v in r["curve"] if v <= target]
                cells.append(
                    f"seed {seed}: {hit[0] * tokens_per_step / 1e3:.0f}k"
                    if hit
                    else f"seed {seed}: not within {r['steps'] * tokens_per_step / 1e3:.0f}k"
                )
            reached = ", ".join(cells)
        lines.append(
            f"| {variant} | {len(seeds)} | {first:.3f} | {final:.3f} | {cell} | {reached} |"
        )
    return "\n".join([*lines, ""])


def plot(records: list[dict], out: pathlib.Path, tokens_per_step: int) -> None:
    """Mean held-out curves: every step (left) and from the first evaluation on (right,
    where the routed curves meet the dense control); MoH dashed, GoH solid, one colour
    per share of heads."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    colours = {"dense": "black", "75%": "tab:blue", "50%": "tab:red"}
    for variant in VARIANTS:
        runs = [r for r in records if r["variant"] == variant]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(dict(map(tuple, r["curve"]))) for r in runs)))
        means = [statistics.mean(dict(map(tuple, r["curve"]))[s] for r in runs) for s in steps]
        style = {
            "color": colours[variant.split()[-1]],
            "lw": 2 if variant == "dense" else 1.2,
            "ls": "--" if variant.startswith("MoH") else "-",
            "marker": "x" if variant.startswith("MoH") else "o",
            "ms": 4,
            "label": f"{variant} ({len(runs)} seeds)",
        }
        tokens = [s * tokens_per_step / 1e6 for s in steps]
        axes[0].plot(tokens, means, **style)
        axes[1].plot(tokens[1:], means[1:], **style)
    starts = [dict(map(tuple, r["curve"]))[0] for r in records if r["variant"] == "dense"]
    for ax in axes:
        if starts:
            ax.axhline(statistics.mean(starts), color="grey", ls=":", lw=1,
                       label="dense model at conversion")  # fmt: skip
        ax.set_xlabel("continued-training tokens (millions of bytes)")
        ax.set_ylabel("held-out bits/byte")
    axes[0].set_title("after conversion (step 0: untrained)")
    axes[1].set_title("from the first evaluation on")
    axes[1].legend(fontsize=7)
    fig.suptitle("Continued training after conversion, with the dense control (black)")
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--pretrain-steps", type=int, default=3000, help="dense pretraining steps")
    parser.add_argument("--steps", type=int, default=1000, help="continued-training steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="continued-training peak lr")
    parser.add_argument("--warmup", type=int, default=50, help="continued-training warm-up")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data seeds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="conversions (dense: the control)")  # fmt: skip
    runlog.add_runner_arguments(parser, "runs/continued")
    args = parser.parse_args()
    if runlog.run_worker_or_prepare(args, run_one):
        return
    runlog.frozen_corpus(args.work, "stdlib.txt")
    if not args.report_only:
        pretrain(args.work, args.pretrain_steps)
    free_path = args.work / "training_free.json"
    free = json.loads(free_path.read_text()) if free_path.exists() else None
    if not args.report_only and (free is None or free["step"] != args.pretrain_steps):
        free = training_free(args.work)  # (again, for a dense run trained further)
        free_path.write_text(json.dumps(free))
    runs_file = args.work / "runs.jsonl"
    settings = [args.pretrain_steps, args.steps, args.lr, args.warmup, args.eval_every,
                MODEL, DATA, TRAIN]  # fmt: skip
    key = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:12]
    done = {(r["variant"], r["seed"]) for r in runlog.load_records(runs_file) if r["key"] == key}
    todo = [
        {"variant": v, "seed": s, "steps": args.steps, "lr": args.lr, "warmup": args.warmup,
         "eval_every": args.eval_every, "key": key, "work": str(args.work)}
        for s in args.seeds for v in args.variants if (v, s) not in done and not args.report_only
    ]  # fmt: skip
    if not args.report_only:
        asked = len(args.seeds) * len(args.variants)
        print(f"{len(todo)} runs to do, {asked - len(todo)} done in {runs_file}", flush=True)
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(launch, spec): spec for spec in todo}
        for future in concurrent.futures.as_completed(futures):
            try:
                record = future.result()
            except RuntimeError as err:
                failed += 1
                print(f"FAILED {err}")
                continue
            runlog.append_record(runs_file, record)
            print(f"{record['variant']:8s} seed {record['seed']}: {record['metric']:.4f} "
                  f"({record['seconds']:.0f} s)", flush=True)  # fmt: skip
    records = [r for r in runlog.load_records(runs_file) if r["key"] == key]
    tokens = TRAIN["batch_size"] * DATA["seq_len"]
    text = report(records, free, tokens)
    print(text)
    (args.work / "report.md").write_text(text)
    if records:
        plot(records, args.work / "continued.png", tokens)
    if failed:
        sys.exit(f"{failed} runs failed; rerun to retry them")


if __name__ == "__main__":
    main()

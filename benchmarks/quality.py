"""Quality at equal size and equal steps: MHA, MoH and GoH decoder LMs, several seeds.

Every model: 2 layers, d_model 64, 8 heads, d_ff 128, pre-LN, trained with the
graphheads trainer (AdamW, warm-up + cosine, load-balance weight 0.01). MoH and GoH use
2 shared heads plus the top-4 (75% of heads) or top-2 (50%) of the 6 routed heads; GoH
over a complete graph with learnable edge weights, a fixed ring, or the empty graph.
Tasks: multi-query associative recall (8 key-value pairs, 32 symbols; eval token
accuracy) and byte-level language modelling of English text that ships offline (eval
bits per byte). Prints mean and standard deviation over seeds, writes the raw numbers as
JSON and a plot.

    python benchmarks/quality.py --seeds 0 1 2 --out docs/img
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import corpus
import matplotlib.pyplot as plt

from graphheads.train import RunConfig, Trainer

MODEL = {"d_model": 64, "num_heads": 8, "num_layers": 2, "d_ff": 128, "norm_first": True}
VARIANTS = {
    "MHA": {"attention": "mha"},
    "MoH 75%": {"attention": "moh", "num_shared": 2, "top_k": 4},
    "MoH 50%": {"attention": "moh", "num_shared": 2, "top_k": 2},
    **{
        f"GoH 75% {name}": {"attention": "goh", "num_shared": 2, "top_k": 4, **graph}
        for name, graph in (
            ("complete", {"graph": "complete", "graph_learnable": "edge"}),
            ("ring", {"graph": "ring", "graph_learnable": "fixed"}),
            ("empty", {"graph": "empty", "graph_learnable": "fixed"}),
        )
    },
    **{
        f"GoH 50% {name}": {"attention": "goh", "num_shared": 2, "top_k": 2, **graph}
        for name, graph in (
            ("complete", {"graph": "complete", "graph_learnable": "edge"}),
            ("ring", {"graph": "ring", "graph_learnable": "fixed"}),
            ("empty", {"graph": "empty", "graph_learnable": "fixed"}),
        )
    },
}


def run(variant: dict, data: dict, train: dict, seed: int) -> dict:
    config = RunConfig.from_dict(
        {"model": {**MODEL, **variant}, "data": data, "train": {**train, "seed": seed}}
    )
    return Trainer(config, None, progress=False).fit().final_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mqar-steps", type=int, default=800)
    parser.add_argument("--text-steps", type=int, default=400)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/img"))
    args = parser.parse_args()
    text_file = pathlib.Path(tempfile.mkdtemp()) / "corpus.txt"
    text_file.write_text(corpus.offline_text())
    common = {"eval_every": 10**6, "checkpoint_every": 10**6, "log_every": 10**6, "eval_batches": 4}
    benches = {
        "mqar": (
            {"tasks": ["mqar"], "length": 8, "num_symbols": 32},
            {**common, "steps": args.mqar_steps, "batch_size": 32, "warmup_steps": 50},
            "accuracy",
        ),
        "text": (
            {"text": str(text_file), "seq_len": 128},
            {
                **common,
                "steps": args.text_steps,
                "batch_size": 16,
                "warmup_steps": 40,
                "eval_batch_size": 32,
            },
            "bits_per_byte",
        ),
    }
    results: dict = {}
    start = time.perf_counter()
    for bench, (data, train, _) in benches.items():
        for name, variant in VARIANTS.items():
            for seed in args.seeds:
                final = run(variant, data, train, seed)
                metric = final["accuracy"]["mqar"] if bench == "mqar" else final["bits_per_byte"]
                results.setdefault(bench, {}).setdefault(name, []).append(
                    {"seed": seed, "loss": final["loss"], "metric": metric}
                )
                print(
                    f"{bench:5s} {name:18s} seed {seed}: "
                    f"loss {final['loss']:.4f} metric {metric:.4f}",
                    flush=True,
                )
    print(f"\n{time.perf_counter() - start:.0f} s in all\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    print("| model | MQAR accuracy | MQAR eval loss | text bits/byte |")
    print("| --- | --- | --- | --- |")

    def stat(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    for name in VARIANTS:
        mq, tx = results["mqar"][name], results["text"][name]
        print(
            f"| {name} | {stat([r['metric'] for r in mq])} | {stat([r['loss'] for r in mq])} | "
            f"{stat([r['metric'] for r in tx])} |"
        )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    names = list(VARIANTS)
    panels = (
        (axes[0], "mqar", "MQAR token accuracy (higher is better)"),
        (axes[1], "text", "text bits per byte (lower is better)"),
    )
    for ax, bench, label in panels:
        values = [[r["metric"] for r in results[bench][n]] for n in names]
        means = [statistics.mean(v) for v in values]
        spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        colors = ["#7570b3"] + ["#d95f02"] * 2 + ["#1b9e77"] * 6
        ax.bar(range(len(names)), means, yerr=spreads, color=colors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label)
        low = min(m - s for m, s in zip(means, spreads, strict=True))
        high = max(m + s for m, s in zip(means, spreads, strict=True))
        ax.set_ylim(max(0.0, low - 0.1 * (high - low)), high + 0.1 * (high - low))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"equal size, equal steps; mean ± std over seeds {args.seeds}")
    fig.savefig(args.out / "quality.png", dpi=110)


if __name__ == "__main__":
    main()

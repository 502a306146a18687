"""Training throughput (tokens/s) of the Trainer for MHA, MoH and GoH, measured side by
side in one process (rounds interleave the configurations, so machine noise hits all).

Two model sizes: the main job's default model on the built-in task suite, and the
Llama-style ``llama-10m`` preset on bytes of this repository's docs (sequence 256).

    python benchmarks/train_throughput.py                 # CPU, fp32
    python benchmarks/train_throughput.py --precision bf16
    python benchmarks/train_throughput.py --device cuda --precision bf16 --compile

Prints tokens/s (median over rounds) and the ratio to MHA of the same size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from graphheads.train import RunConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "default (tasks)": ["train.batch_size=32"],
    "llama-10m (text)": ["model.preset=llama-10m", "data.seq_len=256", "train.batch_size=8"],
}
ATTENTION = {
    "mha": ["model.attention=mha"],
    "moh": ["model.attention=moh", "model.num_shared=2", "model.top_k=2"],
    "goh": ["model.attention=goh", "model.num_shared=2", "model.top_k=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per configuration per round")
    args = parser.parse_args()
    text = Path(tempfile.mkdtemp()) / "docs.txt"  # the repository's Markdown as a corpus
    text.write_text("\n".join(p.read_text() for p in sorted(ROOT.glob("**/*.md"))))
    SIZES["llama-10m (text)"].append(f"data.text={json.dumps(str(text))}")
    runtime = [
        f"train.device={args.device}",
        f"train.precision={args.precision}",
        f"train.compile={str(args.compile).lower()}",
    ]
    trainers = {
        (size, kind): Trainer(RunConfig.load(None, [*sets, *extra, *runtime]), None, progress=False)
        for size, sets in SIZES.items()
        for kind, extra in ATTENTION.items()
    }
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in trainers}
    step = 0
    for round_ in range(args.rounds + 1):  # round 0 warms up (and compiles)
        for key, trainer in trainers.items():
            t = trainer.config.train
            start, tokens = time.perf_counter(), 0
            for _ in range(args.steps):
                batch = trainer.data.sample(t.batch_size, torch.Generator().manual_seed(step))
                metrics = trainer.train_step(batch)
                tokens += batch.inputs.numel()
                step += 1
            trainer._read_metrics(metrics)  # one sync per batch of steps, as on log steps
            if round_:
                rates[key].append(tokens / (time.perf_counter() - start))
    device = next(iter(trainers.values())).device
    print(
        f"device {device}, precision {args.precision}, compile {args.compile}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}\n"
    )
    print("| model | attention | parameters | tokens/s | / mha |")
    print("| --- | --- | --- | --- | --- |")
    for size in SIZES:
        base = statistics.median(rates[(size, "mha")])
        for kind in ATTENTION:
            trainer = trainers[(size, kind)]
            params = sum(p.numel() for p in trainer.model.parameters()) / 1e6
            rate = statistics.median(rates[(size, kind)])
            print(f"| {size} | {kind} | {params:.2f}M | {rate:,.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()

"""Continual learning on the built-in tasks: average accuracy and forgetting of MHA, MoH
and GoH under every method, over several seeds (mean +/- std).

Three stages, each trained for ``--steps`` steps on its own tasks:

    A: copy, reverse    B: sort    C: modadd

with the main job's model (width 64, 8 heads, 2 layers; MoH/GoH: 2 shared heads, top-3
of 6 routed). ``protect`` and ``task_routing`` need routed heads, so MHA runs the other
three methods.

    python benchmarks/continual.py                       # 3 seeds, 300 steps per stage
    python benchmarks/continual.py --seeds 0 --steps 50  # a quick look
    python benchmarks/continual.py --jobs 2              # two runs at a time (1 thread each)
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor

import torch

from graphheads.train.continual import ContinualConfig
from graphheads.train.continual_run import ContinualRun

STAGES = [
    {"name": "A", "tasks": ["copy", "reverse"]},
    {"name": "B", "tasks": ["sort"]},
    {"name": "C", "tasks": ["modadd"]},
]
METHODS = ("finetune", "replay", "ewc", "protect", "task_routing")
KINDS = ("mha", "moh", "goh")


def one_run(kind: str, method: str, seed: int, steps: int) -> dict:
    torch.set_num_threads(1)
    model = {"attention": kind}
    if kind == "mha":
        model.update(num_shared=0, top_k=None)
    config = ContinualConfig.from_dict(
        {
            "method": method,
            "seed": seed,
            "model": model,
            "stages": [{**s, "steps": steps} for s in STAGES],
        }
    )
    result = ContinualRun(config, progress=False).run()
    return {"kind": kind, "method": method, "seed": seed, "matrix": result.matrix,
            "usage": result.head_usage, **result.metrics}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="steps per stage")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", help="write every run's matrix and metrics here")
    args = parser.parse_args()
    grid = [
        (kind, method, seed)
        for kind in KINDS
        for method in METHODS
        if not (kind == "mha" and method in ("protect", "task_routing"))
        for seed in args.seeds
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(one_run, *zip(*grid, strict=True), [args.steps] * len(grid)))
    print(f"stages {[s['name'] + ': ' + '+'.join(s['tasks']) for s in STAGES]}, "
          f"{args.steps} steps each, seeds {args.seeds}\n")  # fmt: skip
    print("| attention | method | average accuracy | backward transfer (forgetting) |")
    print("| --- | --- | --- | --- |")
    for kind in KINDS:
        for method in METHODS:
            cell = [r for r in runs if r["kind"] == kind and r["method"] == method]
            if not cell:
                continue
            parts = []
            for key in ("average_accuracy", "backward_transfer"):
                values = [r[key] for r in cell]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                parts.append(f"{statistics.mean(values):.3f} +/- {spread:.3f}")
            print(f"| {kind} | {method} | {parts[0]} | {parts[1]} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=1)


if __name__ == "__main__":
    main()

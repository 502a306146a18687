"""Few-shot adaptation after meta-learning against plain multi-task pre-training.

Training pool: copy, reverse and sort under 24 random symbol relabellings each, and
modadd with moduli 7 and 11 (prompt length 6). Held-out variants, 6 of each kind:

    permutation   copy / reverse / sort under relabellings never trained on
    modulus       modadd with modulus 13
    length        copy / reverse / sort with prompts of 8 symbols (trained: 6)

Models (the main job's GoH model: width 64, 8 heads, 2 layers, 2 shared, top-3), each
trained on the same number of examples:

    multitask       Adam on batches of random pool variants (the baseline)
    fomaml-all      first-order MAML, the inner loop adapts every weight
    reptile-all     Reptile, every weight
    fomaml-routers  first-order MAML, the inner loop adapts only routers and head graphs

Each is then adapted to every held-out variant with 0, 1, 5 and 20 SGD steps on 32
examples (all weights, or the routers for fomaml-routers) and scored on 64 others.

    python benchmarks/meta_adaptation.py                    # 300 meta-steps, seed 0
    python benchmarks/meta_adaptation.py --plot docs/img/meta_adaptation.png
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from graphheads import DecoderOnlyLM, ModelConfig
from graphheads.data.tasks import IGNORE_INDEX, TaskSuite
from graphheads.train.meta import MetaLearner, TaskVariant, adaptation_curve, variant_batch

SYMBOLS, STEPS_SHOWN = 16, (0, 1, 5, 20)


def relabellings(n: int, gen: torch.Generator) -> list[tuple[int, ...]]:
    return [tuple(torch.randperm(SYMBOLS, generator=gen).tolist()) for _ in range(n)]


def pools(seed: int) -> tuple[list[TaskVariant], dict[str, list[TaskVariant]]]:
    gen = torch.Generator().manual_seed(seed)
    identity = tuple(range(SYMBOLS))
    train = [TaskVariant(t, p) for t in ("copy", "reverse", "sort") for p in relabellings(24, gen)]
    train += [TaskVariant("modadd", identity, modulus=m) for m in (7, 11)]
    held_out = {
        "permutation": [
            TaskVariant(t, p) for t in ("copy", "reverse", "sort") for p in relabellings(2, gen)
        ],
        "modulus": [TaskVariant("modadd", identity, modulus=13)] * 6,
        "length": [
            TaskVariant(t, p, length=8)
            for t in ("copy", "reverse", "sort")
            for p in relabellings(2, gen)
        ],
    }
    return train, held_out


def new_model(width: int, seed: int) -> DecoderOnlyLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=TaskSuite().vocab_size, d_model=64, num_heads=8, num_layers=2, d_ff=128,
        max_seq_len=width, norm_first=True, attention="goh", num_shared=2, top_k=3,
    )  # fmt: skip
    return DecoderOnlyLM(config)


def multitask(model, train, examples, width, gen) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(examples // 32):
        picks = torch.randint(0, len(train), (4,), generator=gen).tolist()
        loss = 0.0
        for j in picks:  # 4 variants x 8 examples per batch
            batch = variant_batch(train[j], 8, gen, width)
            out = model(batch.inputs, key_padding_mask=batch.padding)
            loss = loss + F.cross_entropy(
                out.logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
            ) / len(picks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write the adaptation curves here (PNG)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    train, held_out = pools(args.seed)
    width = TaskSuite(("copy", "reverse", "sort", "modadd"), length=8).max_seq_len
    meta_batch, support, query = 4, 16, 16
    examples = args.meta_steps * meta_batch * (support + query)
    results: dict[str, dict[str, dict[int, float]]] = {}
    settings = {
        "multitask": None,
        "fomaml-all": ("fomaml", "all"),
        "reptile-all": ("reptile", "all"),
        "fomaml-routers": ("fomaml", "routers"),
    }
    for name, setting in settings.items():
        gen = torch.Generator().manual_seed(args.seed + 1)
        model = new_model(width, args.seed)
        adapt = "all"
        if setting is None:
            multitask(model, train, examples, width, gen)
        else:
            algorithm, adapt = setting
            learner = MetaLearner(
                model, train, algorithm=algorithm, adapt=adapt, inner_steps=5, inner_lr=0.1,
                outer_lr=1e-3, meta_batch=meta_batch, support_size=support,
                query_size=query, width=width,
            )  # fmt: skip
            for _ in range(args.meta_steps):
                learner.meta_step(gen)
        results[name] = {}
        for kind, variants in held_out.items():
            results[name][kind] = adaptation_curve(
                model, variants, adapt=adapt, lr=0.1, checkpoints=STEPS_SHOWN, width=width,
                seed=args.seed,
            )  # fmt: skip
    print(f"{examples:,} training examples per model, seed {args.seed}\n")
    print("| model | held-out kind | " + " | ".join(f"{k} steps" for k in STEPS_SHOWN) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in STEPS_SHOWN) + " |")
    for name, kinds in results.items():
        for kind, curve in kinds.items():
            cells = " | ".join(f"{curve[k]:.3f}" for k in STEPS_SHOWN)
            print(f"| {name} | {kind} | {cells} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(held_out), figsize=(4 * len(held_out), 3.2))
        for ax, kind in zip(axes, held_out, strict=True):
            for name, kinds in results.items():
                ax.plot(STEPS_SHOWN, [kinds[kind][k] for k in STEPS_SHOWN], marker="o", label=name)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks(STEPS_SHOWN, [str(k) for k in STEPS_SHOWN])
            ax.set_title(f"held-out {kind}")
            ax.set_xlabel("inner SGD steps")
            ax.set_ylim(0, 1)
        axes[0].set_ylabel("query accuracy")
        axes[-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()

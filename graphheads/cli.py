"""The ``graphheads`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from graphheads.data import IGNORE_INDEX, copy_task
from graphheads.transformer import DecoderOnlyLM, ModelConfig


def _demo(args: argparse.Namespace) -> int:
    """Train a tiny LM on the built-in copy task, then copy a fresh sequence with it."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    vocab, length = 12, 6
    config = ModelConfig(
        vocab_size=vocab,
        d_model=64,
        num_heads=4,
        num_layers=2,
        d_ff=128,
        max_seq_len=32,
        norm_first=True,
        attention=args.attention,
        num_shared=1 if args.attention != "mha" else 0,
    )
    model = DecoderOnlyLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = copy_task(32, length, vocab, generator=gen)
        out = model(batch.inputs)
        loss = F.cross_entropy(
            out.logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
        )
        if out.routing:
            loss = loss + 0.01 * out.aux_loss / len(out.routing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    batch = copy_task(1, length, vocab, generator=gen)
    prompt = batch.inputs[:, : length + 1]  # the symbols and the separator
    generated = model.generate(prompt, length)
    print(f"attention: {args.attention}, {time.perf_counter() - start:.1f} s")
    print("prompt:   ", prompt[0, :length].tolist())
    print("generated:", generated[0, length + 1 :].tolist())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphheads", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny LM on the copy task and generate")
    demo.add_argument("--steps", type=int, default=250)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--attention", choices=["mha", "moh", "goh"], default="mha")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

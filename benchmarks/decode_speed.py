"""Decoding speed: tokens/s of one decoding step of a 2-layer decoder-only LM with a long
key/value cache, routed heads (MoH, GoH at 50% of the heads) against dense multi-head
attention, and the default ``execution="auto"`` against ``"dense"``, side by side.

A decoding step with a long cache is bound by memory traffic: every head reads its whole
cache. Routed decoding (:func:`graphheads.sparse.routed_decode_attention`) reads only the
caches of the heads a token uses, through index tensors; only a compiled step reads them
without a copy, so ``"auto"`` decodes routed only compiled and where the bytes it skips
pay (:func:`graphheads.sparse.decode_pays`). Compared here:

    mha        dense multi-head attention (PyTorch's fused SDPA kernel)
    moh-dense  MoH with execution="dense": every head computed, then gated
    moh        MoH, execution="auto" (2 shared + top-2 of 6 routed = 4 of 8 heads)
    goh-dense  Graph-of-Heads, execution="dense"
    goh        Graph-of-Heads, execution="auto", the same heads

for widths 256 and 512 (8 heads; FFN 4x; embeddings and LM head included), eager and
compiled (``torch.compile(model, dynamic=True)``, every kind alike). The cache is
preallocated and filled with random keys and values (a step's cost does not depend on
their values); every timed step appends one token at the same position. Times are
medians of interleaved rounds (each kind runs once per round), printed as MHA's tokens/s
(batch / step time) and as ratios: ``auto/dense`` (the same model, the default against
execution="dense": auto must never lose) and ``x mha`` (the routed model against MHA).

    python benchmarks/decode_speed.py                       # CPU, eager and compiled
    python benchmarks/decode_speed.py --device cuda --modes compiled
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from graphheads import DecoderOnlyLM, ModelConfig
from graphheads.types import KVCache

HEADS, SHARED, TOP_K, VOCAB = 8, 2, 2, 256
KINDS = ("mha", "moh-dense", "moh", "goh-dense", "goh")


def build_model(kind: str, width: int, max_len: int, device: str) -> DecoderOnlyLM:
    torch.manual_seed(0)
    attention = kind.split("-")[0]
    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=width,
        num_heads=HEADS,
        num_layers=2,
        d_ff=4 * width,
        max_seq_len=max_len,
        attention=attention,
        **({} if attention == "mha" else {"num_shared": SHARED, "top_k": TOP_K}),
        **({"execution": "dense"} if kind.endswith("-dense") else {}),
    )
    return DecoderOnlyLM(config).to(device).eval()


def filled_cache(batch: int, length: int, width: int, device: str) -> KVCache:
    """A preallocated cache of ``length`` random tokens with room for one more."""
    e = width // HEADS
    cache = KVCache.empty(batch, HEADS, length + 1, e, device=device)
    shape = (batch, HEADS, length, e)
    return cache.append(torch.randn(shape, device=device), torch.randn(shape, device=device))


def step_fn(
    model: torch.nn.Module, layers: int, batch: int, length: int, width: int, device: str
) -> Callable[[], None]:
    """One decoding step (one new token per sequence) at cache length ``length``."""
    caches = tuple(filled_cache(batch, length, width, device) for _ in range(layers))
    token = torch.randint(0, VOCAB, (batch, 1), device=device)

    def run() -> None:
        for c in caches:
            assert c.buffer is not None
            c.buffer.filled = length  # the step writes its token at the same place
        model(token, cache=caches, use_cache=True)

    return run


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 8192, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args()
    print(
        f"# decode_speed: {HEADS} heads, {SHARED} shared + top-{TOP_K}, 2 layers, "
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = []
    with torch.no_grad():
        for mode in args.modes:
            print(f"\n## {mode}: MHA tokens/s; auto/dense; routed x mha\n")
            print(
                "| width | cache | batch | mha tok/s | moh auto/dense | goh auto/dense "
                "| moh x mha | goh x mha |"
            )
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for width in args.widths:
                models = {
                    k: build_model(k, width, max(args.lengths) + 1, args.device) for k in KINDS
                }
                runnable: dict[str, torch.nn.Module] = dict(models)
                if mode == "compiled":
                    torch._dynamo.reset()
                    # five models share one forward: each needs its own compiles (static,
                    # then dynamic; a threshold crossing), past dynamo's default limit of 8
                    torch._dynamo.config.recompile_limit = 64
                    torch._dynamo.config.accumulated_recompile_limit = 1024
                    runnable = {k: torch.compile(m, dynamic=True) for k, m in models.items()}
                for length in args.lengths:
                    for batch in args.batches:
                        runs = {
                            k: step_fn(m, 2, batch, length, width, args.device)
                            for k, m in runnable.items()
                        }
                        times: dict[str, list[float]] = {k: [] for k in KINDS}
                        for run in runs.values():  # warm-up (and compiles)
                            run()
                            run()
                        for _ in range(args.repeats):
                            for kind, run in runs.items():
                                sync(args.device)
                                start = time.perf_counter()
                                run()
                                sync(args.device)
                                times[kind].append(time.perf_counter() - start)
                        rate = {k: batch / statistics.median(v) for k, v in times.items()}
                        cells = [
                            f"{rate['mha']:.0f}",
                            f"{rate['moh'] / rate['moh-dense']:.2f}",
                            f"{rate['goh'] / rate['goh-dense']:.2f}",
                            f"{rate['moh'] / rate['mha']:.2f}",
                            f"{rate['goh'] / rate['mha']:.2f}",
                        ]
                        print(f"| {width} | {length} | {batch} | " + " | ".join(cells) + " |")
                        results.append(
                            {
                                "mode": mode,
                                "width": width,
                                "cache": length,
                                "batch": batch,
                                "tokens_per_s": rate,
                            }
                        )
                        del runs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Decoding speed: tokens/s of one decoding step with a long key/value cache, routed
heads (MoH, GoH at 50% of the heads) against dense multi-head attention, side by side.

A decoding step with a long cache is bound by memory traffic: every head reads its whole
cache. Routed decoding (``execution="auto"``, the default, or ``"sparse"``) reads only
the caches of the heads a token uses and skips the query- and output-projection slices
of the others (:func:`graphheads.sparse.routed_decode_attention`). Compared here:

    mha        dense multi-head attention (PyTorch's fused SDPA kernel)
    moh-dense  MoH with execution="dense": every head computed, then gated
    moh        MoH, routed decoding (2 shared + top-2 of 6 routed = 4 of 8 heads)
    goh        Graph-of-Heads, routed decoding, the same heads

for ``block`` (one attention module: d_model 512, 8 heads of width 64) and ``model``
(a 2-layer decoder-only LM of that width: embeddings, FFN, LM head too). The cache is
preallocated and filled with random keys and values (a step's cost does not depend on
their values); every timed step appends one token at the same position. Times are
medians of interleaved repeats (each configuration runs once per round), printed as
tokens/s (batch / step time) and as the ratio to mha's tokens/s.

    python benchmarks/decode_speed.py                   # CPU: caches 1k, 4k, 8k, 16k
    python benchmarks/decode_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from graphheads import (
    DecoderOnlyLM,
    GoHAttention,
    HeadGraph,
    ModelConfig,
    MoHAttention,
    MultiHeadAttention,
)
from graphheads.types import KVCache

D_MODEL, HEADS, SHARED, TOP_K, VOCAB = 512, 8, 2, 2, 256
KINDS = ("mha", "moh-dense", "moh", "goh")


def build_block(kind: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mha":
        module: torch.nn.Module = MultiHeadAttention(D_MODEL, HEADS)
    elif kind.startswith("moh"):
        execution = "dense" if kind == "moh-dense" else "auto"
        module = MoHAttention(D_MODEL, HEADS, SHARED, TOP_K, execution=execution)
    else:
        graph = HeadGraph.complete(HEADS, learnable="edge")
        module = GoHAttention(D_MODEL, HEADS, SHARED, TOP_K, graph)
    return module.to(device).eval()


def build_model(kind: str, cache_len: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    attention = "mha" if kind == "mha" else kind.split("-")[0]
    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=D_MODEL,
        num_heads=HEADS,
        num_layers=2,
        d_ff=4 * D_MODEL,
        max_seq_len=cache_len + 1,
        attention=attention,
        num_shared=SHARED,
        top_k=TOP_K,
        execution="dense" if kind == "moh-dense" else "auto",
    )
    return DecoderOnlyLM(config).to(device).eval()


def filled_cache(batch: int, length: int, device: str) -> KVCache:
    """A preallocated cache of ``length`` random tokens with room for one more."""
    cache = KVCache.empty(batch, HEADS, length + 1, D_MODEL // HEADS, device=device)
    shape = (batch, HEADS, length, D_MODEL // HEADS)
    return cache.append(torch.randn(shape, device=device), torch.randn(shape, device=device))


def step_fn(level: str, kind: str, batch: int, length: int, device: str) -> Callable[[], None]:
    """One decoding step (one new token per sequence) at cache length ``length``."""
    if level == "block":
        module = build_block(kind, device)
        cache = filled_cache(batch, length, device)
        x = torch.randn(batch, 1, D_MODEL, device=device)

        def run() -> None:
            assert cache.buffer is not None
            cache.buffer.filled = length  # the step writes its token at the same place
            module(x, kv_cache=cache, is_causal=True, use_cache=True)

        return run
    model = build_model(kind, length, device)
    assert isinstance(model, DecoderOnlyLM)
    caches = tuple(filled_cache(batch, length, device) for _ in model.decoder.layers)
    token = torch.randint(0, VOCAB, (batch, 1), device=device)

    def run_model() -> None:
        for c in caches:
            assert c.buffer is not None
            c.buffer.filled = length
        model(token, cache=caches, use_cache=True)

    return run_model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--levels", nargs="+", default=["block", "model"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args()
    print(
        f"# decode_speed: d_model {D_MODEL}, {HEADS} heads, {SHARED} shared + top-{TOP_K}, "
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = []
    with torch.no_grad():
        for level in args.levels:
            print(f"\n## {level}: tokens/s (ratio to mha)\n")
            print("| cache | batch | " + " | ".join(KINDS) + " |")
            print("| --- | --- |" + " --- |" * len(KINDS))
            for length in args.lengths:
                for batch in args.batches:
                    runs = {k: step_fn(level, k, batch, length, args.device) for k in KINDS}
                    times: dict[str, list[float]] = {k: [] for k in KINDS}
                    for run in runs.values():  # warm-up
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
                        f"{rate[k]:.0f}"
                        if k == "mha"
                        else f"{rate[k]:.0f} ({rate[k] / rate['mha']:.2f}x)"
                        for k in KINDS
                    ]
                    print(f"| {length} | {batch} | " + " | ".join(cells) + " |", flush=True)
                    results.append(
                        {"level": level, "cache": length, "batch": batch, "tokens_per_s": rate}
                    )
                    del runs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

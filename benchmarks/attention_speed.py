"""Attention-block speed and peak memory, measured side by side in one run.

Compares, for one attention block (d_model 256, 8 heads of width 32, ``--shared``
shared heads (default 1), causal self-attention, batch 2):

    mha         dense multi-head attention (PyTorch's fused SDPA kernel)
    moh         Mixture-of-Head attention, dense masked path
    goh-pyg     Graph-of-Heads, dense masked path, PyG GCNConv message passing (propagate)
    goh         Graph-of-Heads, dense masked path, HeadGCNConv (dense message_and_aggregate)
    goh-sparse  Graph-of-Heads (HeadGCNConv), sparse path: active heads only, backend
                "auto" (FlexAttention on CUDA, the chunked SDPA path elsewhere)
    goh-flex    the same sparse path with the FlexAttention backend forced; "n/a"
                where it cannot run (CPU training: it refuses autograd there)

over sequence lengths and active-head counts (by default 8/6/4/2 of 8 heads = 1 shared
+ 7/5/3/1 of the 7 routed heads). Times are medians of interleaved repeats (every
configuration runs once per round, so machine noise hits all alike) and are printed as
ratios to mha. Peak tensor memory of one step: on CUDA the allocator's peak, on CPU the
peak of the running sum of allocations and frees recorded by the PyTorch profiler.

    python benchmarks/attention_speed.py                # CPU, the grid below
    python benchmarks/attention_speed.py --device cuda  # GPU timings and memory
    # GoH / MoH at T 512 with 2 shared heads and top-2 (4 of 8 heads active):
    python benchmarks/attention_speed.py --lengths 512 --actives 4 --shared 2 \
        --repeats 21 --memory-lengths
    # what that ratio is made of: the same with --graph-layers 0 or 1, --feature-dim 8,
    # --compile (every block and router through torch.compile; --kinds without
    # goh-flex), or OMP_NUM_THREADS=1
    # the sparse backends at T 2048, half the heads (--kinds picks columns; mha first)
    python benchmarks/attention_speed.py --lengths 2048 --actives 4 --repeats 7 \
        --memory-lengths 2048 --kinds mha moh goh goh-sparse goh-flex
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch_geometric.nn import GCNConv

from graphheads import GoHAttention, HeadGraph, MoHAttention, MultiHeadAttention
from graphheads.flex import flex_supported

D_MODEL, HEADS, BATCH = 256, 8, 2
SHARED = 1  # set by --shared
FEATURE_DIM, GRAPH_LAYERS = 16, 2  # the GoH router's F and L, set by --feature-dim, --graph-layers
COMPILE = False  # set by --compile: every block (and router) through torch.compile
ALL_KINDS = ("mha", "moh", "goh-pyg", "goh", "goh-sparse", "goh-flex")
KINDS = ALL_KINDS  # set by --kinds


def build(kind: str, active: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    top_k = active - SHARED
    if kind == "mha":
        module: torch.nn.Module = MultiHeadAttention(D_MODEL, HEADS)
    elif kind == "moh":
        module = MoHAttention(D_MODEL, HEADS, SHARED, top_k)
    else:
        module = GoHAttention(
            D_MODEL,
            HEADS,
            SHARED,
            top_k,
            HeadGraph.complete(HEADS, learnable="edge"),
            feature_dim=FEATURE_DIM,
            graph_layers=GRAPH_LAYERS,
            conv=(lambda f: GCNConv(f, f, node_dim=-2)) if kind == "goh-pyg" else "gcn",
            execution="sparse" if kind in ("goh-sparse", "goh-flex") else "dense",
            sparse_backend="flex" if kind == "goh-flex" else "auto",
        )
    module = module.to(device)
    return torch.compile(module) if COMPILE else module


def step(module: torch.nn.Module, x: torch.Tensor, mode: str) -> None:
    if mode == "train":
        out = module(x, is_causal=True)
        loss = out.output.square().mean()
        if out.routing is not None:
            loss = loss + 0.01 * out.routing.load_balance_loss
        loss.backward()
    else:
        with torch.no_grad():
            module(x, is_causal=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def runs(kind: str, mode: str, device: str) -> bool:
    """Whether ``kind`` can run in ``mode`` here (forced FlexAttention may not)."""
    reason = flex_supported(torch.device(device), grad=mode == "train", dropout_p=0.0)
    return kind != "goh-flex" or reason is None


def time_grid(lengths: list[int], actives: list[int], mode: str, repeats: int, device: str) -> dict:
    results = {}
    for t in lengths:
        x = torch.randn(BATCH, t, D_MODEL, device=device, requires_grad=mode == "train")
        for active in actives:
            kinds = [k for k in KINDS if runs(k, mode, device)]
            modules = {k: build(k, active, device) for k in kinds}
            for k in kinds:  # warm-up
                step(modules[k], x, mode)
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(repeats):
                for k in kinds:
                    sync(device)
                    start = time.perf_counter()
                    step(modules[k], x, mode)
                    sync(device)
                    samples[k].append(time.perf_counter() - start)
            results[(t, active)] = samples
    return results


def time_routers(t: int, active: int, mode: str, repeats: int, device: str) -> dict:
    """Per-round times of the MoH and GoH routers alone (interleaved, as time_grid)."""
    x = torch.randn(BATCH, t, D_MODEL, device=device, requires_grad=mode == "train")
    routers = {k: build(k, active, device).router for k in ("moh", "goh")}
    if COMPILE:  # a compiled block's .router is the plain module
        routers = {k: torch.compile(r) for k, r in routers.items()}

    def run(router: torch.nn.Module) -> None:
        with torch.set_grad_enabled(mode == "train"):
            out = router(x)
            if mode == "train":
                (out.gates.square().sum() + out.load_balance_loss).backward()

    for router in routers.values():  # warm-up
        run(router)
    samples: dict[str, list[float]] = {k: [] for k in routers}
    for _ in range(repeats):
        for k, router in routers.items():
            sync(device)
            start = time.perf_counter()
            run(router)
            sync(device)
            samples[k].append(time.perf_counter() - start)
    return samples


def paired_ratio(samples: dict[str, list[float]], num: str, den: str) -> tuple[float, ...]:
    """Quartiles (25%, 50%, 75%) of the per-round ratios num/den: both ran back to back
    in every round, so a slow spell of the machine hits both (more robust under load
    than the ratio of the two medians)."""
    ratios = [a / b for a, b in zip(samples[num], samples[den], strict=True)]
    return tuple(statistics.quantiles(ratios, n=4)) if len(ratios) > 1 else (ratios[0],) * 3


def peak_memory(module: torch.nn.Module, x: torch.Tensor, mode: str, device: str) -> float:
    """Peak MiB of tensor memory allocated during one step (after a warm-up step): on
    CUDA the allocator's peak; on CPU the peak of the running sum of the allocations and
    frees the PyTorch profiler records."""
    step(module, x, mode)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(module, x, mode)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(module, x, mode)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument(
        "--actives", type=int, nargs="+", default=[8, 6, 4, 2], help="active heads of 8"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-lengths", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--feature-dim", type=int, default=16, help="GoH router node features F")
    parser.add_argument("--graph-layers", type=int, default=2, help="GoH message-passing layers L")
    parser.add_argument(
        "--compile", action="store_true", help="run every block and router through torch.compile"
    )
    parser.add_argument("--shared", type=int, default=1, help="shared heads of 8")
    parser.add_argument(
        "--kinds", nargs="+", default=list(ALL_KINDS), choices=ALL_KINDS, help="mha first"
    )
    parser.add_argument("--json", help="also write the raw numbers here")
    args = parser.parse_args()
    global SHARED, KINDS, FEATURE_DIM, GRAPH_LAYERS, COMPILE
    SHARED = args.shared
    FEATURE_DIM, GRAPH_LAYERS, COMPILE = args.feature_dim, args.graph_layers, args.compile
    KINDS = tuple(args.kinds)
    if KINDS[0] != "mha":
        parser.error("--kinds must start with mha (every ratio is to it)")
    if COMPILE and "goh-flex" in KINDS:  # it compiles FlexAttention itself; nesting fails
        parser.error("--compile: leave goh-flex out of --kinds (it compiles its own kernel)")
    if not all(SHARED < a <= HEADS for a in args.actives):
        parser.error(f"--actives must lie in ({SHARED}, {HEADS}] with --shared {SHARED}")
    torch.set_grad_enabled(True)
    print(
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"GoH feature_dim {FEATURE_DIM}, graph_layers {GRAPH_LAYERS}, shared heads {SHARED}"
        + (", torch.compile" if COMPILE else "")
    )
    raw: dict = {"time": {}, "memory": {}}
    for mode in ("train", "infer"):
        grid = time_grid(args.lengths, args.actives, mode, args.repeats, args.device)
        title = "forward + backward" if mode == "train" else "inference (forward, no grad)"
        print(f"\n### {title}: time relative to mha (lower is faster)\n")
        print("| T | active heads | mha ms | " + " | ".join(KINDS[1:]) + " |")
        print("| --- | --- | --- | " + " | ".join("---" for _ in KINDS[1:]) + " |")
        for (t, active), samples in grid.items():
            times = {k: statistics.median(v) for k, v in samples.items()}
            ratios = " | ".join(
                f"{times[k] / times['mha']:.2f}" if k in times else "n/a" for k in KINDS[1:]
            )
            print(f"| {t} | {active}/8 | {times['mha'] * 1e3:.1f} | {ratios} |")
            raw["time"][f"{mode}/{t}/{active}"] = times
        for (t, active), samples in grid.items():
            if t == 512 and {"goh", "moh"} <= set(KINDS):
                low, mid, high = paired_ratio(samples, "goh", "moh")
                print(
                    f"\nGoH / MoH block time at T=512, {active}/8 heads active ({title}): "
                    f"{mid:.3f} (median of {args.repeats} paired rounds; quartiles "
                    f"{low:.3f}-{high:.3f})"
                )
    if 512 in args.lengths:
        print("\n### routers alone at T=512 (all that differs between the GoH and MoH blocks)\n")
        for mode in ("train", "infer"):
            for active in args.actives:
                samples = time_routers(512, active, mode, args.repeats, args.device)
                med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
                extra = [g - m for g, m in zip(samples["goh"], samples["moh"], strict=True)]
                print(
                    f"{mode}, {active}/8 heads: MoH router {med['moh']:.2f} ms, GoH router "
                    f"{med['goh']:.2f} ms, GoH extra {statistics.median(extra) * 1e3:.2f} ms "
                    "(median of paired rounds)"
                )
    if args.memory_lengths:
        print("\n### peak tensor memory of one step, MiB\n")
        print("| mode | T | active heads | " + " | ".join(KINDS) + " |")
        print("| --- | --- | --- | " + " | ".join("---" for _ in KINDS) + " |")
        for mode in ("train", "infer"):
            for t in args.memory_lengths:
                x = torch.randn(
                    BATCH, t, D_MODEL, device=args.device, requires_grad=mode == "train"
                )
                for active in (8, 4):
                    cells = {
                        k: peak_memory(build(k, active, args.device), x, mode, args.device)
                        for k in KINDS
                        if runs(k, mode, args.device)
                    }
                    raw["memory"][f"{mode}/{t}/{active}"] = cells
                    print(
                        f"| {mode} | {t} | {active}/8 | "
                        + " | ".join(f"{cells[k]:.0f}" if k in cells else "n/a" for k in KINDS)
                        + " |"
                    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)


if __name__ == "__main__":
    main()

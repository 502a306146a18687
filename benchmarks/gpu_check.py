"""CUDA correctness checks for a GPU machine (the test suite runs on CPU).

Prints one line per check with the largest difference found (SKIP for what the device
cannot run); exits non-zero if any check fails. Passes on CPU too. Run before
`benchmarks/attention_speed.py --device cuda`:

    PYTHONPATH=. python benchmarks/gpu_check.py --device cuda
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu

Besides kernels against their oracles, it runs what only an accelerator shows (the test
suite checks the same logic on CPU with ``meta`` tensors, tests/test_meta_device.py):
every trainer collective through NCCL, DDP and FSDP2 under torchrun (two GPUs or more),
bf16 generation writing the cache in place, exact resume with dropout (the CUDA
generator) and fp16 (the loss scaler), fp32 routing under autocast, left padding on the
plain attention path, encoder-decoder training, and Megatron with Transformer Engine's
core attention when it is installed. Under ten minutes on one GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from graphheads import (
    DecoderOnlyLM,
    GoHAttention,
    HeadGraph,
    ModelConfig,
    MoHAttention,
    MultiHeadAttention,
)
from graphheads.data import IGNORE_INDEX, copy_task

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def mha_vs_torch(device: str) -> None:
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(64, 8, batch_first=True).to(device)
    mine = MultiHeadAttention(64, 8).to(device)
    mine.copy_from_torch(ref)
    x = torch.randn(4, 33, 64, device=device)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(33, device=device)
    diff = max_diff(
        mine(x, attn_mask=mask).output, ref(x, x, x, attn_mask=mask, need_weights=False)[0]
    )
    check("MultiHeadAttention == torch.nn.MultiheadAttention (causal)", diff < 1e-4, f"{diff:.2e}")


def sparse_vs_dense(device: str) -> None:
    """Both sparse backends (FlexAttention trains only on CUDA) against the dense path."""
    from graphheads.flex import flex_supported

    for kind in ("moh", "goh"):
        torch.manual_seed(0)
        if kind == "moh":
            attn = MoHAttention(128, 8, 2, 3)  # heads 16 wide: CUDA FlexAttention's least
        else:
            attn = GoHAttention(128, 8, 2, 3, HeadGraph.ring(8, learnable="edge"))
        attn = attn.to(device)
        with torch.no_grad():
            for p in attn.router.parameters():
                p.add_(torch.randn_like(p))
        x = torch.randn(3, 257, 128, device=device)
        for backend in ("chunked", "flex"):
            reason = flex_supported(torch.device(device), grad=True, dropout_p=0.0, head_dim=16)
            if backend == "flex" and reason is not None:
                print(f"SKIP  {kind} sparse ({backend}) == dense: {reason}")
                continue
            outs, grads = [], []
            for execution in ("dense", "sparse"):
                module = copy.deepcopy(attn)
                module.execution = execution
                module.sparse_backend = backend
                xi = x.clone().requires_grad_(True)
                out = module(xi, is_causal=True).output
                out.square().sum().backward()
                outs.append(out.detach())
                grads.append(xi.grad)
            d_out, d_grad = max_diff(*outs), max_diff(*grads)
            check(
                f"{kind} sparse ({backend}) == dense (outputs, input grads)",
                d_out < 1e-4 and d_grad < 1e-3,
                f"{d_out:.2e}, {d_grad:.2e}",
            )


def lm_training(device: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=12,
        d_model=64,
        num_heads=8,
        num_layers=2,
        d_ff=128,
        max_seq_len=32,
        norm_first=True,
        attention="goh",
        num_shared=2,
        top_k=3,
    )
    model = DecoderOnlyLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        batch = copy_task(32, 6, 12, generator=gen)
        out = model(batch.inputs.to(device))
        loss = F.cross_entropy(
            out.logits.flatten(0, 1), batch.targets.to(device).flatten(), ignore_index=IGNORE_INDEX
        ) + 0.01 * out.aux_loss / len(out.routing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    check(
        "GoH LM learns the copy task on the device",
        losses[-1] < 0.3,
        f"loss {losses[0]:.2f} -> {losses[-1]:.3f}",
    )
    model.eval()
    tokens = copy_task(4, 6, 12, generator=gen).inputs.to(device)
    full = model(tokens).logits
    first = model(tokens[:, :5], use_cache=True)
    rest = model(tokens[:, 5:], cache=first.cache, use_cache=True)
    diff = max_diff(torch.cat([first.logits, rest.logits], 1), full)
    check("cached decoding == full forward", diff < 1e-4, f"{diff:.2e}")


def hf_conversion(device: str) -> None:
    try:
        import transformers

        from graphheads.integrations.hf import convert_to_goh
    except ImportError as err:
        print(f"SKIP  Hugging Face conversion: {err}")
        return
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    original = transformers.LlamaForCausalLM(cfg).to(device).eval()
    converted = convert_to_goh(copy.deepcopy(original), num_shared=2, top_k=6)
    tokens = torch.randint(0, 100, (2, 17), device=device)
    with torch.no_grad():
        diff = max_diff(converted(tokens).logits, original(tokens).logits)
    check("converted Llama (all heads on) == original", diff < 1e-4, f"{diff:.2e}")


def trainer_runtime(device: str) -> None:
    """The Trainer on the device: fp32 vs bf16 (one step), compiled vs eager (3 steps),
    DDP at world size 1 (NCCL on CUDA, gloo on CPU); fp16 only on CUDA."""
    import torch.distributed as dist

    from graphheads.train import RunConfig, Trainer

    small = ["model.d_model=32", "model.num_heads=4", "model.num_shared=1", "model.top_k=2"]
    small += ["model.attention=goh", "train.batch_size=16", f"train.device={device}"]

    def losses(*extra: str, steps: int = 3) -> list[float]:
        trainer = Trainer(RunConfig.load(None, [*small, *extra]), None, progress=False)
        out = []
        for step in range(steps):
            batch = trainer.data.sample(16, torch.Generator().manual_seed(step))
            out.append(trainer._read_metrics(trainer.train_step(batch))["loss"])
        return out

    fp32 = losses()
    bf16 = losses("train.precision=bf16", steps=1)
    check(
        "trainer bf16 vs fp32",
        abs(bf16[0] - fp32[0]) < 2e-2 * fp32[0],
        f"{bf16[0]:.4f} vs {fp32[0]:.4f}",
    )
    if device == "cuda":
        fp16 = losses("train.precision=fp16", steps=1)
        check("trainer fp16 vs fp32", abs(fp16[0] - fp32[0]) < 2e-2 * fp32[0], f"{fp16[0]:.4f}")
    else:
        print("SKIP  trainer fp16: CUDA only")
    compiled = losses("train.compile=true")
    diff = max(abs(a - b) for a, b in zip(compiled, fp32, strict=True))
    check("trainer compiled vs eager", diff < 1e-3, f"max loss difference {diff:.2e}")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        ddp = losses()
    finally:
        dist.destroy_process_group()
        os.environ["WORLD_SIZE"] = "1"
    diff = max(abs(a - b) for a, b in zip(ddp, fp32, strict=True))
    check("trainer DDP world size 1 vs single process", diff < 1e-5, f"{diff:.2e}")


SMALL_RUN = [
    "model.d_model=32",
    "model.num_heads=4",
    "model.num_shared=1",
    "model.top_k=2",
    "model.attention=goh",
    "train.batch_size=16",
]


def trainer_collectives(device: str) -> None:
    """Every collective the trainer makes, through the device's backend (NCCL on CUDA,
    which refuses CPU tensors) and the stop flag's gloo group: a process group of one
    rank, the trainer told it has two, so its bias-count all-reduce and its stop
    agreement run."""
    import torch.distributed as dist

    from graphheads.train import RunConfig, Trainer
    from graphheads.train.runtime import StopSignals

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29534")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        sets = [*SMALL_RUN, "model.balance=bias", f"train.device={device}"]
        trainer = Trainer(RunConfig.load(None, sets), None, progress=False)
        trainer.world_size = 2  # every collective runs (on a group of one)
        trainer.cpu_group = dist.new_group(backend="gloo")  # as under torchrun on GPUs
        for step in range(3):
            trainer.train_step(trainer.data.sample(16, torch.Generator().manual_seed(step)))
        stop = trainer._stop_requested(StopSignals())
        bias = trainer.model.decoder.layers[0].self_attn.router.selection_bias
        check(
            "trainer collectives on the device's backend",
            not stop and bias.abs().sum() > 0,
            f"bias on {bias.device}, |bias| {float(bias.abs().sum()):.3f}",
        )
    finally:
        dist.destroy_process_group()


def torchrun_parallel(device: str) -> None:
    """``graphheads train`` under torchrun, DDP and FSDP2, balance by bias: in fp32 the
    checkpoint (rank 0's selection bias among it) equals the single process's; on CUDA
    the documented bf16 run finishes too (NCCL for every collective)."""
    if device == "cuda" and torch.cuda.device_count() < 2:
        print("SKIP  torchrun DDP/FSDP2 with NCCL: needs two GPUs (NCCL puts one rank per GPU)")
        return
    from graphheads.train import load_checkpoint

    sets = [*SMALL_RUN, "model.balance=bias", "train.steps=20", "train.eval_every=20"]
    sets.append(f"train.device={'auto' if device == 'cuda' else 'cpu'}")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc_per_node=2", "-m", "graphheads", "train", "--quiet", "--no-report"]
    single = [sys.executable, "-m", "graphheads", "train", "--quiet", "--no-report"]
    precisions = ["fp32", "bf16"] if device == "cuda" else ["fp32"]
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            args = [x for a in [*sets, f"train.precision={precision}"] for x in ("--set", a)]
            reference = Path(tmp, f"single-{precision}")
            subprocess.run(
                [*single, "--out", str(reference), *args], check=True, stdout=subprocess.DEVNULL
            )
            weights = load_checkpoint(reference)["model"]
            for parallel in ("ddp", "fsdp"):
                out = Path(tmp, f"{parallel}-{precision}")
                run = subprocess.run(
                    [*launcher, "--out", str(out), *args, "--set", f"train.parallel={parallel}"],
                    capture_output=True,
                    text=True,
                )
                name = f"torchrun {parallel} ({precision})"
                if run.returncode or precision != "fp32":
                    check(f"{name} finishes", run.returncode == 0, run.stderr[-300:] or "exit 0")
                    continue
                state = load_checkpoint(out)["model"]
                keys = [k for k in state if k.endswith("selection_bias")]
                diff = max(max_diff(state[k], weights[k]) for k in keys)
                check(f"{name}: the single process's selection bias", diff < 1e-6, f"{diff:.2e}")


def small_goh_lm(device: str, **config: object) -> DecoderOnlyLM:
    """A seeded 2-layer GoH LM of width 64 (8 heads, 2 shared) in eval mode on ``device``."""
    torch.manual_seed(0)
    values = {"d_model": 64, "num_heads": 8, "num_layers": 2, "attention": "goh"}
    model = DecoderOnlyLM(ModelConfig(**{**values, "num_shared": 2, **config}))  # type: ignore[arg-type]
    return model.to(device).eval()


def bf16_generate_in_place(device: str) -> None:
    from graphheads.types import KVCache

    model = small_goh_lm(device, vocab_size=40, top_k=2, block="llama")
    appends: list[bool] = []
    real = KVCache.append

    def append(self: KVCache, key: torch.Tensor, value: torch.Tensor) -> KVCache:
        out = real(self, key, value)
        appends.append(out.buffer is not None and out.key.dtype == torch.bfloat16)
        return out

    KVCache.append = append  # type: ignore[method-assign]
    try:
        with torch.autocast(device, dtype=torch.bfloat16):
            model.generate(torch.randint(0, 40, (2, 5), device=device), 16)
    finally:
        KVCache.append = real  # type: ignore[method-assign]
    check(
        "bf16 generate writes the cache in place",
        all(appends) and len(appends) == 32,
        f"{sum(appends)} of {len(appends)} appends in place, in bf16",
    )


def compiled_routed_decoding(device: str) -> None:
    """A compiled one-token step through the routed decoding kernel equals the dense one
    (CUDA: Triton kernels with indexed loads), and how their times compare at a long
    cache: the numbers that set graphheads.sparse.DECODE_MIN_SKIPPED_BYTES["cuda"]."""
    import time

    from graphheads.sparse import DECODE_MIN_SKIPPED_BYTES

    saved = dict(DECODE_MIN_SKIPPED_BYTES)
    results = {}
    try:
        for name, threshold in (("dense", float("inf")), ("routed", 0)):
            DECODE_MIN_SKIPPED_BYTES[device] = threshold  # type: ignore[assignment]
            torch._dynamo.reset()
            model = small_goh_lm(device, vocab_size=64, d_model=512, top_k=2, max_seq_len=8200)
            compiled = torch.compile(model, dynamic=True)
            tokens = torch.randint(0, 64, (8, 8192), device=device)
            with torch.no_grad():
                cache = model(tokens[:, :-1], use_cache=True).cache
                times = []
                for _ in range(12):
                    torch.cuda.synchronize() if device == "cuda" else None
                    start = time.perf_counter()
                    logits = compiled(tokens[:, -1:], cache=cache).logits[:, 0]
                    torch.cuda.synchronize() if device == "cuda" else None
                    times.append(time.perf_counter() - start)
            results[name] = (logits.float(), sorted(times)[len(times) // 2])
    finally:
        DECODE_MIN_SKIPPED_BYTES.update(saved)
    diff = max_diff(results["routed"][0], results["dense"][0])
    ratio = results["dense"][1] / results["routed"][1]
    check(
        "compiled routed decoding == dense (8k cache, batch 8, 4 of 8 heads)",
        diff < 1e-3,
        f"{diff:.2e}; routed runs at {ratio:.2f}x dense's speed",
    )


def exact_resume(device: str) -> None:
    """Dropout on the device and (CUDA) fp16: 12 steps equal 6, a checkpoint, 6 more. The
    fp16 loss scaler doubles its scale every step (growth_interval 1), so a resume that
    lost its state would end with another scale."""
    import graphheads.train.trainer as trainer_module
    from graphheads.train import RunConfig, Trainer

    def growing_scaler(precision: str, dev: torch.device) -> torch.amp.GradScaler | None:
        if precision != "fp16":
            return None
        return torch.amp.GradScaler(dev.type, init_scale=2.0**8, growth_interval=1)

    trainer_module.grad_scaler = growing_scaler  # this process only

    precisions = ["fp32", "fp16"] if device == "cuda" else ["fp32"]
    for precision in precisions:
        sets = [
            *SMALL_RUN,
            "model.dropout=0.1",
            "train.log_every=1",
            "train.checkpoint_every=6",
            f"train.device={device}",
            f"train.precision={precision}",
        ]
        with tempfile.TemporaryDirectory() as tmp:
            whole = Trainer(
                RunConfig.load(None, [*sets, "train.steps=12"]), Path(tmp, "a"), progress=False
            )
            whole.fit()
            half = Trainer(
                RunConfig.load(None, [*sets, "train.steps=6"]), Path(tmp, "b"), progress=False
            )
            half.fit()
            rest = Trainer(
                RunConfig.load(None, [*sets, "train.steps=12"]), Path(tmp, "b"), progress=False
            )
            rest.fit()
            losses = [
                [
                    r["loss"]
                    for r in map(json.loads, Path(tmp, run, "metrics.jsonl").open())
                    if r["kind"] == "train"
                ]
                for run in ("a", "b")
            ]
            same = len(losses[0]) == len(losses[1]) == 12 and all(
                abs(a - b) <= 1e-5 * abs(a) for a, b in zip(*losses, strict=True)
            )
            scale = ""
            if rest.scaler is not None and whole.scaler is not None:
                scales = (rest.scaler.get_scale(), whole.scaler.get_scale())
                same = same and scales[0] == scales[1] != 2.0**8
                scale = f", loss scale {scales[0]:.0f} (uninterrupted {scales[1]:.0f})"
            check(
                f"exact resume with dropout ({precision})", same, f"{len(losses[1])} losses{scale}"
            )


def routing_precision(device: str) -> None:
    torch.manual_seed(0)
    attn = GoHAttention(64, 8, 2, 3, graph_scale_init=1.0).to(device)
    x = torch.randn(4, 1024, 64, device=device)
    fp32 = attn.router(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed = attn.router(x)
    same = torch.equal(mixed.routed_mask, fp32.routed_mask)
    check(
        "routing under bf16 autocast == fp32 routing",
        same,
        f"{max_diff(mixed.router_probs, fp32.router_probs):.2e}",
    )


def left_padding_plain_path(device: str) -> None:
    model = small_goh_lm(device, vocab_size=20, top_k=3)
    tokens = torch.randint(0, 20, (2, 9), device=device)
    padding = torch.zeros(2, 9, dtype=torch.bool, device=device)
    padding[0, :3] = True
    fused = model(tokens, key_padding_mask=padding).logits
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.fused_attention = False
    plain = model(tokens, key_padding_mask=padding).logits
    diff = max_diff(plain, fused)
    check(
        "plain attention == fused with left padding",
        bool(plain.isfinite().all()) and diff < 1e-4,
        f"{diff:.2e}",
    )


def seq2seq_training(device: str) -> None:
    from graphheads.train import RunConfig, Trainer

    sets = [*SMALL_RUN, "train.model_type=seq2seq", f"train.device={device}", "train.steps=40"]
    trainer = Trainer(RunConfig.load(None, sets), None, progress=False)
    losses = [
        trainer._read_metrics(
            trainer.train_step(trainer.data.sample(16, torch.Generator().manual_seed(s)))
        )["loss"]
        for s in range(40)
    ]
    check(
        "encoder-decoder trains on the device",
        losses[-1] < losses[0],
        f"loss {losses[0]:.2f} -> {losses[-1]:.2f}",
    )


def megatron_core_attention(device: str) -> None:
    """A Megatron GoH GPT with Transformer Engine's core attention against the same GPT
    with graphheads' SDPA core attention (TP 1)."""
    try:
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        from graphheads.integrations.megatron import build_gpt
    except ImportError as err:
        print(f"SKIP  Megatron with Transformer Engine: {err}")
        return
    if device != "cuda":
        print("SKIP  Megatron with Transformer Engine: CUDA only")
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29535")
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        config = ModelConfig.llama(
            "llama-10m",
            vocab_size=64,
            d_model=64,
            num_heads=8,
            num_kv_heads=4,
            num_layers=2,
            d_ff=128,
            max_seq_len=32,
            attention="goh",
            num_shared=2,
            top_k=3,
        )
        torch.manual_seed(0)
        sdpa = build_gpt(config, bf16=True, params_dtype=torch.bfloat16).to(device)
        torch.manual_seed(0)
        te = build_gpt(
            config, core_attention=TEDotProductAttention, bf16=True, params_dtype=torch.bfloat16
        ).to(device)
        te.load_state_dict(sdpa.state_dict(), strict=False)
        ids = torch.randint(0, 64, (2, 32), device=device)
        positions = torch.arange(32, device=device).expand(2, -1)
        diff = max_diff(te(ids, positions, None), sdpa(ids, positions, None))
        check("Megatron GoH GPT: TE core attention == SDPA (bf16)", diff < 5e-2, f"{diff:.2e}")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}", end="")
    if args.device == "cuda":
        print(f" ({torch.cuda.get_device_name()})", end="")
    print()
    torch.backends.cuda.matmul.allow_tf32 = False  # compare in true float32
    torch.backends.cudnn.allow_tf32 = False
    checks = (
        mha_vs_torch,
        sparse_vs_dense,
        lm_training,
        hf_conversion,
        trainer_runtime,
        trainer_collectives,
        torchrun_parallel,
        bf16_generate_in_place,
        compiled_routed_decoding,
        exact_resume,
        routing_precision,
        left_padding_plain_path,
        seq2seq_training,
        megatron_core_attention,
    )
    for fn in checks:
        try:
            fn(args.device)
        except Exception as err:  # report and go on to the next check
            check(fn.__name__, False, f"{type(err).__name__}: {err}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()

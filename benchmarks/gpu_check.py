"""CUDA correctness checks for a GPU machine (the test suite runs on CPU).

Prints one line per check with the largest difference found (SKIP for what the device
cannot run); exits non-zero if any check fails. Passes on CPU too. Run before
`benchmarks/attention_speed.py --device cuda`:

    PYTHONPATH=. python benchmarks/gpu_check.py --device cuda
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu
"""

from __future__ import annotations

import argparse
import copy
import sys

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
            attn = MoHAttention(64, 8, 2, 3)
        else:
            attn = GoHAttention(64, 8, 2, 3, HeadGraph.ring(8, learnable="edge"))
        attn = attn.to(device)
        with torch.no_grad():
            for p in attn.router.parameters():
                p.add_(torch.randn_like(p))
        x = torch.randn(3, 257, 64, device=device)
        for backend in ("chunked", "flex"):
            reason = flex_supported(torch.device(device), grad=True, dropout_p=0.0)
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
    import os

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
    for fn in (mha_vs_torch, sparse_vs_dense, lm_training, hf_conversion, trainer_runtime):
        try:
            fn(args.device)
        except Exception as err:  # report and go on to the next check
            check(fn.__name__, False, f"{type(err).__name__}: {err}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()

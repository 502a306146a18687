"""CUDA correctness checks for a GPU machine (the test suite runs on CPU).

Prints one line per check with the largest difference found; exits non-zero if any
check fails. Run before `benchmarks/attention_speed.py --device cuda`:

    PYTHONPATH=. python benchmarks/gpu_check.py --device cuda
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
        outs, grads = [], []
        for execution in ("dense", "sparse"):
            module = copy.deepcopy(attn)
            module.execution = execution
            xi = x.clone().requires_grad_(True)
            out = module(xi, is_causal=True).output
            out.square().sum().backward()
            outs.append(out.detach())
            grads.append(xi.grad)
        d_out, d_grad = max_diff(*outs), max_diff(*grads)
        check(
            f"{kind} sparse == dense (outputs, input grads)",
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
    for fn in (mha_vs_torch, sparse_vs_dense, lm_training, hf_conversion):
        try:
            fn(args.device)
        except Exception as err:  # report and go on to the next check
            check(fn.__name__, False, f"{type(err).__name__}: {err}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()

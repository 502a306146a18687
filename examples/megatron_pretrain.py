"""Pretrain a small Graph-of-Heads GPT with megatron-core on graphheads' built-in task suite.

    pip install -e ".[megatron]"
    # CPU, gloo, tensor parallelism 2:
    torchrun --standalone --nproc_per_node 2 examples/megatron_pretrain.py --tensor-parallel 2
    # one node of GPUs, NCCL, TP 2 x data parallelism 4:
    torchrun --standalone --nproc_per_node 8 examples/megatron_pretrain.py --tensor-parallel 2

The model is Megatron's ``GPTModel`` with graphheads' routed self-attention in every layer
(:func:`graphheads.integrations.megatron.build_gpt`), tensor-parallel across
``--tensor-parallel`` ranks and data-parallel across the rest. The loop is deliberately
plain (AdamW, a data-parallel gradient all-reduce): Megatron's own DDP, distributed
optimizer and pipeline schedules allocate CUDA buffers, so they run only on GPUs; there,
hand ``build_gpt`` (or the layer specs) to Megatron-LM's ``pretrain_gpt.py`` instead.
Rank 0 prints the loss and writes ``--out`` (JSON) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from graphheads import ModelConfig
from graphheads.data.tasks import IGNORE_INDEX, TaskSuite
from graphheads.integrations.megatron import AUX_LOSS_NAME, build_gpt


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--attention", choices=["mha", "moh", "goh"], default="goh")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32, help="per data-parallel rank")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--out", type=Path, help="metrics JSON written by rank 0")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    if world % args.tensor_parallel:
        raise ValueError(f"--tensor-parallel {args.tensor_parallel} must divide {world} ranks")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_parallel)
    torch.manual_seed(args.seed)  # the same on every rank: replicated weights agree
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    device = torch.device("cuda" if cuda else "cpu")

    suite = TaskSuite()
    # Megatron splits the vocabulary over tensor-parallel ranks: pad it as Megatron-LM does
    vocab = -(-suite.vocab_size // 64) * 64
    config = ModelConfig.llama(
        "llama-10m",
        vocab_size=vocab,
        d_model=128,
        num_heads=8,
        num_kv_heads=4,
        num_layers=2,
        d_ff=256,
        max_seq_len=suite.max_seq_len,
        attention=args.attention,
        num_shared=2 if args.attention != "mha" else 0,
        top_k=3 if args.attention != "mha" else None,
    )
    model = build_gpt(config, load_balance_coeff=0.01).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    dp_group = parallel_state.get_data_parallel_group()
    dp_size = parallel_state.get_data_parallel_world_size()
    # one micro-batch per step: the head load-balance loss is scaled as the main loss is
    init_num_microbatches_calculator(
        dist.get_rank(), None, args.batch_size * dp_size, args.batch_size, dp_size
    )
    # every tensor-parallel rank of one replica reads the same batches
    generator = torch.Generator().manual_seed(args.seed + parallel_state.get_data_parallel_rank())
    positions = torch.arange(suite.max_seq_len, device=device).expand(args.batch_size, -1)

    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = suite.sample(args.batch_size, generator).to(device)
        scored = batch.targets != IGNORE_INDEX
        clear_aux_losses_tracker()
        per_token = model(batch.inputs, positions, None, labels=batch.targets.clamp(min=0))
        loss = (per_token * scored).sum() / scored.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dp_size > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=dp_group)
                    p.grad /= dp_size
        optimizer.step()
        losses.append(loss.item())
        if dist.get_rank() == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step:5d}  loss {losses[-1]:.4f}", flush=True)
    elapsed = time.perf_counter() - start
    balance = get_moe_layer_wise_logging_tracker().get(AUX_LOSS_NAME)
    metrics = {
        "attention": args.attention,
        "tensor_parallel": args.tensor_parallel,
        "data_parallel": dp_size,
        "steps": args.steps,
        "device": device.type,
        "loss": losses,
        "tokens_per_s": args.steps * args.batch_size * dp_size * suite.max_seq_len / elapsed,
        "head_load_balancing_loss": (0.0 if balance is None else balance["values"].mean().item()),
    }
    if dist.get_rank() == 0:
        print(
            f"{args.attention}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"{metrics['tokens_per_s']:,.0f} tokens/s on {world} {device.type} ranks"
        )
        if args.out is not None:
            partial = args.out.with_name(args.out.name + ".partial")
            partial.write_text(json.dumps(metrics, indent=1))
            partial.replace(args.out)  # never a half-written file
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

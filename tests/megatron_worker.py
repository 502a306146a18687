"""Run under torchrun by tests/test_megatron.py: a tiny GoH GPT (megatron-core, gloo, CPU)
at tensor-parallel size = world size; writes the full logits, loss and gradients
(tensor-parallel shards gathered into the TP-1 layout) and every rank's router gradients.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N \
    tests/megatron_worker.py OUT.pt [--reverse-local-heads]

``--reverse-local-heads`` swaps each rank's gate columns (local head j gets the gate of
local head heads_local - 1 - j): the wrong mapping, which the tests must notice.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from graphheads import ModelConfig
from graphheads.integrations.megatron import attention as megatron_attention
from graphheads.integrations.megatron import build_gpt


def gather(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A tensor-parallel shard's tensor in the TP-1 layout (strided shards de-interleaved)."""
    if not getattr(param, "tensor_model_parallel", False):
        return grad
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, grad.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([piece[s] for s in range(stride) for piece in pieces], dim=dim)


def main() -> None:
    out_path = sys.argv[1]
    if "--reverse-local-heads" in sys.argv:
        original = megatron_attention.local_head_gates

        def reversed_heads(gates: torch.Tensor, rank: int, heads_local: int) -> torch.Tensor:
            return original(gates, rank, heads_local).flip(-1)

        megatron_attention.local_head_gates = reversed_heads
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    torch.manual_seed(0)
    config = ModelConfig.llama(
        "llama-10m",
        vocab_size=64,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        num_layers=2,
        d_ff=64,
        max_seq_len=32,
        attention="goh",
        num_shared=1,
        top_k=2,
        graph_scale_init=0.5,
    )
    gpt = build_gpt(config)  # CPU initialisation: every TP size slices the same weights
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(2, -1)
    logits = gpt(ids, positions, None)  # (b, s, V / tp)
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits.detach().contiguous(), group=group)
    loss = gpt(ids, positions, None, labels=ids.roll(-1, dims=1)).mean()
    loss.backward()
    rank = dist.get_rank()
    result = {
        "logits": torch.cat(parts, dim=-1),
        "loss": loss.detach(),
        "grads": {name: gather(p, p.grad) for name, p in gpt.named_parameters()},
        "router_grads": {
            name: p.grad.clone() for name, p in gpt.named_parameters() if ".router." in name
        },
    }
    torch.save(result, f"{out_path}.rank{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run under torchrun by tests/test_megatron.py: a tiny GoH GPT (megatron-core, gloo, CPU)
at tensor-parallel size = world size, or pipeline-parallel size = world size with
``--pipeline``; writes the logits, loss and gradients in the TP-1 layout (tensor-parallel
shards gathered, pipeline stages' layers under their global index) and every rank's
router gradients, to OUT.pt.rankR.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N \
    tests/megatron_worker.py OUT [--reverse-local-heads] [--pipeline WEIGHTS] [--kv-heads G]

The TP-1 run also writes its weights to OUT.weights, which ``--pipeline`` loads.

The pipeline run passes activations and their gradients between the stages with plain
send/recv (Megatron's pipeline schedules need CUDA).

``--reverse-local-heads`` swaps each rank's gate columns (local head j gets the gate of
local head heads_local - 1 - j): the wrong mapping, which the tests must notice.
"""

from __future__ import annotations

import argparse
import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

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


def global_name(name: str, offset: int) -> str:
    """A pipeline stage's parameter name with its layer index made global."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if match is None:
        return name
    return f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--reverse-local-heads", action="store_true")
    parser.add_argument("--pipeline", help="the TP-1 run's weights file")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value groups")
    args = parser.parse_args()
    out_path = args.out
    if args.reverse_local_heads:
        original = megatron_attention.local_head_gates

        def reversed_heads(gates: torch.Tensor, rank: int, heads_local: int) -> torch.Tensor:
            return original(gates, rank, heads_local).flip(-1)

        megatron_attention.local_head_gates = reversed_heads
    if not torch.cuda.is_available():
        # megatron-core allocates the all-gather buffer of a key/value group shared by
        # several ranks on torch.cuda.current_device(): on a CPU-only machine, the CPU
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    pipeline = args.pipeline is not None
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1 if pipeline else world,
        pipeline_model_parallel_size=world if pipeline else 1,
    )
    torch.manual_seed(0)
    config = ModelConfig.llama(
        "llama-10m",
        vocab_size=64,
        d_model=32,
        num_heads=4,
        num_kv_heads=args.kv_heads,
        num_layers=2,
        d_ff=64,
        max_seq_len=32,
        attention="goh",
        num_shared=1,
        top_k=2,
        graph_scale_init=0.5,
    )
    # CPU initialisation: every tensor-parallel split gets slices of the same weights;
    # pipeline stages build only their layers, so they load the TP-1 run's weights
    gpt = build_gpt(config, init_method_std=0.3)  # O(1) logits: differences show
    offset = get_transformer_layer_offset(gpt.config)
    if pipeline:
        weights = torch.load(args.pipeline, weights_only=True)
        with torch.no_grad():
            for name, p in gpt.named_parameters():
                p.copy_(weights[global_name(name, offset)])
    elif world == 1:
        torch.save(dict(gpt.named_parameters()), f"{out_path}.weights")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(2, -1)
    labels = ids.roll(-1, dims=1)
    rank = dist.get_rank()
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    result: dict = {}
    if not first:  # the previous stage's activations [s, b, d]
        received = torch.empty(12, 2, 32)
        dist.recv(received, src=rank - 1)
        received.requires_grad_(True)
        gpt.set_input_tensor(received)
    out = gpt(ids, positions, None)
    if last:
        loss = tensor_parallel.vocab_parallel_cross_entropy(out, labels).mean()
        loss.backward()
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, out.detach().contiguous(), group=group)
        result["logits"] = torch.cat(parts, dim=-1)
        result["loss"] = loss.detach()
    else:
        dist.send(out.detach(), dst=rank + 1)
        grad = torch.empty_like(out)
        dist.recv(grad, src=rank + 1)
        out.backward(grad)
    if not first:
        dist.send(received.grad, dst=rank - 1)
    result["grads"] = {global_name(n, offset): gather(p, p.grad) for n, p in gpt.named_parameters()}
    result["router_grads"] = {
        global_name(n, offset): p.grad.clone() for n, p in gpt.named_parameters() if ".router." in n
    }
    torch.save(result, f"{out_path}.rank{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run under torchrun by tests/test_train.py: trains a small MoH model with
``balance=bias`` (DDP or FSDP2, gloo) and writes every rank's selection biases, gathered
on rank 0, to OUT.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 \
    tests/bias_worker.py OUT PARALLEL
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from graphheads.train import RunConfig, Trainer


def main() -> None:
    out, parallel = sys.argv[1], sys.argv[2]
    sets = ["model.d_model=32", "model.num_heads=8", "model.num_shared=2", "model.top_k=2",
            "model.attention=moh", "model.balance=bias", "train.batch_size=16",
            "train.steps=15", "train.eval_every=15", "train.eval_batches=1",
            f"train.parallel={parallel}"]  # fmt: skip
    trainer = Trainer(RunConfig.load(None, sets), None, progress=False)
    trainer.fit()
    biases = torch.cat(
        [b for name, b in trainer.model.named_buffers() if name.endswith("selection_bias")]
    )
    gathered = [torch.empty_like(biases) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, biases)
    if dist.get_rank() == 0:
        torch.save(torch.stack(gathered), out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

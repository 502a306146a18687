"""Seeded synthetic sequence tasks for decoder-only language models.

Each task returns a :class:`TaskBatch`: ``inputs`` (b, t) token ids and ``targets`` (b, t),
the next token at every position, with :data:`IGNORE_INDEX` where no prediction is scored
(the prompt part), so ``F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
ignore_index=IGNORE_INDEX)`` scores only the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "TaskBatch", "copy_task"]

IGNORE_INDEX = -100


@dataclass
class TaskBatch:
    inputs: Tensor  # (b, t) token ids
    targets: Tensor  # (b, t) next-token targets, IGNORE_INDEX where unscored


def copy_task(
    batch_size: int, length: int, vocab_size: int, *, generator: torch.Generator | None = None
) -> TaskBatch:
    """``x_1 .. x_n SEP x_1 .. x_n``: the model must repeat the ``n`` symbols after SEP.

    Token ``0`` is the separator; symbols are drawn from ``1 .. vocab_size - 1``. The
    sequence has ``2 n + 1`` tokens; inputs drop the last, targets score the copy.
    """
    if length < 1 or vocab_size < 3 or batch_size < 1:
        raise ValueError(
            f"copy_task: need batch_size >= 1, length >= 1 and vocab_size >= 3, got "
            f"batch_size={batch_size}, length={length}, vocab_size={vocab_size}"
        )
    symbols = torch.randint(1, vocab_size, (batch_size, length), generator=generator)
    sep = torch.zeros(batch_size, 1, dtype=torch.long)
    seq = torch.cat([symbols, sep, symbols], dim=1)  # (b, 2n + 1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, :length] = IGNORE_INDEX  # only the copy after SEP is scored
    return TaskBatch(inputs, targets)

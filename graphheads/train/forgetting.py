"""Methods against forgetting for continual learning: experience replay, elastic weight
consolidation, and protection of the routed heads earlier tasks used most.

Each keeps its state in tensors and plain containers, so a checkpoint holds it
(``state_dict`` / ``load_state_dict``), and none changes a model except through the
calls named here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphheads.data.tasks import IGNORE_INDEX, PAD, TaskBatch
from graphheads.routed import RoutedAttention

__all__ = ["EWC", "HeadProtection", "ReplayBuffer", "pad_batch", "padding_mask", "top_used_heads"]


def padding_mask(batch: TaskBatch) -> Tensor:
    """The batch's padding mask (b, t), all False when it has none."""
    if batch.padding is None:
        return torch.zeros_like(batch.inputs, dtype=torch.bool)
    return batch.padding


def pad_batch(batch: TaskBatch, width: int) -> TaskBatch:
    """The batch right-padded to ``width`` tokens (PAD inputs, ignored targets)."""
    extra = width - batch.inputs.size(1)
    if extra < 0:
        raise ValueError(f"pad_batch: the batch has {batch.inputs.size(1)} tokens > {width}")
    if extra == 0:
        return batch
    return TaskBatch(
        F.pad(batch.inputs, (0, extra), value=PAD),
        F.pad(batch.targets, (0, extra), value=IGNORE_INDEX),
        batch.task_ids,
        F.pad(padding_mask(batch), (0, extra), value=True),
    )


class ReplayBuffer:
    """Examples kept from finished stages; :meth:`mix` puts some of them into a batch."""

    def __init__(self) -> None:
        self.rows: TaskBatch | None = None

    def __len__(self) -> int:
        return 0 if self.rows is None else self.rows.inputs.size(0)

    def add(self, batch: TaskBatch) -> None:
        """Keep ``batch`` (task ids required: mixed batches keep naming their tasks)."""
        if batch.task_ids is None:
            raise ValueError("ReplayBuffer.add: the examples need task_ids")
        if self.rows is None:
            self.rows = batch
            return
        width = max(self.rows.inputs.size(1), batch.inputs.size(1))
        old, new = pad_batch(self.rows, width), pad_batch(batch, width)
        self.rows = TaskBatch(
            *(torch.cat([a, b]) for a, b in zip(_fields(old), _fields(new), strict=True))
        )

    def mix(self, batch: TaskBatch, fraction: float, generator: torch.Generator) -> TaskBatch:
        """``batch`` with its first ``round(fraction * rows)`` rows replaced by buffered
        examples drawn uniformly (the batch unchanged while the buffer is empty)."""
        n = round(fraction * batch.inputs.size(0))
        if self.rows is None or n == 0:
            return batch
        pick = torch.randint(0, len(self), (n,), generator=generator)
        width = max(self.rows.inputs.size(1), batch.inputs.size(1))
        old, new = pad_batch(self.rows, width), pad_batch(batch, width)
        return TaskBatch(
            *(torch.cat([a[pick], b[n:]]) for a, b in zip(_fields(old), _fields(new), strict=True))
        )

    def state_dict(self) -> dict[str, Any]:
        return {} if self.rows is None else dict(zip(_NAMES, _fields(self.rows), strict=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = TaskBatch(*(state[k] for k in _NAMES)) if state else None


_NAMES = ("inputs", "targets", "task_ids", "padding")


def _fields(batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    assert batch.task_ids is not None
    return batch.inputs, batch.targets, batch.task_ids, padding_mask(batch)


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al. 2017), online form: each finished
    stage adds its diagonal Fisher to ``fisher`` and moves the anchor to the weights at
    its end; the penalty is ``lambda / 2 * sum_i F_i (theta_i - theta*_i)^2``."""

    def __init__(self) -> None:
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def consolidate(self, model: nn.Module, losses: Iterable[Callable[[], Tensor]]) -> None:
        """Add the Fisher of the losses (their squared gradients, averaged: with one
        example per loss, the empirical Fisher) and anchor the current weights."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for loss_fn in losses:
            model.zero_grad(set_to_none=True)
            loss_fn().backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
            count += 1
        model.zero_grad(set_to_none=True)
        for n, f in fisher.items():
            f = f / max(count, 1)
            self.fisher[n] = self.fisher[n] + f if n in self.fisher else f
            self.anchor[n] = params[n].detach().clone()

    def penalty(self, model: nn.Module, strength: float) -> Tensor:
        total = next(model.parameters()).new_zeros(())
        for n, p in model.named_parameters():
            if n in self.fisher:
                total = total + (self.fisher[n] * (p - self.anchor[n]) ** 2).sum()
        return strength / 2 * total

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": dict(self.fisher), "anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher, self.anchor = dict(state["fisher"]), dict(state["anchor"])


def top_used_heads(
    usage: Sequence[Sequence[Sequence[float]]], num_shared: int, k: int
) -> list[list[int]]:
    """Per layer, the ``k`` routed heads with the largest summed usage over ``usage``
    (per task: per layer: per head, the fraction of tokens using it). Shared heads serve
    every token by design and are not picked."""
    layers = len(usage[0])
    picked = []
    for layer in range(layers):
        total = torch.tensor([task[layer] for task in usage]).sum(0)[num_shared:]
        order = torch.argsort(total, descending=True, stable=True)[: min(k, total.numel())]
        picked.append(sorted(num_shared + int(i) for i in order))
    return picked


class HeadProtection:
    """Keeps chosen heads' projection slices (query rows, key/value rows of their
    key/value head, output-projection columns) at their values when protected: frozen
    (:meth:`restore` after every optimiser step writes them back, so momentum cannot move
    them) or pulled back by ``lambda * sum ||slice - anchor||^2`` (:meth:`penalty`)."""

    def __init__(self) -> None:
        self.slices: list[tuple[str, int, int, int, Tensor]] = []  # name, dim, start, len

    def protect(self, model: nn.Module, heads_per_layer: Sequence[Sequence[int]]) -> None:
        attention = [m for m in model.modules() if isinstance(m, RoutedAttention)]
        if len(attention) != len(heads_per_layer):
            raise ValueError(
                f"HeadProtection: {len(heads_per_layer)} layers of heads for "
                f"{len(attention)} routed attention modules"
            )
        names = {id(p): n for n, p in model.named_parameters()}
        for module, heads in zip(attention, heads_per_layer, strict=True):
            e, group = module.head_dim, module.num_heads // module.num_kv_heads
            for h in heads:
                for proj, dim, index in (
                    (module.q_proj, 0, h),
                    (module.k_proj, 0, h // group),
                    (module.v_proj, 0, h // group),
                    (module.out_proj, 1, h),
                ):
                    for p in (proj.weight, proj.bias if dim == 0 else None):
                        if p is not None:
                            self._add(names[id(p)], p, dim, index * e, e)

    def _add(self, name: str, p: Tensor, dim: int, start: int, length: int) -> None:
        if any(s[:4] == (name, dim, start, length) for s in self.slices):
            return  # a key/value head shared by two protected query heads
        anchor = p.detach().narrow(dim, start, length).clone()
        self.slices.append((name, dim, start, length, anchor))

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, dim, start, length, anchor in self.slices:
            params[name].narrow(dim, start, length).copy_(anchor)

    def penalty(self, model: nn.Module, strength: float) -> Tensor:
        params = dict(model.named_parameters())
        total = next(model.parameters()).new_zeros(())
        for name, dim, start, length, anchor in self.slices:
            total = total + (params[name].narrow(dim, start, length) - anchor).square().sum()
        return strength * total

    def state_dict(self) -> dict[str, Any]:
        return {"slices": [list(s) for s in self.slices]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.slices = [(str(n), int(d), int(s), int(k), a) for n, d, s, k, a in state["slices"]]

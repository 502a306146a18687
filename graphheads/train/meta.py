"""Meta-learning over task variants with ``torch.func.functional_call``: first-order MAML
and Reptile, adapting every weight or only the routers and head graphs in the inner loop.

A *task variant* is a built-in task (copy, reverse, sort, modadd, ...) under a relabelling
of its symbols (a permutation of the symbol ids, applied to prompts and answers alike),
with a modulus and a prompt length. Training draws variants from a pool; evaluation
uses held-out ones: unseen permutations, unseen moduli, longer prompts.

Inner loop (both algorithms): ``inner_steps`` plain SGD steps of size ``inner_lr`` on a
support batch, on a copy of the adapted weights held in a dict (the model's own weights
never change in it):

    theta_k+1 = theta_k - inner_lr * grad L_support(theta_k)

Outer step: first-order MAML takes the query loss's gradient at the adapted weights as
the meta-gradient of the original weights (with ``adapt="routers"`` the other weights get
the query loss's gradient at the same point, so the whole model meta-learns); Reptile
takes ``theta - theta_adapted`` (so it adapts every weight). Both are averaged over
``meta_batch`` variants and applied by Adam.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from graphheads.data.tasks import IGNORE_INDEX, TaskBatch, TaskSuite
from graphheads.train.forgetting import pad_batch, padding_mask

__all__ = [
    "MetaLearner",
    "TaskVariant",
    "adaptation_curve",
    "adapted_parameters",
    "inner_adapt",
    "variant_batch",
]


@dataclass(frozen=True)
class TaskVariant:
    """A built-in task under a symbol relabelling, with its modulus and prompt length."""

    task: str
    permutation: tuple[int, ...]  # new id of each symbol (num_symbols entries)
    modulus: int = 11
    length: int = 6


def variant_batch(
    variant: TaskVariant, batch_size: int, generator: torch.Generator, width: int
) -> TaskBatch:
    """A batch of ``variant``, right-padded to ``width`` tokens."""
    n = len(variant.permutation)
    suite = TaskSuite(
        (variant.task,), length=variant.length, num_symbols=n, modulus=variant.modulus
    )
    batch = pad_batch(suite.sample(batch_size, generator), width)
    relabel = torch.arange(suite.vocab_size)
    symbols = slice(suite.first_symbol, suite.first_symbol + n)  # opt-in task tokens follow
    relabel[symbols] = suite.first_symbol + torch.tensor(variant.permutation)
    targets = torch.where(
        batch.targets == IGNORE_INDEX, batch.targets, relabel[batch.targets.clamp(min=0)]
    )
    return replace(batch, inputs=relabel[batch.inputs], targets=targets)


def adapted_parameters(model: nn.Module, adapt: str) -> dict[str, Tensor]:
    """The weights the inner loop changes: ``"all"``, or ``"routers"`` (every router's
    weights, head graphs included)."""
    if adapt not in ("all", "routers"):
        raise ValueError(f"adapted_parameters: adapt must be 'all' or 'routers', got {adapt!r}")
    params: dict[str, Tensor] = dict(model.named_parameters())
    if adapt == "routers":
        params = {n: p for n, p in params.items() if ".router." in n}
        if not params:
            raise ValueError("adapted_parameters: adapt='routers' needs routed attention")
    return params


def _forward(model: nn.Module, params: dict[str, Tensor], batch: TaskBatch) -> Any:
    """The model's output with ``params`` in place of its own weights of those names."""
    kwargs = {"key_padding_mask": batch.padding}
    return functional_call(model, params, (batch.inputs,), kwargs, strict=False)


def _loss(model: nn.Module, params: dict[str, Tensor], batch: TaskBatch) -> Tensor:
    out = _forward(model, params, batch)
    return F.cross_entropy(
        out.logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
    )


def inner_adapt(
    model: nn.Module, params: dict[str, Tensor], batch: TaskBatch, *, steps: int, lr: float
) -> dict[str, Tensor]:
    """``steps`` SGD steps on ``batch`` from ``params`` (a subset of the model's weights;
    the others stay the model's). Returns new tensors; the model is not changed."""
    current = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    for _ in range(steps):
        grads = torch.autograd.grad(_loss(model, current, batch), list(current.values()))
        current = {
            n: (p - lr * g).detach().requires_grad_(True)
            for (n, p), g in zip(current.items(), grads, strict=True)
        }
    return current


@torch.no_grad()
def _accuracy(model: nn.Module, params: dict[str, Tensor], batch: TaskBatch) -> float:
    out = _forward(model, params, batch)
    scored = batch.targets != IGNORE_INDEX
    hits = (out.logits.argmax(-1) == batch.targets) & scored
    return float(hits.sum()) / max(int(scored.sum()), 1)


def adaptation_curve(
    model: nn.Module,
    variants: Sequence[TaskVariant],
    *,
    adapt: str,
    lr: float,
    checkpoints: Sequence[int] = (0, 1, 5, 20),
    support_size: int = 32,
    query_size: int = 64,
    width: int,
    seed: int = 0,
) -> dict[int, float]:
    """Mean query accuracy over ``variants`` after each number of inner SGD steps in
    ``checkpoints`` on a support batch of the variant (the model is not changed)."""
    was_training = model.training
    model.eval()  # no dropout while adapting or scoring
    totals = dict.fromkeys(checkpoints, 0.0)
    for i, variant in enumerate(variants):
        gen = torch.Generator().manual_seed(seed * 10_007 + i)
        support = variant_batch(variant, support_size, gen, width)
        query = variant_batch(variant, query_size, gen, width)
        params, done = adapted_parameters(model, adapt), 0
        for k in sorted(checkpoints):
            params = inner_adapt(model, params, support, steps=k - done, lr=lr)
            done = k
            totals[k] += _accuracy(model, params, query)
    model.train(was_training)
    return {k: v / len(variants) for k, v in totals.items()}


class MetaLearner:
    """First-order MAML (``algorithm="fomaml"``) or Reptile over a pool of variants.

    Args:
        model: the model (its weights are the meta-parameters).
        variants: the training pool.
        algorithm: ``"fomaml"`` or ``"reptile"``.
        adapt: ``"all"`` or ``"routers"`` (see :func:`adapted_parameters`).
        inner_steps: SGD steps per variant.
        inner_lr: their step size.
        outer_lr: Adam's learning rate on the meta-gradient.
        meta_batch: variants per outer step.
        support_size: examples of a support batch (Reptile adapts on support + query).
        query_size: examples of a query batch.
        width: tokens per row (the longest variant's sequence).
    """

    def __init__(
        self,
        model: nn.Module,
        variants: Sequence[TaskVariant],
        *,
        algorithm: str = "fomaml",
        adapt: str = "all",
        inner_steps: int = 5,
        inner_lr: float = 0.05,
        outer_lr: float = 1e-3,
        meta_batch: int = 4,
        support_size: int = 16,
        query_size: int = 16,
        width: int,
    ) -> None:
        if algorithm not in ("fomaml", "reptile"):
            raise ValueError(
                f"MetaLearner: algorithm must be 'fomaml' or 'reptile', got {algorithm!r}"
            )
        if not variants:
            raise ValueError("MetaLearner: variants must not be empty")
        adapted_parameters(model, adapt)  # checks adapt
        if algorithm == "reptile" and adapt != "all":
            raise ValueError(
                "MetaLearner: Reptile moves only the weights its inner loop adapts; with "
                f"adapt={adapt!r} the rest would never train (use algorithm='fomaml')"
            )
        self.model, self.variants = model, list(variants)
        self.algorithm, self.adapt = algorithm, adapt
        self.inner_steps, self.inner_lr, self.meta_batch = inner_steps, inner_lr, meta_batch
        self.support_size, self.query_size, self.width = support_size, query_size, width
        self.optimizer = torch.optim.Adam(model.parameters(), lr=outer_lr)

    def meta_step(self, generator: torch.Generator) -> dict[str, Any]:
        """One outer step; returns the mean query loss after adaptation."""
        self.optimizer.zero_grad(set_to_none=True)
        picks = torch.randint(0, len(self.variants), (self.meta_batch,), generator=generator)
        total = 0.0
        for j in picks.tolist():
            variant = self.variants[j]
            support = variant_batch(variant, self.support_size, generator, self.width)
            query = variant_batch(variant, self.query_size, generator, self.width)
            start = adapted_parameters(self.model, self.adapt)
            params = dict(self.model.named_parameters())
            if self.algorithm == "reptile":  # adapt on everything the variant shows
                both = TaskBatch(
                    torch.cat([support.inputs, query.inputs]),
                    torch.cat([support.targets, query.targets]),
                    None,
                    torch.cat([padding_mask(support), padding_mask(query)]),
                )
                adapted = inner_adapt(
                    self.model, start, both, steps=self.inner_steps, lr=self.inner_lr
                )
                grads = {n: (start[n] - adapted[n]).detach() for n in start}
                with torch.no_grad():
                    total += _loss(self.model, adapted, query).item()
            else:
                adapted = inner_adapt(
                    self.model, start, support, steps=self.inner_steps, lr=self.inner_lr
                )
                loss = _loss(self.model, adapted, query)
                total += loss.item()
                # the adapted weights' query gradient, and the others' at the same point
                wrt = {**adapted, **{n: p for n, p in params.items() if n not in adapted}}
                values = torch.autograd.grad(loss, list(wrt.values()))
                grads = dict(zip(wrt, values, strict=True))
            for n, g in grads.items():
                g = g / self.meta_batch
                p = params[n]
                p.grad = g if p.grad is None else p.grad + g
        self.optimizer.step()
        return {"query_loss": total / self.meta_batch}

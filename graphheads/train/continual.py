"""Continual learning over the built-in tasks: the configuration of a sequence of stages,
the methods that fight forgetting, and the metrics of an accuracy matrix.

A run trains stage after stage, each on its own tasks, and after every stage evaluates
every task of the run: row s of the accuracy matrix ``R`` is the accuracy on each task
after stage s (row 0: before any training). With ``stage(j)`` the stage that trains task
j and S stages:

    average accuracy   = mean_j R[S, j]
    backward transfer  = mean over tasks of stages < S of  R[S, j] - R[stage(j) + 1, j]
                         (negative: forgetting)
    forward transfer   = mean over tasks of stages > 1 of  R[stage(j), j] - R[0, j]
                         (what earlier stages taught about a task before it was trained)

Methods (``method``): ``finetune`` (plain), ``replay`` (a buffer of earlier stages'
examples mixed into every batch), ``ewc`` (elastic weight consolidation: a diagonal
Fisher of earlier stages), ``protect`` (the routed heads earlier tasks used most are
frozen or their change penalised: a handle only routed heads give) and
``task_routing`` (a learned task embedding in every router's input,
``ModelConfig.task_embeddings``). See :mod:`graphheads.train.continual_run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from graphheads.config import check_field_types, check_known_keys, model_keys
from graphheads.data.tasks import TASKS

__all__ = ["METHODS", "ContinualConfig", "Stage", "continual_metrics"]

METHODS = ("finetune", "replay", "ewc", "protect", "task_routing")


@dataclass(frozen=True)
class Stage:
    """One stage: a name, what it trains on, and its optimiser steps. A stage trains on
    built-in tasks, or on a corpus: UTF-8 text (``text``, bytes) or a prepared token-shard
    folder (``tokens``, from ``graphheads prepare``), whose column in the accuracy matrix
    is the stage's name (next-token accuracy on the corpus's held-out part)."""

    name: str
    tasks: tuple[str, ...]  # for a corpus stage: (name,)
    steps: int
    text: str | None = None
    tokens: str | None = None

    @property
    def corpus(self) -> str | None:
        return self.text if self.text is not None else self.tokens


@dataclass(frozen=True)
class ContinualConfig:
    """A continual-learning run (``graphheads continual --config FILE``)."""

    stages: tuple[Stage, ...]
    method: str = "finetune"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides
    length: int = 6  # the task suite's prompt length (see TaskSuite)
    seq_len: int = 64  # tokens per window of a corpus stage
    num_symbols: int = 16
    modulus: int = 11
    batch_size: int = 32
    lr: float = 3e-3
    aux_loss_weight: float = 0.01
    seed: int = 0
    eval_batches: int = 4
    eval_batch_size: int = 64
    checkpoint_every: int = 100
    replay_size: int = 256  # replay: examples kept per finished stage
    replay_fraction: float = 0.5  # replay: share of every batch drawn from the buffer
    ewc_lambda: float = 1000.0  # ewc: penalty weight
    fisher_samples: int = 64  # ewc: examples (one gradient each) for each stage's Fisher
    protect_heads: int = 2  # protect: routed heads per layer kept per finished stage
    protect_mode: str = "freeze"  # protect: "freeze" or "penalty"
    protect_lambda: float = 10.0  # protect: penalty weight

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("ContinualConfig: stages must list at least one stage")
        check_field_types(self)
        check_known_keys("ContinualConfig", self.model, model_keys(), prefix="model.")
        if self.method not in METHODS:
            raise ValueError(
                f"ContinualConfig: method must be one of {METHODS}, got {self.method!r}"
            )
        if self.protect_mode not in ("freeze", "penalty"):
            raise ValueError(
                f"ContinualConfig: protect_mode must be 'freeze' or 'penalty', "
                f"got {self.protect_mode!r}"
            )
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(
                f"ContinualConfig: replay_fraction must be in [0, 1), got {self.replay_fraction}"
            )
        for name in ("batch_size", "eval_batches", "eval_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"ContinualConfig: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("replay_size", "fisher_samples", "protect_heads"):
            if getattr(self, name) < 0:
                raise ValueError(f"ContinualConfig: {name} must be >= 0, got {getattr(self, name)}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every column of the accuracy matrix (built-in tasks, and corpus stages by
        name), in the order the stages first train them."""
        seen: list[str] = []
        for stage in self.stages:
            seen += [t for t in stage.tasks if t not in seen]
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["stages"] = [_stage_dict(s) for s in self.stages]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ContinualConfig:
        """From plain data (JSON/YAML); a bad stage raises a ValueError naming the stage
        and the key, an unknown top-level key names the key."""
        check_known_keys("ContinualConfig", values, {f.name for f in fields(cls)})
        raw = values.get("stages")
        if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
            raise ValueError("ContinualConfig: 'stages' must be a non-empty list of stages")
        stages = tuple(_stage(i, s) for i, s in enumerate(raw))
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"ContinualConfig: stage names must differ, got {names}")
        clash = [s.name for s in stages if s.corpus is not None and s.name in TASKS]
        if clash:
            raise ValueError(
                f"ContinualConfig: corpus stages are columns of their own: rename {clash} "
                "(built-in task names)"
            )
        return cls(**{**values, "stages": stages})


def _stage_dict(stage: Stage) -> dict[str, Any]:
    values: dict[str, Any] = {"name": stage.name, "steps": stage.steps}
    if stage.text is not None:
        values["text"] = stage.text
    elif stage.tokens is not None:
        values["tokens"] = stage.tokens
    else:
        values["tasks"] = list(stage.tasks)
    return values


_SOURCES = ("tasks", "text", "tokens")


def _stage(index: int, values: Any) -> Stage:
    where = f"ContinualConfig: stage {index}"
    if not isinstance(values, dict):
        raise ValueError(f"{where}: must be a mapping with name, tasks (or text, tokens), steps")
    where = f"{where} ({values.get('name', '?')!r})"
    check_known_keys(where, values, {"name", "steps", *_SOURCES})
    if "steps" not in values:
        raise ValueError(f"{where}: missing key 'steps'")
    sources = [k for k in _SOURCES if k in values]
    if len(sources) != 1:
        raise ValueError(
            f"{where}: give exactly one of 'tasks', 'text', 'tokens' (got {sources or 'none'})"
        )
    steps = values["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: key 'steps' must be a positive int, got {steps!r}")
    name = str(values.get("name", f"stage{index}"))
    if sources[0] != "tasks":
        path = values[sources[0]]
        if not isinstance(path, str) or not Path(path).exists():
            raise ValueError(f"{where}: key {sources[0]!r}: {path!r} does not exist")
        return Stage(name, (name,), steps, **{sources[0]: path})
    tasks = values["tasks"]
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"{where}: key 'tasks' must be a non-empty list, got {tasks!r}")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"{where}: key 'tasks' has unknown task(s) {bad}; known: {list(TASKS)}")
    return Stage(name, tuple(tasks), steps)


def continual_metrics(
    matrix: Sequence[Sequence[float]], tasks: Sequence[str], stages: Sequence[Stage]
) -> dict[str, float | None]:
    """Average accuracy, backward and forward transfer of an accuracy matrix (rows: before
    training, then after each stage; columns: ``tasks``). Transfer is ``None`` where no
    task qualifies (a single stage)."""
    if len(matrix) != len(stages) + 1:
        raise ValueError(
            f"continual_metrics: the matrix has {len(matrix)} rows, expected {len(stages) + 1}"
        )
    first: dict[str, int] = {}
    for s, stage in enumerate(stages):
        for task in stage.tasks:
            first.setdefault(task, s)
    last = len(stages)
    final = matrix[last]
    backward = [
        final[j] - matrix[first[t] + 1][j] for j, t in enumerate(tasks) if first[t] < last - 1
    ]
    forward = [matrix[first[t]][j] - matrix[0][j] for j, t in enumerate(tasks) if first[t] > 0]
    return {
        "average_accuracy": sum(final) / len(final),
        "backward_transfer": sum(backward) / len(backward) if backward else None,
        "forward_transfer": sum(forward) / len(forward) if forward else None,
    }

"""Run a continual-learning configuration (:class:`~graphheads.train.continual.ContinualConfig`):
train stage after stage, evaluate every task after each, write the accuracy matrix,
the transfer metrics and the per-stage head usage.

The run folder holds ``checkpoint.pt`` (written atomically every ``checkpoint_every``
steps and at the end of each stage: model, optimiser, the method's state, the matrix so
far), ``continual.json`` (rewritten after each stage from that state) and, at the end,
``accuracy_matrix.png`` and ``head_usage.png``. An interrupted run (SIGINT/SIGTERM stop
at a step boundary with a checkpoint) continues from its checkpoint when started again
with the same configuration; a checkpoint of another configuration is refused before
anything is written.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from graphheads.data.shards import TokenShardDataset
from graphheads.data.tasks import IGNORE_INDEX, TaskBatch, TaskSuite
from graphheads.data.text import ByteTextDataset
from graphheads.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    write_text_atomically,
)
from graphheads.train.config import default_model_config
from graphheads.train.continual import ContinualConfig, Stage, continual_metrics
from graphheads.train.evaluation import evaluate, forward_batch
from graphheads.train.forgetting import EWC, HeadProtection, ReplayBuffer, pad_batch, top_used_heads
from graphheads.train.runtime import StopSignals
from graphheads.transformer import DecoderOnlyLM

Corpus = ByteTextDataset | TokenShardDataset


def _corpus(stage: Stage, seq_len: int) -> Corpus:
    if stage.text is not None:
        return ByteTextDataset(stage.text, seq_len=seq_len)
    assert stage.tokens is not None
    return TokenShardDataset(stage.tokens, seq_len=seq_len)


__all__ = [
    "ContinualResult",
    "ContinualRun",
    "plot_accuracy_matrix",
    "plot_stage_head_usage",
    "run_continual",
]


@dataclass
class ContinualResult:
    """The accuracy matrix (rows: before training, then after each stage; columns:
    ``tasks``), its metrics, the head usage after each stage (per task: per layer: per
    head) and whether the run stopped early (a checkpoint holds where)."""

    tasks: tuple[str, ...]
    matrix: list[list[float]]
    metrics: dict[str, float | None]
    head_usage: list[dict[str, list[list[float]]]]
    interrupted: bool = False


class ContinualRun:
    """One continual-learning run; :meth:`run` trains it (see the module docstring)."""

    def __init__(
        self, config: ContinualConfig, out_dir: str | Path | None = None, *, progress: bool = True
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        c = config
        # columns: the built-in tasks first (their suite ids are their columns), then the
        # corpus stages by name
        self.corpora: dict[str, Corpus] = {
            s.name: _corpus(s, c.seq_len) for s in c.stages if s.corpus is not None
        }
        builtin = tuple(t for t in config.tasks if t not in self.corpora)
        self.tasks = builtin + tuple(self.corpora)
        self.suite = (
            TaskSuite(builtin, length=c.length, num_symbols=c.num_symbols, modulus=c.modulus)
            if builtin
            else None
        )
        sources: list[Any] = [*([self.suite] if self.suite else []), *self.corpora.values()]
        self.width = max(d.max_seq_len for d in sources)
        overrides = dict(c.model)
        if c.method == "task_routing":
            overrides["task_embeddings"] = len(self.tasks)
        vocab = max(d.vocab_size for d in sources)
        base = default_model_config(vocab, self.width)
        if (
            c.method in ("protect", "task_routing")
            and overrides.get("attention", base.attention) == "mha"
        ):
            raise ValueError(
                f"ContinualConfig: method {c.method!r} needs routed heads (model.attention "
                "'moh' or 'goh'), not 'mha'"
            )
        self.model_config = base.with_overrides(**overrides)
        torch.manual_seed(c.seed)
        self.model = DecoderOnlyLM(self.model_config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=0.0)
        self.replay, self.ewc, self.protection = ReplayBuffer(), EWC(), HeadProtection()
        self.stage, self.step = 0, 0  # the next stage to train, steps done in it
        self.matrix: list[list[float]] = []
        self.usage: list[dict[str, list[list[float]]]] = []

    # -- state ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "continual_config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "stage": self.stage,
            "step": self.step,
            "matrix": self.matrix,
            "usage": self.usage,
            "replay": self.replay.state_dict(),
            "ewc": self.ewc.state_dict(),
            "protect": self.protection.state_dict(),
        }

    def _resume(self) -> None:
        path = None if self.out_dir is None else self.out_dir / CHECKPOINT_NAME
        if path is None or not path.exists():
            return
        state = load_checkpoint(path)
        if state.get("continual_config") != self.config.to_dict():
            raise CheckpointError(
                f"{path} belongs to another continual configuration; use another --out or --restart"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stage, self.step = int(state["stage"]), int(state["step"])
        self.matrix, self.usage = state["matrix"], state["usage"]
        self.replay.load_state_dict(state["replay"])
        self.ewc.load_state_dict(state["ewc"])
        self.protection.load_state_dict(state["protect"])

    def _save(self) -> None:
        if self.out_dir is not None:
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, self.state())

    # -- one stage --------------------------------------------------------------------
    def _stage_data(self, stage: Stage) -> tuple[TaskSuite | Corpus, list[int]]:
        """What a stage samples from, and the column of each of its sampler's task ids."""
        if stage.corpus is not None:
            return self.corpora[stage.name], [self.tasks.index(stage.name)]
        c = self.config
        suite = TaskSuite(
            stage.tasks, length=c.length, num_symbols=c.num_symbols, modulus=c.modulus
        )
        return suite, [self.tasks.index(t) for t in stage.tasks]

    def _draw(
        self, data: TaskSuite | Corpus, index: list[int], n: int, gen: torch.Generator
    ) -> TaskBatch:
        """``n`` training examples, padded to the run's width, with the run's task ids."""
        batch = pad_batch(data.sample(n, gen), self.width)
        ids = batch.task_ids if batch.task_ids is not None else torch.zeros(n, dtype=torch.long)
        return replace(batch, task_ids=torch.tensor(index)[ids])

    def _stage_batch(self, data: TaskSuite | Corpus, index: list[int], step: int) -> TaskBatch:
        c = self.config
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + self.stage * 100_003 + step)
        batch = self._draw(data, index, c.batch_size, gen)
        if c.method == "replay":
            batch = self.replay.mix(batch, c.replay_fraction, gen)
        return batch

    def _loss(self, batch: TaskBatch, *, aux: bool = True) -> Tensor:
        """The training loss; ``aux=False``: the task's cross-entropy alone (EWC's Fisher
        is that of the model's predictions, not of the load-balance term)."""
        out, targets = forward_batch(self.model, batch)
        loss = F.cross_entropy(
            out.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
        )
        if aux and out.routing and out.aux_loss is not None:
            loss = loss + self.config.aux_loss_weight * out.aux_loss / len(out.routing)
        return loss

    def train_step(self, batch: TaskBatch) -> float:
        c = self.config
        loss = self._loss(batch)
        if c.method == "ewc" and self.ewc.fisher:
            loss = loss + self.ewc.penalty(self.model, c.ewc_lambda)
        if c.method == "protect" and c.protect_mode == "penalty":
            loss = loss + self.protection.penalty(self.model, c.protect_lambda)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        if c.method == "protect" and c.protect_mode == "freeze":
            self.protection.restore(self.model)
        return loss.item()

    def _finish_stage(self, data: TaskSuite | Corpus, index: list[int]) -> None:
        """After a stage: evaluate every column, then update the method's memory."""
        c = self.config
        row = self._evaluate()
        gen = torch.Generator().manual_seed(c.seed + 7 * (self.stage + 1))
        if c.method == "replay" and c.replay_size > 0:
            self.replay.add(self._draw(data, index, c.replay_size, gen))
        if c.method == "ewc" and c.fisher_samples > 0:
            self.model.train()
            examples = self._draw(data, index, c.fisher_samples, gen)
            # the empirical Fisher: one squared gradient per example
            rows = [examples.rows(slice(i, i + 1)) for i in range(c.fisher_samples)]
            losses = [functools.partial(self._loss, r, aux=False) for r in rows]
            self.ewc.consolidate(self.model, losses)
        if c.method == "protect" and c.protect_heads > 0:
            stage_tasks = self.config.stages[self.stage].tasks
            usage = [row["head_usage"][t] for t in stage_tasks]
            heads = top_used_heads(usage, self.model_config.num_shared, c.protect_heads)
            self.protection.protect(self.model, heads)
        self.stage, self.step = self.stage + 1, 0

    def _evaluate(self) -> dict[str, Any]:
        """Accuracy and head usage of every column: the built-in tasks on fixed held-out
        batches, each corpus on fixed windows of its held-out part."""
        c = self.config
        accuracy: dict[str, float] = {}
        usage: dict[str, list[list[float]]] = {}
        if self.suite is not None:
            result = evaluate(
                self.model,
                self.suite,
                batches=c.eval_batches,
                batch_size=c.eval_batch_size,
                seed=c.seed,
            )
            accuracy.update(result["accuracy"])
            usage.update(result.get("head_usage", {}))
        for name, corpus in self.corpora.items():
            accuracy[name], used = self._evaluate_corpus(corpus, self.tasks.index(name))
            if used is not None:
                usage[name] = used
        self.matrix.append([accuracy[t] for t in self.tasks])
        self.usage.append(usage)
        return {"accuracy": accuracy, "head_usage": usage}

    @torch.no_grad()
    def _evaluate_corpus(self, corpus: Corpus, column: int) -> tuple[float, Any]:
        """Next-token accuracy on held-out windows, and the share of tokens using each
        head per layer (as :func:`~graphheads.train.evaluation.evaluate` counts it)."""
        c = self.config
        was_training = self.model.training
        self.model.eval()
        gen = torch.Generator().manual_seed(10**9 + c.seed)
        hits = scored = 0
        use: Tensor | None = None
        for _ in range(c.eval_batches):
            batch = corpus.sample(c.eval_batch_size, gen, split="val")
            ids = torch.full((batch.inputs.size(0),), column, dtype=torch.long)
            out, targets = forward_batch(self.model, replace(batch, task_ids=ids))
            real = targets != IGNORE_INDEX
            hits += int(((out.logits.argmax(-1) == targets) & real).sum())
            scored += int(real.sum())
            if out.routing:
                layers = torch.stack([r.active_heads[real].float().sum(0) for r in out.routing])
                use = layers if use is None else use + layers
        self.model.train(was_training)
        return hits / max(scored, 1), None if use is None else (use / scored).tolist()

    # -- the run ----------------------------------------------------------------------
    def run(self, *, resume: bool = True, stop_after: int | None = None) -> ContinualResult:
        """Train every stage. ``stop_after`` (tests) stops like a signal would after that
        many steps of this call."""
        if resume:
            self._resume()  # refuses another configuration before anything is written
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.matrix:
            self._evaluate()  # row 0: before any training
        done = 0
        with StopSignals() as stop:
            while self.stage < len(self.config.stages):
                stage = self.config.stages[self.stage]
                data, index = self._stage_data(stage)
                self.model.train()
                bar = tqdm(
                    total=stage.steps, initial=self.step, disable=not self.progress, desc=stage.name
                )
                while self.step < stage.steps:
                    loss = self.train_step(self._stage_batch(data, index, self.step))
                    self.step += 1
                    done += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                    if self.step % self.config.checkpoint_every == 0:
                        self._save()
                    if stop.received or (stop_after is not None and done >= stop_after):
                        if self.step < stage.steps:
                            bar.close()
                            self._save()
                            return self._result(interrupted=True)
                bar.close()
                self._finish_stage(data, index)
                self._save()
                self._write_report()
        self._write_report(final=True)
        return self._result()

    def _result(self, *, interrupted: bool = False) -> ContinualResult:
        metrics: dict[str, float | None] = {}
        if len(self.matrix) == len(self.config.stages) + 1:
            metrics = continual_metrics(self.matrix, self.tasks, self.config.stages)
        return ContinualResult(self.tasks, self.matrix, metrics, self.usage, interrupted)

    def _write_report(self, *, final: bool = False) -> None:
        if self.out_dir is None:
            return
        result = self._result()
        report = {
            "method": self.config.method,
            "attention": self.model_config.attention,
            "tasks": list(self.tasks),
            "stages": [s.name for s in self.config.stages[: len(self.matrix) - 1]],
            "accuracy_matrix": self.matrix,
            **result.metrics,
            "head_usage": self.usage,
        }
        write_text_atomically(self.out_dir / "continual.json", json.dumps(report, indent=1))
        if final:
            names = ["before"] + [s.name for s in self.config.stages]
            figure = self.out_dir / "accuracy_matrix.png"
            plot_accuracy_matrix(self.matrix, names, self.tasks, figure)
            if any(self.usage):
                plot_stage_head_usage(self.usage[1:], names[1:], self.out_dir / "head_usage.png")


def run_continual(
    config: ContinualConfig, out_dir: str | Path | None = None, *, progress: bool = True
) -> ContinualResult:
    """Train ``config`` (resuming a checkpoint in ``out_dir`` of the same configuration)."""
    return ContinualRun(config, out_dir, progress=progress).run()


def plot_accuracy_matrix(
    matrix: list[list[float]], rows: list[str], tasks: tuple[str, ...], path: Path
) -> None:
    """Heatmap of the accuracy matrix (rows: before training, then after each stage)."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(tasks), 1.0 + 0.5 * len(rows)))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(rows)), [f"after {r}" if i else r for i, r in enumerate(rows)])
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title("accuracy per task")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stage_head_usage(
    usage: list[dict[str, list[list[float]]]], stages: list[str], path: Path
) -> None:
    """After each stage, every task's share of tokens per head, layer by layer (one
    panel per stage: rows are (task, layer), columns heads)."""
    fig, axes = plt.subplots(1, len(usage), figsize=(3.2 * len(usage), 3.2), squeeze=False)
    for ax, stage, per_task in zip(axes[0], stages, usage, strict=True):
        labels = [f"{t} L{i}" for t, layers in per_task.items() for i in range(len(layers))]
        grid = [row for layers in per_task.values() for row in layers]
        ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("head")
        ax.set_title(f"after {stage}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Where a training run's metrics go: ``metrics.jsonl`` in the run folder (one JSON
record per line, read back by :func:`graphheads.train.evaluation.read_metrics`), and with
``train.log_to="tensorboard"`` TensorBoard event files beside it
(:class:`graphheads.train.tensorboard.TensorBoardLog`)."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from torch import nn

from graphheads.train.checkpoint import metric_line_step, write_text_atomically
from graphheads.train.evaluation import METRICS_NAME

__all__ = ["RunLog"]


class RunLog:
    """A run's metric records, written by the main process only.

    Args:
        folder: the run folder; ``None`` keeps nothing.
        log_to: ``"jsonl"`` or ``"tensorboard"`` (metrics.jsonl as well).
        model: the model whose head graphs TensorBoard draws.
        main: whether this process writes (rank 0).
    """

    def __init__(self, folder: Path | None, *, log_to: str, model: nn.Module, main: bool) -> None:
        self.path = None if folder is None or not main else folder / METRICS_NAME
        if log_to == "tensorboard" and self.path is not None:  # refused before any step
            try:
                if importlib.util.find_spec("tensorboard") is None:
                    raise ModuleNotFoundError("No module named 'tensorboard'")
                importlib.import_module("torch.utils.tensorboard")
            except ImportError as err:
                raise ModuleNotFoundError(
                    f"train.log_to='tensorboard' needs tensorboard ({err}): pip install "
                    "'graphheads[tensorboard]'"
                ) from err
        self.log_to, self.model = log_to, model
        self.tensorboard: Any = None  # opened at the first record (its step purges)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if self.log_to == "tensorboard":
            if self.tensorboard is None:
                from graphheads.train.tensorboard import TENSORBOARD_DIR, TensorBoardLog

                folder = self.path.parent / TENSORBOARD_DIR
                self.tensorboard = TensorBoardLog(folder, self.model, first_step=record["step"])
            self.tensorboard.write(record)

    def keep_up_to(self, step: int) -> None:
        """Drop the metric lines after ``step`` (all of them for step 0): lines a resumed
        or restarted run writes again are never duplicated (TensorBoard's events from the
        first step written on are purged when it opens)."""
        if self.path is None or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if metric_line_step(line) <= step]
        write_text_atomically(self.path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

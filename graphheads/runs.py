"""``graphheads.open_run``: a `graphheads train` run, loaded in one line, with what it
takes to look at it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphheads.train.config import RunConfig
from graphheads.train.evaluation import Data, load_run, read_metrics
from graphheads.transformer import DecoderOnlyLM, Transformer

__all__ = ["TrainedRun", "open_run"]


@dataclass
class TrainedRun:
    """A training run read back from its folder.

    Attributes:
        folder: the run folder.
        model: the model at its latest checkpoint, in eval mode.
        config: the run's configuration (``model``, ``data``, ``train`` sections).
        data: the run's data (the task suite or the text), rebuilt from the config.
        step: the checkpoint's step.
        metrics: the records of ``metrics.jsonl`` (``kind`` "train" or "eval").
    """

    folder: Path
    model: DecoderOnlyLM | Transformer
    config: RunConfig
    data: Data
    step: int
    metrics: list[dict[str, Any]]

    def __repr__(self) -> str:  # the model and every metric record would fill a screen
        return (
            f"TrainedRun(folder={str(self.folder)!r}, model={type(self.model).__name__}, "
            f"step={self.step}, metrics={len(self.metrics)} records)"
        )

    @property
    def last_eval(self) -> dict[str, Any]:
        """The last evaluation record (empty when the run has none)."""
        evals = [r for r in self.metrics if r.get("kind") == "eval"]
        return evals[-1] if evals else {}

    def explorer(self, out: str | Path | None = None) -> Path:
        """Write the interactive explorer page (the viz extra); see
        :func:`graphheads.explorer_page.write_explorer`."""
        from graphheads.explorer_page import write_explorer

        return write_explorer(self.folder, out)

    def report(self) -> Path:
        """Write the report folder (figures, summary.md); see
        :func:`graphheads.report.make_report`."""
        from graphheads.report import make_report

        return make_report(self.folder)


def open_run(path: str | Path) -> TrainedRun:
    """The run in folder ``path`` (``graphheads train --out FOLDER``), or of a checkpoint
    file in one: its model, config, data, step and metrics."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"open_run: no run folder or checkpoint at {path}")
    folder = path if path.is_dir() else path.parent
    model, config, data, step = load_run(path)
    return TrainedRun(folder, model, config, data, step, read_metrics(folder))

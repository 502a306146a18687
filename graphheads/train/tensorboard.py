"""TensorBoard for a training run (``train.log_to="tensorboard"``, the tensorboard
extra): every metrics record as scalars, head usage per layer as histograms over heads,
and each layer's head graph as an image (not under FSDP, whose shards only the main
process would gather), in ``RUN/tensorboard`` (``tensorboard --logdir
RUN``). ``metrics.jsonl`` is written as always; this is a second view of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from torch import nn
from torch.distributed.tensor import DTensor

from graphheads import viz
from graphheads.builders import make_head_graph
from graphheads.graph import HeadGraph
from graphheads.transformer import DecoderOnlyLM

__all__ = ["TENSORBOARD_DIR", "TensorBoardLog", "scalars"]

TENSORBOARD_DIR = "tensorboard"


def scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(tag, value)`` of every number in a metrics record, nested dictionaries joined
    with "/" under the record's kind (``eval/accuracy/copy``); ``head_usage`` (drawn as
    histograms), ``chance`` (a constant per task), ``step`` and ``kind`` are left out."""
    if not prefix:
        prefix = f"{record.get('kind', 'metrics')}/"
    for key, value in record.items():
        if key in ("step", "kind", "head_usage", "chance"):  # chance: a constant per task
            continue
        if isinstance(value, Mapping):
            yield from scalars({"kind": "", **value}, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


class TensorBoardLog:
    """Writes a run's records to TensorBoard event files in ``folder``.

    Args:
        folder: the event files' folder (``RUN/tensorboard``).
        model: the model, for its head graphs (drawn at each evaluation).
        first_step: the first step this process logs: events at or after it from an
            earlier, interrupted attempt are purged (a resumed run writes them again).
    """

    def __init__(self, folder: Path, model: nn.Module, *, first_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "train.log_to='tensorboard' needs tensorboard: pip install "
                "'graphheads[tensorboard]'"
            ) from err
        self.model = model
        self.start: HeadGraph | None = None
        config = getattr(model, "config", None)
        if config is not None and getattr(model, "head_graphs", list)():
            self.start = make_head_graph(config)  # the weights training started from
        self.writer = SummaryWriter(str(folder), purge_step=first_step)

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, step)
        for task, per_layer in record.get("head_usage", {}).items():
            for layer, usage in enumerate(per_layer):
                heads = len(usage)
                self.writer.add_histogram_raw(
                    f"head_usage/{task}/layer{layer}",
                    min=0,
                    max=heads - 1,
                    num=sum(usage),
                    sum=sum(i * u for i, u in enumerate(usage)),
                    sum_squares=sum(i * i * u for i, u in enumerate(usage)),
                    bucket_limits=[i + 0.5 for i in range(heads)],  # one bucket per head
                    bucket_counts=list(usage),
                    global_step=step,
                )
        if record.get("kind") == "eval":
            for tag, graph in self._graphs():
                fig = viz.draw_head_graph(graph, initial=self.start, title=tag)
                self.writer.add_figure(f"head_graph/{tag}", fig, step, close=True)
                plt.close(fig)
        self.writer.flush()

    def _graphs(self) -> list[tuple[str, HeadGraph]]:
        """(tag, graph) of each distinct head graph: ``layer{i}`` in a decoder-only LM,
        ``graph{i}`` (in ``model.head_graphs()`` order) in an encoder-decoder; a graph
        shared by every layer once. None whose weights are sharded (FSDP: only this,
        the main process, writes, so it cannot gather them)."""
        graphs: list[HeadGraph] = getattr(self.model, "head_graphs", list)()
        if any(isinstance(p, DTensor) for g in graphs for p in g.parameters()):
            return []
        kind = "layer" if isinstance(self.model, DecoderOnlyLM) else "graph"
        seen: set[int] = set()
        out = []
        for i, graph in enumerate(graphs):
            if id(graph) not in seen:
                seen.add(id(graph))
                out.append((f"{kind}{i}", graph))
        return out

    def close(self) -> None:
        self.writer.close()

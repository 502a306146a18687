"""Pictures of heads: head graphs, routing heatmaps, per-task head usage, training curves.

Every function draws into a matplotlib ``Axes`` (a new figure when ``ax`` is None) and
returns the ``Figure``; nothing is shown or saved unless you ask, and the matplotlib
backend is left as you set it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import networkx as nx
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from graphheads.graph import HeadGraph

__all__ = [
    "draw_head_graph",
    "plot_head_usage",
    "plot_loss_curve",
    "plot_routing",
    "plot_task_accuracy",
]

SHARED_COLOR, ROUTED_COLOR = "#d95f02", "#1b9e77"


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig, new_ax = plt.subplots(figsize=size, layout="constrained")
    return fig, new_ax


def draw_head_graph(
    graph: HeadGraph,
    *,
    usage: Sequence[float] | Tensor | None = None,
    num_shared: int | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Heads on a circle: shared heads orange, routed heads green; node size is
    ``usage`` (fraction of tokens using the head), edge width the (learned) weight."""
    fig, ax = _axes(ax, (5.0, 5.0))
    g = graph.to_networkx()
    shared = num_shared if num_shared is not None else (graph.num_shared or 0)
    nodes = list(g.nodes)
    pos = nx.circular_layout(g)
    use = [1.0] * len(nodes) if usage is None else [float(u) for u in usage]
    sizes = [200 + 1600 * u for u in use]
    colors = [SHARED_COLOR if i < shared else ROUTED_COLOR for i in range(len(nodes))]
    weights = [d["weight"] for _, _, d in g.edges(data=True)]
    top = max(weights) if weights else 1.0
    widths = [0.3 + 4.0 * w / top for w in weights]
    nx.draw_networkx_edges(
        g,
        pos,
        ax=ax,
        width=widths,
        alpha=0.5,
        edge_color="#555555",
        arrows=g.is_directed(),
        arrowsize=8,
        node_size=sizes,
        connectionstyle="arc3,rad=0.08",
    )
    nx.draw_networkx_nodes(
        g, pos, ax=ax, node_size=sizes, node_color=colors, edgecolors="black", linewidths=0.8
    )
    nx.draw_networkx_labels(g, pos, ax=ax, labels={n: str(n) for n in nodes}, font_size=9)
    ax.legend(
        handles=[
            Line2D(
                [0],
                [0],
                marker="o",
                color="w",
                markerfacecolor=SHARED_COLOR,
                markersize=10,
                label="shared",
            ),
            Line2D(
                [0],
                [0],
                marker="o",
                color="w",
                markerfacecolor=ROUTED_COLOR,
                markersize=10,
                label="routed",
            ),
            Line2D([0], [0], color="#555555", lw=2, label=f"edge weight (max {top:.2f})"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    ax.set_title(title or "head graph (node size = usage)")
    ax.set_axis_off()
    ax.margins(0.15)
    return fig


def plot_routing(
    gates: Tensor,
    *,
    tokens: Sequence[str] | None = None,
    num_shared: int = 0,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """A tokens x heads heatmap of one sequence's gates (0 = head unused)."""
    gates = gates.detach().float().cpu()
    if gates.dim() != 2:
        raise ValueError(f"plot_routing: gates must be (tokens, heads), got {tuple(gates.shape)}")
    t, h = gates.shape
    fig, ax = _axes(ax, (1.2 + 0.45 * h, 1.2 + 0.28 * t))
    image = ax.imshow(gates.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(h), [f"{'s' if i < num_shared else 'r'}{i}" for i in range(h)], fontsize=8)
    ax.set_yticks(
        range(t), list(tokens) if tokens is not None else [str(i) for i in range(t)], fontsize=7
    )
    ax.set_xlabel("head (s = shared, r = routed)")
    ax.set_ylabel("token")
    fig.colorbar(image, ax=ax, label="gate")
    ax.set_title(title or "routing")
    return fig


def plot_head_usage(
    usage: Mapping[str, Any],
    *,
    num_shared: int = 0,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Per-task head usage: rows are tasks, columns (layer, head); values are the
    fraction of the task's scored tokens that use the head."""
    tasks = list(usage)
    matrix = torch.stack([torch.as_tensor(usage[t], dtype=torch.float32).flatten() for t in tasks])
    layers, heads = torch.as_tensor(usage[tasks[0]]).shape
    fig, ax = _axes(ax, (1.5 + 0.35 * layers * heads, 1.2 + 0.4 * len(tasks)))
    image = ax.imshow(
        matrix.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(
        range(layers * heads),
        [
            f"L{i // heads}{'s' if i % heads < num_shared else 'r'}{i % heads}"
            for i in range(layers * heads)
        ],
        rotation=90,
        fontsize=7,
    )
    for boundary in range(1, layers):
        ax.axvline(boundary * heads - 0.5, color="white", lw=1.5)
    fig.colorbar(image, ax=ax, label="fraction of tokens")
    ax.set_title(title or "head usage per task")
    return fig


def plot_loss_curve(records: Sequence[Mapping[str, Any]], *, ax: Axes | None = None) -> Figure:
    """Training loss (and evaluation loss) against step, from metrics records."""
    fig, ax = _axes(ax, (6.0, 3.5))
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r.get("kind") == "eval"]
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval (mean over tasks)", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("loss")
    return fig


def plot_task_accuracy(
    accuracy: Mapping[str, float],
    chance: Mapping[str, float] | None = None,
    *,
    ax: Axes | None = None,
) -> Figure:
    """Bars of per-task token accuracy, with each task's chance level marked."""
    fig, ax = _axes(ax, (6.0, 3.5))
    tasks = list(accuracy)
    ax.bar(range(len(tasks)), [accuracy[t] for t in tasks], color=ROUTED_COLOR, label="accuracy")
    if chance:
        for i, task in enumerate(tasks):
            ax.hlines(chance[task], i - 0.4, i + 0.4, colors="black", linestyles="dashed")
        ax.plot([], [], color="black", linestyle="dashed", label="chance")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("token accuracy")
    ax.legend(loc="lower right")
    ax.set_title("evaluation accuracy per task")
    return fig

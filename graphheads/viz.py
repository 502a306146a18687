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

from graphheads.compat import padding_from_token_mask
from graphheads.config import ModelConfig
from graphheads.graph import HeadGraph
from graphheads.types import RoutingOutput
from graphheads.viz_files import (
    CHANGE_CMAP,
    ROUTED_COLOR,
    SHARED_COLOR,
    change_color,
    edge_changes,
    export_graph,
    head_graph_html,
)

__all__ = [
    "draw_head_graph",
    "export_graph",  # from graphheads.viz_files
    "head_graph_html",  # from graphheads.viz_files
    "plot_head_usage",
    "plot_loss_curve",
    "plot_patch_routing",
    "plot_routing",
    "plot_task_accuracy",
    "routing_caption",
    "trailing_mean",
]


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig, new_ax = plt.subplots(figsize=size, layout="constrained")
    return fig, new_ax


def routing_caption(config: ModelConfig) -> str:
    """What the gates of a routing figure are, for this model's gate convention."""
    text = "gate = the weight on a head's output before the output projection (0: skipped)."
    if config.hard_gates:
        return text + " Hard gates: every active head's gate is 1."
    k, shared = config.routed_top_k, config.num_shared
    reference = config.gate_convention == "reference"
    if shared and k:
        total = "a0 + a1 = 2" if reference else "a0 + a1 = 1"
        scale = "h_s x " if reference and shared > 1 else ""
        routed = f"add up to top-k x a1 = {k} x a1" if reference else "add up to at most a1"
        return text + (
            f" Shared heads run for every token, but their gates are the two-stage weight a0"
            f" times {scale}a softmax over the shared heads, so a small a0 makes them pale;"
            f" a token's routed gates {routed} ({total})."
        )
    return text + (f" A token's gates add up to top-k = {k}." if reference else
                   " A token's gates add up to at most 1.")  # fmt: skip


def draw_head_graph(
    graph: HeadGraph,
    *,
    usage: Sequence[float] | Tensor | None = None,
    num_shared: int | None = None,
    strongest: int | None = None,
    initial: HeadGraph | float | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Heads on a circle, shared heads orange and routed heads green, node area
    proportional to ``usage`` (the fraction of tokens using the head; equal sizes when
    not given).

    Edges show what was learned. Colour is how far each weight moved from its
    ``initial`` value (a graph with the starting weights, e.g. the preset a model was
    built from, or one value; default: the median weight): a diverging scale, red above
    and blue below, symmetric, as wide as the largest change of any edge (drawn or not,
    as in :func:`graphheads.viz_files.head_graph_html` and the explorer) and at least
    +-5% of the initial weight wide, so that small changes stay pale instead of filling
    the scale. Width is proportional to the
    weight (0 to the strongest drawn). Only the ``strongest`` edges are drawn (default:
    all when there are at most 2 per head, else the 2 H strongest); the title says how
    many.
    """
    fig, ax = _axes(ax, (5.6, 5.0))
    g = graph.to_networkx()
    h = graph.num_heads
    shared = num_shared if num_shared is not None else (graph.num_shared or 0)
    nodes = list(g.nodes)
    pos = nx.circular_layout(g)
    use = [1.0] * len(nodes) if usage is None else [float(u) for u in usage]
    sizes = [150 + 1500 * u for u in use]
    colors = [SHARED_COLOR if i < shared else ROUTED_COLOR for i in range(len(nodes))]
    edges = sorted(
        ((u, v, d["weight"]) for u, v, d in g.edges(data=True) if u != v), key=lambda e: -e[2]
    )
    total = len(edges)
    keep = strongest if strongest is not None else (total if total <= 2 * h else 2 * h)
    if keep < 0:
        raise ValueError(f"draw_head_graph: strongest must be >= 0, got {strongest}")
    changes, half = edge_changes(edges, initial)  # the scale: every edge's change
    edges, changes = edges[:keep], changes[:keep]
    weights = [w for _, _, w in edges]
    norm = plt.Normalize(-half, half)
    strongest_weight = max(weights, default=1.0) or 1.0
    nx.draw_networkx_edges(
        g,
        pos,
        ax=ax,
        edgelist=[(u, v) for u, v, _ in edges],
        width=[0.3 + 3.7 * w / strongest_weight for w in weights],
        edge_color=[change_color(c, half) for c in changes],
        arrows=g.is_directed(),
        arrowsize=8,
        node_size=sizes,
        connectionstyle="arc3,rad=0.08",
    )
    nx.draw_networkx_nodes(
        g, pos, ax=ax, node_size=sizes, node_color=colors, edgecolors="black", linewidths=0.8
    )
    nx.draw_networkx_labels(g, pos, ax=ax, labels={n: str(n) for n in nodes}, font_size=9)
    if weights:
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=CHANGE_CMAP), ax=ax, shrink=0.6)
        bar.set_label(
            "edge weight - initial weight (width: weight)"
            if initial is not None
            else "edge weight - median weight (not a change; width: weight)"
        )
    ax.legend(
        handles=[
            Line2D([0], [0], marker="o", color="w", markerfacecolor=c, markersize=10, label=n)
            for c, n in ((SHARED_COLOR, "shared"), (ROUTED_COLOR, "routed"))
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    shown = "all edges" if keep >= total else f"strongest {keep} of {total} edges"
    size = "node area = usage" if usage is not None else "equal node sizes"
    ax.set_title(title or "head graph", pad=18)
    ax.text(
        0.5, 1.01, f"{shown}; {size}", transform=ax.transAxes, ha="center", va="bottom", fontsize=8
    )
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
    colorbar: bool = True,
    vmax: float | None = None,
) -> Figure:
    """A tokens x heads heatmap of one sequence's gates (0 = head unused). Panels side
    by side can share one colour scale: pass the same ``vmax``, ``colorbar=False``, and
    add one bar for all (``fig.colorbar(ax.images[0], ax=axes)``)."""
    gates = gates.detach().float().cpu()
    if gates.dim() != 2:
        raise ValueError(f"plot_routing: gates must be (tokens, heads), got {tuple(gates.shape)}")
    t, h = gates.shape
    fig, ax = _axes(ax, (1.2 + 0.45 * h, 1.2 + 0.28 * t))
    image = ax.imshow(
        gates.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0, vmax=vmax
    )
    ax.set_xticks(range(h), [f"{'s' if i < num_shared else 'r'}{i}" for i in range(h)], fontsize=8)
    ax.set_yticks(
        range(t), list(tokens) if tokens is not None else [str(i) for i in range(t)], fontsize=7
    )
    ax.set_xlabel("head (s = shared, r = routed)")
    ax.set_ylabel("token")
    if colorbar:
        fig.colorbar(image, ax=ax, label="gate")
    ax.set_title(title or "routing")
    return fig


def plot_patch_routing(
    gates: Tensor,
    grid: tuple[int, int],
    *,
    image: Tensor | None = None,
    num_shared: int = 0,
    title: str | None = None,
) -> Figure:
    """Routing over image patches: one panel per head, each patch coloured by the
    head's gate (0 = the patch does not use the head), on one colour scale.

    Args:
        gates: (patches, heads) gates of one image, patches in row-major grid order (drop
            a class token first).
        grid: (rows, columns) of patches.
        image: (H, W) the image itself, drawn first in grey (optional).
        num_shared: shared heads (labelled ``s``; routed heads ``r``).
    """
    gates = gates.detach().float().cpu()
    rows, cols = grid
    if gates.dim() != 2 or gates.size(0) != rows * cols:
        raise ValueError(
            f"plot_patch_routing: gates must be (patches, heads) with {rows} x {cols} patches, "
            f"got {tuple(gates.shape)}"
        )
    h = gates.size(1)
    panels = h + (image is not None)
    fig, axes = plt.subplots(1, panels, figsize=(1.3 * panels + 1.0, 1.9), layout="constrained")
    axes = list(axes) if panels > 1 else [axes]
    if image is not None:
        axes[0].imshow(image.detach().float().cpu().numpy(), cmap="gray_r")
        axes[0].set_title("image", fontsize=8)
    top = max(float(gates.max()), 1e-6)
    shown = [
        ax.imshow(gates[:, head].view(rows, cols).numpy(), cmap="viridis", vmin=0.0, vmax=top)
        for head, ax in enumerate(axes[panels - h :])
    ]
    for head, ax in enumerate(axes[panels - h :]):
        ax.set_title(f"{'s' if head < num_shared else 'r'}{head}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown[0], ax=axes, label="gate", shrink=0.8)
    fig.suptitle(title or "heads used by each patch", fontsize=9)
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


def plot_loss_curve(
    records: Sequence[Mapping[str, Any]], *, ax: Axes | None = None, smooth: int | None = None
) -> Figure:
    """Training loss against step from metrics records: each logged step's loss (one
    batch: noisy) faint, and its trailing mean over ``smooth`` logged points (default:
    a twentieth of them, so the mean lags little); the evaluation loss (the mean over
    tasks for a task run, the held-out text for a corpus run), all in nats per token."""
    if smooth is not None and smooth < 1:
        raise ValueError(f"plot_loss_curve: smooth must be >= 1, got {smooth}")
    fig, ax = _axes(ax, (6.0, 3.5))
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    eval_records = [r for r in records if r.get("kind") == "eval"]
    evals = [(r["step"], r["loss"]) for r in eval_records]
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="C0", alpha=0.3, lw=0.8, label="train (one batch)")
        smooth = smooth if smooth is not None else max(1, round(len(losses) / 20))
        label = f"train (mean of {smooth} logged)"
        ax.plot(steps, trailing_mean(losses, smooth), color="C0", lw=1.6, label=label)
    if evals:
        tasks = any("accuracy" in r for r in eval_records)  # only a task run scores tasks
        label = "eval (mean over tasks)" if tasks else "eval (held-out text)"
        ax.plot(*zip(*evals, strict=True), "o-", color="C1", label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("loss")
    return fig


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it, over the finite ones (a
    NaN or inf loss stays out of every window it falls in; NaN where none is finite)."""
    x = torch.tensor(values, dtype=torch.float64)
    x = x.where(x.isfinite(), float("nan"))
    padded = torch.cat([x.new_full((window - 1,), float("nan")), x])
    return padded.unfold(0, window, 1).nanmean(dim=1).tolist()


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
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # never over a bar
    ax.set_title("evaluation accuracy per task")
    return fig


def coactivation_graph(
    routing: RoutingOutput | Tensor,
    *,
    padding_mask: Tensor | None = None,
    min_weight: float = 0.0,
    token_mask: Tensor | None = None,  # deprecated: padding_mask
) -> nx.Graph:
    """How often heads fire together: an undirected graph whose edge ``(i, j)`` has
    ``weight`` = the fraction of tokens that use both heads i and j, and whose nodes carry
    ``usage`` (fraction of tokens using the head) and ``shared``.

    Args:
        routing: a :class:`~graphheads.moh.RoutingOutput`, or a (..., h) boolean mask of
            active heads.
        padding_mask: (...) boolean, True at the tokens that do not count (padding, or
            positions without a target); default: all count. (``token_mask``, True at
            the tokens that count, is deprecated.)
        min_weight: leave out edges below this weight.
    """
    padding_mask = padding_from_token_mask("coactivation_graph", token_mask, padding_mask)
    shared = routing.num_shared if isinstance(routing, RoutingOutput) else 0
    active = routing.active_heads if isinstance(routing, RoutingOutput) else routing.bool()
    active = active.detach().reshape(-1, active.size(-1)).float()  # (tokens, h)
    if padding_mask is not None:
        active = active[~padding_mask.detach().reshape(-1).bool()]
    if active.size(0) == 0:
        raise ValueError("coactivation_graph: no tokens to count")
    together = active.T @ active / active.size(0)  # (h, h)
    g = nx.Graph()
    for i in range(together.size(0)):
        g.add_node(i, usage=float(together[i, i]), shared=i < shared)
    for i in range(together.size(0)):
        for j in range(i + 1, together.size(0)):
            w = float(together[i, j])
            if w > 0 and w >= min_weight:
                g.add_edge(i, j, weight=w)
    return g


def draw_coactivation(
    graph: nx.Graph, *, ax: Axes | None = None, title: str | None = None
) -> Figure:
    """Draw a :func:`coactivation_graph`: node size = usage, edge width = how often the
    two heads fire together."""
    fig, ax = _axes(ax, (5.0, 5.0))
    pos = nx.circular_layout(graph)
    sizes = [200 + 1600 * graph.nodes[n]["usage"] for n in graph.nodes]
    colors = [SHARED_COLOR if graph.nodes[n].get("shared") else ROUTED_COLOR for n in graph.nodes]
    widths = [0.3 + 6.0 * d["weight"] for _, _, d in graph.edges(data=True)]
    nx.draw_networkx_edges(graph, pos, ax=ax, width=widths, alpha=0.5, edge_color="#555555")
    nx.draw_networkx_nodes(
        graph, pos, ax=ax, node_size=sizes, node_color=colors, edgecolors="black"
    )
    nx.draw_networkx_labels(graph, pos, ax=ax, font_size=9)
    keys = [  # the widths drawn above, for three values
        Line2D([0], [0], color="#555555", alpha=0.5, lw=0.3 + 6.0 * f, label=f"{f:.0%}")
        for f in (0.25, 0.5, 1.0)
    ]
    ax.legend(
        handles=keys,
        title="edge width: tokens where both heads fire",
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=3,
        fontsize=7,
        title_fontsize=7,
        frameon=False,
    )
    ax.text(
        0.5, 1.0, "node area: tokens using the head (0 to 100%)", transform=ax.transAxes,
        ha="center", va="bottom", fontsize=7,
    )  # fmt: skip
    ax.set_title(title or "head co-activation", pad=14)
    ax.set_axis_off()
    ax.margins(0.15)
    return fig

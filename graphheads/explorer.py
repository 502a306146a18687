"""Interactive figures of heads with plotly (the ``viz`` extra): the head graph with
arrows and an edge slider, head usage, each token's gates, co-activation, and training
curves. Each function returns a ``plotly.graph_objects.Figure``, which a notebook shows
inline (``fig.show()``, or as a cell's last value) and
:func:`graphheads.explorer_page.write_explorer` puts together into one offline HTML page
of a trained run.

Why plotly: one figure object renders the same in Jupyter and in a self-contained HTML
file (plotly.js inlined: no network at view time), with hover, sliders and click events
built in; the page's cross-figure highlight is a few lines of JavaScript on
``plotly_click``. The head layout is the PNG figures' (:func:`networkx.circular_layout`:
head 0 on the right, counter-clockwise).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
from torch import Tensor

from graphheads.graph import HeadGraph
from graphheads.viz import trailing_mean
from graphheads.viz_files import ROUTED_COLOR, SHARED_COLOR, change_color, edge_changes

__all__ = [
    "TokenGates",
    "coactivation_figure",
    "curves_figure",
    "gates_figure",
    "head_graph_figure",
    "usage_figure",
]


def _go() -> Any:
    try:
        import plotly.graph_objects as go
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "graphheads.explorer needs plotly: pip install 'graphheads[viz]'"
        ) from err
    return go


def _node_trace(
    go: Any, g: nx.Graph, usage: Sequence[float], shared: Sequence[bool], name: str
) -> Any:
    """Heads as markers in ``g``'s node order (head order), at the circular layout;
    ``customdata`` is the head's index (what a click reports), the text its label."""
    pos = nx.circular_layout(g)
    nodes = list(g.nodes)
    kinds = ["shared" if s else "routed" for s in shared]
    return go.Scatter(
        x=[float(pos[n][0]) for n in nodes],
        y=[float(pos[n][1]) for n in nodes],
        mode="markers+text",
        text=[str(n) for n in nodes],
        textfont={"color": "white"},
        marker={
            "size": [16 + 26 * math.sqrt(max(u, 0.0)) for u in usage],
            "color": [SHARED_COLOR if s else ROUTED_COLOR for s in shared],
            "line": {"color": "black", "width": 1},
        },
        customdata=list(range(len(nodes))),
        hovertext=[
            f"head {n} ({kind}), usage {u:.3f} (fraction of tokens)"
            for n, kind, u in zip(nodes, kinds, usage, strict=True)
        ],
        hoverinfo="text",
        name=name,
        showlegend=False,
    )


def _square(fig: Any, title: str, subtitle: str) -> Any:
    hidden = {"visible": False, "range": [-1.35, 1.35]}
    fig.update_layout(
        title={"text": f"{title}<br><sup>{subtitle}</sup>"},
        xaxis=hidden,
        yaxis={**hidden, "scaleanchor": "x"},
        width=560,
        height=600,
        margin={"l": 10, "r": 10, "t": 90, "b": 80},
        plot_bgcolor="white",
    )
    return fig


def head_graph_figure(
    graph: HeadGraph,
    *,
    initial: HeadGraph | float | None = None,
    usage: Sequence[float] | Tensor | None = None,
    num_shared: int | None = None,
    shown: int | None = None,
    title: str = "head graph",
) -> Any:
    """The head graph as directed weighted arrows, strongest first, as
    :func:`graphheads.viz.draw_head_graph` draws it: colour = weight - ``initial``
    weight (diverging, symmetric, at least +-5% of the initial weight wide), width
    proportional to the weight, u->v and v->u side by side. A slider sets how many of the
    strongest edges are drawn (``shown`` at first; default: 2 per head). Each arrow is a
    layout annotation (``name`` "edge"); hovering an arrow's midpoint shows its weight
    and change; clicking a head sends a plotly click with the head in ``customdata``."""
    go = _go()
    g = graph.to_networkx()
    h = graph.num_heads
    shared = num_shared if num_shared is not None else (graph.num_shared or 0)
    pos = nx.circular_layout(g)  # keyed by node label: edges name their heads by label
    use = [1.0] * h if usage is None else [float(u) for u in usage]
    if len(use) != h:
        raise ValueError(
            f"head_graph_figure: usage must have one value per head ({h}), got {len(use)}"
        )
    edges = sorted(
        ((u, v, float(d["weight"])) for u, v, d in g.edges(data=True) if u != v),
        key=lambda e: -e[2],
    )
    changes, half = edge_changes(edges, initial)  # the scale: every edge's change
    top = max((w for *_, w in edges), default=1.0) or 1.0
    total = len(edges)
    if shown is not None and shown < 0:
        raise ValueError(f"head_graph_figure: shown must be >= 0, got {shown}")
    # at most 8 per head are ever drawn (a 32-head dense graph has 992 edges)
    cap = max(min(total, 8 * h), min(total, shown or 0))
    edges, changes = edges[:cap], changes[:cap]
    first = min(cap, shown if shown is not None else 2 * h)
    fig = go.Figure()
    mids: list[tuple[float, float, str]] = []
    for i, ((u, v, w), change) in enumerate(zip(edges, changes, strict=True)):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        length = math.hypot(x1 - x0, y1 - y0) or 1.0
        dx, dy = 0.035 * (y1 - y0) / length, -0.035 * (x1 - x0) / length  # to the right
        fig.add_annotation(
            x=float(x1 + dx), y=float(y1 + dy), ax=float(x0 + dx), ay=float(y0 + dy),
            xref="x", yref="y", axref="x", ayref="y", text="", showarrow=True,
            arrowhead=2, arrowsize=1, arrowwidth=0.4 + 3.6 * w / top,
            arrowcolor=change_color(change, half), standoff=14, startstandoff=14,
            opacity=0.9, visible=i < first, name="edge",
        )  # fmt: skip
        tip = f"{u} -> {v}: weight {w:.4f}, change {change:+.4f}"
        mids.append((float((x0 + x1) / 2 + dx), float((y0 + y1) / 2 + dy), tip))

    def midpoints(n: int) -> dict[str, Any]:
        xs, ys, tips = zip(*mids[:n], strict=True) if n else ((), (), ())
        return {"x": [list(xs)], "y": [list(ys)], "hovertext": [list(tips)]}

    start = midpoints(first)
    fig.add_trace(
        go.Scatter(
            x=start["x"][0], y=start["y"][0], hovertext=start["hovertext"][0], hoverinfo="text",
            mode="markers", marker={"size": 9, "color": "rgba(0,0,0,0)"}, name="edges",
            showlegend=False,
        )
    )  # fmt: skip
    fig.add_trace(  # no points: the colour bar of the arrows' change
        go.Scatter(
            x=[None], y=[None], mode="markers", hoverinfo="skip", showlegend=False,
            marker={"colorscale": [[i / 10, change_color(i / 5 - 1, 1)] for i in range(11)],
                    "cmin": -half, "cmax": half, "color": [0.0], "showscale": True,
                    "colorbar": {"title": {"text": "weight - initial" if initial is not None
                                           else "weight - median", "side": "right"},
                                 "thickness": 12, "len": 0.6}},
        )
    )  # fmt: skip
    fig.add_trace(_node_trace(go, g, use, [i < shared for i in range(h)], "heads"))
    counts = sorted({n for n in (h, 2 * h, 4 * h, 8 * h, cap) if n <= cap} | {first})
    if len(edges) > 1:
        steps = [
            {
                "label": str(n),
                "method": "update",
                "args": [
                    midpoints(n),
                    {f"annotations[{i}].visible": i < n for i in range(len(edges))},
                    [0],
                ],
            }
            for n in counts
        ]
        fig.update_layout(
            sliders=[
                {
                    "active": counts.index(first),
                    "currentvalue": {"prefix": "strongest edges drawn: "},
                    "steps": steps,
                    "pad": {"t": 5},
                }
            ]
        )
    scale = "weight - initial weight" if initial is not None else "weight - median weight"
    return _square(
        fig,
        title,
        f"{total} edges{f', the strongest {cap} drawable' if cap < total else ''}; colour: "
        f"{scale} (red up, blue down);<br>width: weight; node size: usage; orange: shared "
        "heads (always on), green: routed",
    )


def _head_ticks(heads: int, num_shared: int) -> dict[str, Any]:
    """Head axis ticks as the PNG figures label them: s0, s1 (shared), r2, ... (routed)."""
    labels = [f"{'s' if i < num_shared else 'r'}{i}" for i in range(heads)]
    return {"tickmode": "array", "tickvals": list(range(heads)), "ticktext": labels}


def usage_figure(usage: Mapping[str, Sequence[Sequence[float]]], *, num_shared: int = 0) -> Any:
    """Head usage per task: one heatmap row per (task, layer), a column per head; the
    value is the fraction of the task's scored tokens that use the head."""
    go = _go()
    rows, labels, custom = [], [], []
    heads = len(next(iter(next(iter(usage.values()), [])), []))
    kinds = ["shared" if i < num_shared else "routed" for i in range(heads)]
    for task, per_layer in usage.items():
        for layer, row in enumerate(per_layer):
            if len(row) != heads:
                raise ValueError(
                    f"usage_figure: {task} layer {layer} has {len(row)} heads, not {heads}"
                )
            rows.append([float(u) for u in row])
            labels.append(f"{task} / layer {layer}")
            custom.append([[kind, task, layer] for kind in kinds])  # what a click reports
    fig = go.Figure(
        go.Heatmap(
            z=rows, x=list(range(heads)), y=labels, zmin=0.0, zmax=1.0, colorscale="Magma",
            customdata=custom,
            hovertemplate="%{y}<br>head %{x} (%{customdata[0]})<br>usage %{z:.3f}<extra></extra>",
            colorbar={"title": {"text": "fraction"}},
        )
    )  # fmt: skip
    fig.update_layout(
        title="head usage per task (fraction of scored tokens using each head)",
        xaxis={"title": {"text": "head (s: shared, r: routed)"}, **_head_ticks(heads, num_shared)},
        yaxis={"autorange": "reversed"},
        height=160 + 26 * len(rows),
        margin={"l": 10, "r": 50, "t": 50, "b": 40},
    )
    return fig


@dataclass
class TokenGates:
    """One example's routing: its tokens' names, and per layer the gates (t, h) and the
    active heads (t, h) boolean."""

    tokens: list[str]
    gates: list[Tensor]
    active: list[Tensor]

    def __post_init__(self) -> None:
        shapes = {tuple(x.shape) for x in (*self.gates, *self.active)}
        if len(self.gates) != len(self.active) or len(shapes) > 1:
            raise ValueError(
                f"TokenGates: gates and active must be one (t, h) tensor per layer, all of "
                f"one shape; got {len(self.gates)} gates, {len(self.active)} masks, "
                f"shapes {sorted(shapes)}"
            )
        if shapes and next(iter(shapes))[0] != len(self.tokens):
            raise ValueError(
                f"TokenGates: {len(self.tokens)} token names for {next(iter(shapes))[0]} "
                "rows of gates"
            )


def gates_figure(
    examples: Mapping[str, TokenGates], *, num_shared: int = 0, caption: str = ""
) -> Any:
    """Each token's gate per head (tokens down, heads across), one heatmap per
    (example, layer) chosen in a menu; hover shows token, head, gate and whether the
    head is shared, routed-active or off. The last trace (``name`` "selected", empty
    here) is where the explorer page marks the tokens routed to a clicked head."""
    go = _go()
    fig = go.Figure()
    labels: list[str] = []
    ticks: list[dict[str, Any]] = []  # each trace's token names on the y axis
    for name, ex in examples.items():
        for layer, (gates, active) in enumerate(zip(ex.gates, ex.active, strict=True)):
            t, h = gates.shape
            states = [
                [
                    "shared" if j < num_shared else ("active" if bool(active[i, j]) else "off")
                    for j in range(h)
                ]
                for i in range(t)
            ]
            custom = [[[states[i][j], ex.tokens[i], i] for j in range(h)] for i in range(t)]
            fig.add_trace(
                go.Heatmap(
                    z=gates.float().tolist(), x=list(range(h)), y=list(range(t)),
                    customdata=custom, colorscale="Viridis", zmin=0.0,
                    hovertemplate="token %{customdata[2]}: %{customdata[1]}<br>head %{x}"
                    "<br>gate %{z:.3f}<br>%{customdata[0]}<extra></extra>",
                    colorbar={"title": {"text": "gate"}}, visible=not labels,
                    name=f"{name} / layer {layer}",
                    meta={"tokens": ex.tokens, "task": name, "layer": layer},
                )
            )  # fmt: skip
            labels.append(f"{name} / layer {layer}")
            ticks.append({"yaxis.tickvals": list(range(t)), "yaxis.ticktext": ex.tokens,
                          "yaxis.range": [t - 0.5, -0.5]})  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=[], y=[], mode="markers", name="selected", hoverinfo="skip", showlegend=False,
            marker={"symbol": "square-open", "size": 14, "color": "#e7298a", "line": {"width": 3}},
        )
    )  # fmt: skip
    n = len(labels)
    buttons = [
        {
            "label": label,
            "method": "update",
            "args": [{"visible": [j == i for j in range(n)] + [True]}, ticks[i]],
        }
        for i, label in enumerate(labels)
    ]
    longest = max((len(ex.tokens) for ex in examples.values()), default=1)
    heads = next(iter(examples.values())).gates[0].size(-1) if examples else 0
    lines = textwrap.wrap(caption, 120)
    fig.update_layout(
        title={"text": "gates per token (down) and head (across)"
               + "".join(f"<br><sup>{line}</sup>" for line in lines),
               "yref": "container", "y": 1.0, "yanchor": "top", "pad": {"t": 16}},
        updatemenus=[{"buttons": buttons, "x": 0.0, "y": 1.0, "xanchor": "left",
                      "yanchor": "bottom", "pad": {"b": 24}}],
        xaxis={"side": "top", "range": [-0.5, heads - 0.5], **_head_ticks(heads, num_shared)},
        yaxis={"range": ticks[0]["yaxis.range"] if ticks else None, "tickmode": "array",
               "tickvals": ticks[0]["yaxis.tickvals"] if ticks else [],
               "ticktext": ticks[0]["yaxis.ticktext"] if ticks else []},
        height=max(360, 240 + 24 * len(lines) + 16 * longest),
        margin={"l": 10, "r": 50, "t": 110 + 22 * len(lines), "b": 20},
    )  # fmt: skip
    return fig


def coactivation_figure(graphs: Mapping[str, nx.Graph], *, title: str = "co-activation") -> Any:
    """:func:`graphheads.viz.coactivation_graph` graphs side by side (one per task):
    line width = the fraction of tokens where both heads fire, node size = usage."""
    go = _go()
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=max(1, len(graphs)), subplot_titles=list(graphs))
    for col, g in enumerate(graphs.values(), start=1):
        pos = nx.circular_layout(g)
        for u, v, d in g.edges(data=True):
            w = float(d["weight"])
            fig.add_trace(
                go.Scatter(
                    x=[float(pos[u][0]), float(pos[v][0])], y=[float(pos[u][1]), float(pos[v][1])],
                    mode="lines", line={"width": 0.3 + 6.0 * w, "color": "rgba(85,85,85,0.5)"},
                    hovertext=f"heads {u} and {v}: {w:.1%} of tokens", hoverinfo="text",
                    showlegend=False,
                ),
                row=1, col=col,
            )  # fmt: skip
        usage = [float(g.nodes[n].get("usage", 1.0)) for n in g.nodes]
        shared = [bool(g.nodes[n].get("shared")) for n in g.nodes]
        fig.add_trace(_node_trace(go, g, usage, shared, "heads"), row=1, col=col)
    fig.update_xaxes(visible=False, range=[-1.35, 1.35])
    fig.update_yaxes(visible=False, range=[-1.35, 1.35])
    fig.update_layout(
        title={"text": f"{title}<br><sup>line width: tokens where both heads fire; "
               "node size: tokens using the head</sup>"},
        height=380, plot_bgcolor="white",
        margin={"l": 10, "r": 10, "t": 80, "b": 10},
    )  # fmt: skip
    return fig


def curves_figure(records: Sequence[Mapping[str, Any]]) -> Any:
    """Loss (train per logged step faint, its trailing mean over a twentieth of the
    points, evaluation) and, beside it, per-task evaluation accuracy (task runs) or
    held-out bits per byte (text runs) against step."""
    go = _go()
    from plotly.subplots import make_subplots

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    tasks = list(dict.fromkeys(t for r in evals for t in r.get("accuracy", {})))
    bits = any("bits_per_byte" in r for r in evals)
    right = "token accuracy per task" if tasks else ("held-out bits per byte" if bits else "")
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss (nats per token)", right])
    if train:
        steps, losses = (list(x) for x in zip(*train, strict=True))
        window = max(1, round(len(losses) / 20))
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=losses,
                name="train (one batch)",
                mode="lines",
                line={"color": "#1f77b4", "width": 1},
                opacity=0.3,
            ),
            1,
            1,
        )
        fig.add_trace(go.Scatter(x=steps, y=trailing_mean(losses, window), mode="lines",
                                 name=f"train (trailing mean of {window} logged steps)"
                                 if window > 1 else "train",
                                 line={"color": "#1f77b4", "width": 2}), 1, 1)  # fmt: skip
    if evals:
        label = "eval (mean over tasks)" if tasks else "eval (held-out)"
        fig.add_trace(go.Scatter(x=[r["step"] for r in evals], y=[r["loss"] for r in evals],
                                 name=label, mode="lines+markers",
                                 line={"color": "#ff7f0e"}), 1, 1)  # fmt: skip
    if tasks:
        for task in tasks:
            points = [
                (r["step"], r["accuracy"][task]) for r in evals if task in r.get("accuracy", {})
            ]
            fig.add_trace(go.Scatter(x=[s for s, _ in points], y=[a for _, a in points],
                                     name=task, mode="lines+markers"), 1, 2)  # fmt: skip
        fig.update_yaxes(range=[0, 1.05], row=1, col=2)
    elif bits:
        points = [(r["step"], r["bits_per_byte"]) for r in evals if "bits_per_byte" in r]
        fig.add_trace(go.Scatter(x=[s for s, _ in points], y=[b for _, b in points],
                                 name="bits per byte", mode="lines+markers"), 1, 2)  # fmt: skip
    fig.update_xaxes(title={"text": "step"}, matches="x")  # one step axis for both panels
    fig.update_layout(height=380, margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return fig

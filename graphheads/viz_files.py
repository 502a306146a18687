"""Head graphs as files: GraphML or JSON for other tools (:func:`export_graph`), and a
self-contained HTML page with an SVG drawing (:func:`head_graph_html`). Re-exported by
:mod:`graphheads.viz`.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.colors
import networkx as nx

from graphheads.graph import HeadGraph

__all__ = [
    "CHANGE_CMAP",
    "ROUTED_COLOR",
    "SHARED_COLOR",
    "change_color",
    "edge_changes",
    "export_graph",
    "head_graph_html",
]

SHARED_COLOR, ROUTED_COLOR = "#d95f02", "#1b9e77"
CHANGE_CMAP = "RdBu_r"  # weight changes: blue down, red up


def _as_networkx(graph: HeadGraph | nx.Graph) -> nx.Graph:
    return graph.to_networkx() if isinstance(graph, HeadGraph) else graph


def export_graph(graph: HeadGraph | nx.Graph, path: str | Path) -> Path:
    """Write a head graph (current weights) or any networkx graph as GraphML
    (``.graphml``) or node-link JSON (``.json``)."""
    path = Path(path)
    g = _as_networkx(graph)
    if path.suffix == ".graphml":
        nx.write_graphml(g, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(nx.node_link_data(g, edges="edges"), indent=2))
    else:
        raise ValueError(f"export_graph: use a .graphml or .json path, got {path.name!r}")
    return path


def change_color(change: float, half: float) -> str:
    """The colour of a weight's change on a scale of +-``half`` (blue below 0, pale at 0,
    red above): matplotlib's :data:`CHANGE_CMAP`, the one the PNG figures draw with, so
    the PNG, the SVG page and the explorer show one scale."""
    f = max(-1.0, min(1.0, change / half)) if half > 0 else 0.0
    return matplotlib.colors.to_hex(matplotlib.colormaps[CHANGE_CMAP](0.5 + 0.5 * f))


def edge_changes(
    edges: Sequence[tuple[int, int, float]], initial: HeadGraph | float | None
) -> tuple[list[float], float]:
    """Each edge's change from its ``initial`` weight (a graph: 0 where it had no such
    edge; one value; default the median weight), and the half-width of an honest
    symmetric scale: the largest change, at least 5% of the median initial weight."""
    if isinstance(initial, HeadGraph):
        start = initial.to_networkx()
        starts = [float(start.get_edge_data(u, v, {"weight": 0.0})["weight"]) for u, v, _ in edges]
    elif initial is not None:
        starts = [float(initial)] * len(edges)
    else:
        weights = sorted(w for *_, w in edges)
        starts = [weights[(len(weights) - 1) // 2] if weights else 1.0] * len(edges)
    changes = [w - w0 for (*_, w), w0 in zip(edges, starts, strict=True)]
    reference = abs(sorted(starts)[(len(starts) - 1) // 2]) if starts else 1.0
    return changes, max([abs(c) for c in changes] + [0.05 * reference, 1e-6])


def head_graph_html(
    graph: HeadGraph | nx.Graph,
    path: str | Path,
    *,
    usage: Sequence[float] | None = None,
    initial: HeadGraph | float | None = None,
    strongest: int | None = None,
    title: str = "head graph",
) -> Path:
    """A self-contained HTML page (inline SVG and CSS, no scripts, no CDN) in the PNG
    figure's layout (:func:`networkx.circular_layout`: head 0 on the right,
    counter-clockwise): each directed edge an arrow (u -> v and v -> u side by side, each
    with its own tooltip), width proportional to the weight, colour the change from
    ``initial`` (as :func:`graphheads.viz.draw_head_graph`); only the ``strongest``
    edges (default: all when there are at most 2 per head, else the 2 H strongest).
    Hovering a head or an edge shows its usage or weight and highlights it. For an
    interactive page of a whole run, see :func:`graphheads.explorer_page.write_explorer`."""
    g = _as_networkx(graph)
    nodes = list(g.nodes)
    size, radius = 520, 200
    pos = nx.circular_layout(g)
    xy = {
        n: (size / 2 + radius * float(p[0]), size / 2 - radius * float(p[1]))
        for n, p in pos.items()
    }
    edges = sorted(
        ((u, v, float(d.get("weight", 1.0))) for u, v, d in g.edges(data=True) if u != v),
        key=lambda e: -e[2],
    )
    keep = (
        strongest
        if strongest is not None
        else (len(edges) if len(edges) <= 2 * len(nodes) else 2 * len(nodes))
    )
    if keep < 0:
        raise ValueError(f"head_graph_html: strongest must be >= 0, got {strongest}")
    total = len(edges)
    changes, half = edge_changes(edges, initial)  # the scale: every edge's change
    edges, changes = edges[:keep], changes[:keep]
    top = max((w for *_, w in edges), default=1.0) or 1.0
    directed = g.is_directed()
    marker = ' marker-end="url(#arrow)"' if directed else ""
    parts = []
    for (u, v, w), change in zip(edges, changes, strict=True):
        (x1, y1), (x2, y2) = xy[u], xy[v]
        length = math.hypot(x2 - x1, y2 - y1) or 1.0
        ux, uy = (x2 - x1) / length, (y2 - y1) / length
        dx, dy = (-uy * 5, ux * 5) if directed else (0.0, 0.0)  # beside its reverse
        trim = 22  # stop at the node's rim
        tip = html.escape(f"{u} -> {v}: weight {w:.4f}, change {change:+.4f}")
        parts.append(
            f'<line class="edge" x1="{x1 + ux * trim + dx:.1f}" y1="{y1 + uy * trim + dy:.1f}" '
            f'x2="{x2 - ux * trim + dx:.1f}" y2="{y2 - uy * trim + dy:.1f}" '
            f'stroke="{change_color(change, half)}" stroke-width="{0.5 + 4.5 * w / top:.2f}"'
            f"{marker}><title>{tip}</title></line>"
        )
    for i, node in enumerate(nodes):
        attrs = g.nodes[node]
        use = float(usage[i]) if usage is not None else float(attrs.get("usage", 1.0))
        shared = bool(attrs.get("shared", False))
        x, y = xy[node]
        tip = html.escape(f"head {node} ({'shared' if shared else 'routed'}), usage {use:.3f}")
        color = SHARED_COLOR if shared else ROUTED_COLOR
        parts.append(
            f'<g class="node"><circle cx="{x:.1f}" cy="{y:.1f}" r="{10 + 12 * math.sqrt(use):.1f}" '
            f'fill="{color}"><title>{tip}</title></circle>'
            f'<text x="{x:.1f}" y="{y + 4:.1f}">{html.escape(str(node))}</text></g>'
        )
    scale = "the starting weight" if initial is not None else "the median weight"
    shown = "all edges" if keep >= total else f"the strongest {keep} of {total} edges"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.edge {{ stroke-opacity: 0.85; }}
.edge:hover {{ stroke: #000; stroke-opacity: 1; }}
.node circle {{ stroke: #000; stroke-width: 1; }}
.node:hover circle {{ stroke-width: 3; }}
.node text {{ text-anchor: middle; font-size: 12px; pointer-events: none; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Orange: shared heads; green: routed heads; node size: usage. Arrows ({shown}): width
proportional to the weight, colour its change from {scale} (red up, blue down, pale
unchanged; scale +-{half:.3g}). Hover for values.</p>
<svg width="{size}" height="{size}" viewBox="0 0 {size} {size}">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="5"
markerHeight="5" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"
fill="#444"/></marker></defs>
{chr(10).join(parts)}
</svg></body></html>
"""
    path = Path(path)
    path.write_text(page)
    return path

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

import networkx as nx

from graphheads.graph import HeadGraph

__all__ = ["ROUTED_COLOR", "SHARED_COLOR", "export_graph", "head_graph_html"]

SHARED_COLOR, ROUTED_COLOR = "#d95f02", "#1b9e77"


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


def head_graph_html(
    graph: HeadGraph | nx.Graph,
    path: str | Path,
    *,
    usage: Sequence[float] | None = None,
    title: str = "head graph",
) -> Path:
    """A self-contained HTML page (inline SVG and CSS, no scripts, no CDN): heads on a
    circle; hovering a head or an edge shows its usage or weight and highlights it."""
    g = _as_networkx(graph)
    nodes = list(g.nodes)
    n = len(nodes)
    size, radius = 520, 200
    xy = {
        node: (
            size / 2 + radius * math.cos(2 * math.pi * i / n - math.pi / 2),
            size / 2 + radius * math.sin(2 * math.pi * i / n - math.pi / 2),
        )
        for i, node in enumerate(nodes)
    }
    weights = [float(d.get("weight", 1.0)) for _, _, d in g.edges(data=True)]
    top = max(weights, default=1.0) or 1.0
    parts = []
    for u, v, d in g.edges(data=True):
        w = float(d.get("weight", 1.0))
        (x1, y1), (x2, y2) = xy[u], xy[v]
        tip = html.escape(f"{u} -> {v}: weight {w:.4f}")
        parts.append(
            f'<line class="edge" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke-width="{0.5 + 6 * w / top:.2f}"><title>{tip}</title></line>'
        )
    for i, node in enumerate(nodes):
        attrs = g.nodes[node]
        use = float(usage[i]) if usage is not None else float(attrs.get("usage", 1.0))
        shared = bool(attrs.get("shared", False))
        x, y = xy[node]
        tip = html.escape(f"head {node} ({'shared' if shared else 'routed'}), usage {use:.3f}")
        color = SHARED_COLOR if shared else ROUTED_COLOR
        parts.append(
            f'<g class="node"><circle cx="{x:.1f}" cy="{y:.1f}" r="{10 + 22 * use:.1f}" '
            f'fill="{color}"><title>{tip}</title></circle>'
            f'<text x="{x:.1f}" y="{y + 4:.1f}">{html.escape(str(node))}</text></g>'
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.edge {{ stroke: #555; stroke-opacity: 0.45; }}
.edge:hover {{ stroke: #c00; stroke-opacity: 1; }}
.node circle {{ stroke: #000; stroke-width: 1; }}
.node:hover circle {{ stroke-width: 3; }}
.node text {{ text-anchor: middle; font-size: 12px; pointer-events: none; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Orange: shared heads; green: routed heads. Node size: usage; line width: weight.
Hover for values.</p>
<svg width="{size}" height="{size}" viewBox="0 0 {size} {size}">
{chr(10).join(parts)}
</svg></body></html>
"""
    path = Path(path)
    path.write_text(page)
    return path

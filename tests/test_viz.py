import json

import matplotlib

matplotlib.use("Agg")

import networkx as nx
import pytest
import torch

from graphheads import GraphRouter, HeadGraph, viz


def test_coactivation_counts_tokens_where_both_heads_fire():
    active = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    g = viz.coactivation_graph(active)
    assert g.nodes[0]["usage"] == pytest.approx(0.75)
    assert g[0][1]["weight"] == pytest.approx(0.5) and g[0][2]["weight"] == pytest.approx(0.25)
    assert not g.has_edge(1, 2)  # never together
    masked = viz.coactivation_graph(active, padding_mask=torch.tensor([False, False, True, True]))
    assert masked[0][1]["weight"] == pytest.approx(0.5) and masked.nodes[2][
        "usage"
    ] == pytest.approx(0.5)


def test_coactivation_from_routing_marks_shared_heads():
    routing = GraphRouter(16, 6, 2, 2)(torch.randn(2, 5, 16))
    g = viz.coactivation_graph(routing)
    assert [g.nodes[i]["shared"] for i in range(6)] == [True, True, False, False, False, False]
    assert g[0][1]["weight"] == pytest.approx(1.0)  # shared heads always fire together
    assert sum(g.nodes[i]["usage"] for i in range(6)) == pytest.approx(2 + 2)  # shared + top-k


@pytest.mark.parametrize("suffix", [".graphml", ".json"])
def test_export_round_trips_weights(tmp_path, suffix):
    graph = HeadGraph.from_edges(4, [(0, 1), (2, 3)], [0.25, 2.0], learnable="edge", num_shared=1)
    path = viz.export_graph(graph, tmp_path / f"g{suffix}")
    if suffix == ".graphml":
        back = nx.read_graphml(path, node_type=int)
    else:
        back = nx.node_link_graph(json.loads(path.read_text()), edges="edges")
    assert back[0][1]["weight"] == pytest.approx(0.25) and back[2][3]["weight"] == pytest.approx(
        2.0
    )
    assert back.nodes[0]["shared"] and not back.nodes[3]["shared"]
    with pytest.raises(ValueError, match=r"use a .graphml or .json path, got 'g.png'"):
        viz.export_graph(graph, tmp_path / "g.png")


def test_html_is_offline_and_labels_every_head_and_edge(tmp_path):
    graph = HeadGraph.ring(5, num_shared=1)
    page = viz.head_graph_html(
        graph, tmp_path / "g.html", usage=[1, 0.5, 0.5, 0.2, 0.1]
    ).read_text()
    assert "<script" not in page and "http" not in page
    assert page.count("<circle") == 5 and page.count("<line") == graph.num_edges
    assert "head 0 (shared), usage 1.000" in page and "head 4 (routed), usage 0.100" in page


def test_figures_carry_labels_and_legends(tmp_path):
    graph = HeadGraph.complete(6, num_shared=2)
    fig = viz.draw_head_graph(graph, usage=[1, 1, 0.5, 0.5, 0.1, 0.1], title="layer 0")
    ax = fig.axes[0]
    assert ax.get_title() == "layer 0"
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["shared", "routed"]
    fig.savefig(tmp_path / "graph.png")
    routing = torch.rand(7, 6)
    fig = viz.plot_routing(routing, tokens=list("abcdefg"), num_shared=2)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["s0", "s1", "r2", "r3", "r4", "r5"]
    assert [t.get_text() for t in ax.get_yticklabels()] == list("abcdefg")
    with pytest.raises(ValueError, match=r"gates must be \(tokens, heads\)"):
        viz.plot_routing(torch.rand(2, 7, 6))
    usage = {"copy": [[1.0, 0.5], [1.0, 0.2]], "sort": [[1.0, 0.1], [0.3, 0.9]]}
    ax = viz.plot_head_usage(usage, num_shared=1).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["copy", "sort"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["L0s0", "L0r1", "L1s0", "L1r1"]
    ax = viz.plot_task_accuracy({"copy": 0.9, "sort": 0.4}, {"copy": 0.1, "sort": 0.1}).axes[0]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["accuracy", "chance"]
    records = [{"kind": "train", "step": s, "loss": 1 / s} for s in (1, 2, 3)] + [
        {"kind": "eval", "step": 3, "loss": 0.5, "accuracy": {"copy": 0.9}}
    ]
    ax = viz.plot_loss_curve(records, smooth=2).axes[0]
    raw, mean, evaluation = ax.get_lines()
    assert [len(line.get_xdata()) for line in (raw, mean, evaluation)] == [3, 3, 1]
    assert raw.get_alpha() < 0.5 and mean.get_alpha() is None  # the raw curve faint
    assert list(mean.get_ydata()) == pytest.approx([1.0, 0.75, (1 / 2 + 1 / 3) / 2])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["train (one batch)", "train (mean of 2 logged)", "eval (mean over tasks)"]
    text = [*records[:3], {"kind": "eval", "step": 3, "loss": 0.5}]  # byte or token shards
    labels = [t.get_text() for t in viz.plot_loss_curve(text).axes[0].get_legend().get_texts()]
    assert labels[-1] == "eval (held-out text)"  # not "mean over tasks" on a text run
    spiky = [{"kind": "train", "step": s, "loss": v} for s, v in enumerate([1, float("nan"), 3, 5])]
    mean = viz.plot_loss_curve(spiky, smooth=2).axes[0].get_lines()[1].get_ydata()
    assert list(mean) == pytest.approx([1.0, 1.0, 3.0, 4.0])  # a NaN stays in its window
    drawn = viz.draw_coactivation(viz.coactivation_graph(torch.rand(10, 4) > 0.5)).axes[0]
    assert drawn.get_title().startswith("head co-activation")
    legend = drawn.get_legend()  # what widths and sizes say
    assert [t.get_text() for t in legend.get_texts()] == ["25%", "50%", "100%"]
    assert legend.get_title().get_text() == "edge width: tokens where both heads fire"
    assert "node area: tokens using the head (0 to 100%)" in [t.get_text() for t in drawn.texts]


def test_head_graph_colours_the_change_from_the_initial_weights_on_an_honest_scale():
    """Weights that moved a little from their start (1.0) stay pale on a scale centred on
    the start; the bar spanned only the drawn weights (1.02 to 1.08), which made noise
    look dramatic. Widths are proportional to the weights."""
    from matplotlib.collections import LineCollection

    graph = HeadGraph.complete(6, learnable="edge")
    start = HeadGraph.complete(6, learnable="edge")
    with torch.no_grad():  # softplus(raw) from 1.02 to 1.08
        target = torch.linspace(1.02, 1.08, graph.num_edges)
        graph.raw_weight.copy_(target.expm1().log())
    fig = viz.draw_head_graph(graph, initial=start)
    ax = fig.axes[0]
    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    widths = sorted(
        [w for c in lines for w in c.get_linewidths()] + [p.get_linewidth() for p in ax.patches]
    )
    assert len(widths) == 12 and widths[-1] / widths[0] < 1.1  # 2 per head; 1.06 vs 1.08
    assert "strongest 12 of 30 edges; equal node sizes" in [t.get_text() for t in ax.texts]
    bar = fig.axes[1]
    assert bar.get_ylim() == pytest.approx((-0.08, 0.08), abs=1e-5)  # centred on the start
    assert bar.get_ylabel().startswith("edge weight - initial weight")
    small = viz.draw_head_graph(graph, initial=1.3).axes[1].get_ylim()
    assert small == pytest.approx((-0.28, 0.28), abs=1e-5)  # the largest change of all 30
    tiny = viz.draw_head_graph(graph, initial=1.05).axes[1].get_ylim()
    assert tiny == pytest.approx((-0.0525, 0.0525), abs=1e-5)  # at least +-5% wide
    every = viz.draw_head_graph(graph, strongest=30, usage=[0.5] * 6).axes[0]
    assert "all edges; node area = usage" in [t.get_text() for t in every.texts]
    with pytest.raises(ValueError, match="strongest must be >= 0, got -1"):
        viz.draw_head_graph(graph, strongest=-1)


def test_accuracy_legend_sits_outside_the_bars():
    fig = viz.plot_task_accuracy({"copy": 0.9, "modadd": 0.95}, {"copy": 0.1, "modadd": 0.09})
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # to the right of the plotting area


def test_patch_routing_draws_one_panel_per_head_on_the_patch_grid():
    gates = torch.zeros(16, 4)
    gates[5, 2] = 0.7  # patch (1, 1) uses head 2
    fig = viz.plot_patch_routing(gates, (4, 4), image=torch.rand(8, 8), num_shared=1)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["image", "s0", "r1", "r2", "r3"]
    shown = panels[3].images[0].get_array()
    assert shown.shape == (4, 4) and shown[1, 1] == pytest.approx(0.7) and shown.sum() == 0.7
    with pytest.raises(ValueError, match=r"with 3 x 3 patches, got \(16, 4\)"):
        viz.plot_patch_routing(gates, (3, 3))


def test_html_draws_arrows_of_the_strongest_edges_in_the_png_layout(tmp_path):
    """Issue 30: the SVG drew all 56 edges of a complete graph as one grey clique of
    near-equal widths, u -> v and v -> u as one line (one tooltip unreachable), no
    arrows, and head 0 at the top while the PNG puts it on the right."""
    import re

    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    graph = HeadGraph.complete(8, learnable="edge")
    with torch.no_grad():  # softplus(raw) from 0.5 to 1.5
        graph.raw_weight.copy_(torch.linspace(0.5, 1.5, graph.num_edges).expm1().log())
    page = viz.head_graph_html(graph, tmp_path / "g.html", initial=1.0).read_text()
    lines = re.findall(r'<line class="edge" ([^>]*)><title>([^<]*)</title>', page)
    assert len(lines) == 16 and "Arrows (the strongest 16 of 56 edges)" in page
    assert all('marker-end="url(#arrow)"' in attrs for attrs, _ in lines)
    tips = [tip for _, tip in lines]
    assert len(set(tips)) == 16 and tips[0].startswith("7 -&gt; 6: weight 1.5000")
    coords = {tuple(re.findall(r'[xy][12]="([-\d.]+)"', attrs)) for attrs, _ in lines}
    assert len(coords) == 16  # each direction its own line
    widths = [float(re.search(r'stroke-width="([\d.]+)"', a).group(1)) for a, _ in lines]
    assert widths[0] == pytest.approx(5.0) and widths[-1] < widths[0]
    red_end = to_hex(plt.get_cmap("RdBu_r")(1.0))  # the PNG's colour map, one scale
    assert f'stroke="{red_end}"' in lines[0][0]  # +0.5 from 1.0: the scale's red end
    circles = [float(x) for x in re.findall(r'<circle cx="([\d.]+)"', page)]
    assert max(circles) == circles[0]  # head 0 on the right, as in draw_head_graph

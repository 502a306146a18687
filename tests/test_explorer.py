"""The interactive explorer (issue 30): its plotly figures against the data they draw,
the page and command that write it, and the page in a real headless browser."""

import os
import sys
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import pytest
import torch

from graphheads import HeadGraph
from graphheads.explorer import TokenGates, gates_figure, head_graph_figure, usage_figure

pytest.importorskip("plotly", reason="the viz extra (plotly) is not installed")
import explorer_browser
from plotly.offline import get_plotlyjs


def test_head_graph_draws_each_directed_edge_as_an_arrow_strongest_first():
    graph = HeadGraph.complete(4, learnable="edge")
    start = HeadGraph.complete(4)
    with torch.no_grad():  # softplus(raw) from 0.9 to 1.2
        graph.raw_weight.copy_(torch.linspace(0.9, 1.2, graph.num_edges).expm1().log())
    g = graph.to_networkx()
    expected = sorted(((u, v, d["weight"]) for u, v, d in g.edges(data=True) if u != v),
                      key=lambda e: -e[2])  # fmt: skip
    fig = head_graph_figure(graph, initial=start, num_shared=1, shown=5)
    arrows = fig.layout.annotations
    assert len(arrows) == 12 and all(a.showarrow for a in arrows)  # every u -> v, no loops
    assert [a.visible for a in arrows] == [True] * 5 + [False] * 7  # the 5 strongest
    widths = [a.arrowwidth for a in arrows]
    assert widths == sorted(widths, reverse=True)
    assert widths[0] / widths[-1] == pytest.approx(
        (0.4 + 3.6) / (0.4 + 3.6 * expected[-1][2] / expected[0][2])
    )  # proportional to the weight, not a near-constant width
    # colour: red where the weight rose from the start (1.0), blue where it fell
    from matplotlib.colors import to_hex, to_rgb

    red_end = to_hex(plt.get_cmap("RdBu_r")(1.0))  # the PNG figures' colour map
    assert arrows[0].arrowcolor == red_end  # the largest rise: the scale's red end
    r, _, b = to_rgb(arrows[-1].arrowcolor)
    assert b > r  # 0.9: a fall, blue
    # u -> v and v -> u are two distinct arrows (offset to their right)
    ends = {(round(a.x, 3), round(a.y, 3), round(a.ax, 3), round(a.ay, 3)) for a in arrows}
    assert len(ends) == 12
    # head 0 on the right, as the PNG figure (networkx.circular_layout)
    nodes = fig.data[-1]  # the heads, drawn last (over the arrows)
    assert nodes.x[0] == pytest.approx(1.0) and nodes.y[0] == pytest.approx(0.0, abs=1e-6)
    assert list(nodes.customdata) == [0, 1, 2, 3]
    # the slider steps show 4, 5, 8, 12 of the strongest
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["4", "5", "8", "12"]
    eight = steps[2].args[1]
    assert [eight[f"annotations[{i}].visible"] for i in range(12)] == [True] * 8 + [False] * 4
    with pytest.raises(ValueError, match="shown must be >= 0, got -1"):
        head_graph_figure(graph, shown=-1)


def test_gates_figure_hover_says_token_head_gate_and_state():
    gates = torch.tensor([[0.5, 0.0, 0.7], [0.5, 0.9, 0.0]])
    active = torch.tensor([[True, False, True], [True, True, False]])
    fig = gates_figure(
        {"copy": TokenGates(["a", "b"], [gates, gates.flip(0)], [active, active.flip(0)])},
        num_shared=1,
    )
    first, second, selected = fig.data
    torch.testing.assert_close(torch.tensor(first.z), gates)
    assert [[c[0] for c in row] for row in first.customdata] == [
        ["shared", "off", "active"],
        ["shared", "active", "off"],
    ]
    assert "%{customdata[1]}" in first.hovertemplate and "gate %{z" in first.hovertemplate
    assert (first.visible, second.visible, selected.name) == (True, False, "selected")
    menu = fig.layout.updatemenus[0].buttons
    assert [b.label for b in menu] == ["copy / layer 0", "copy / layer 1"]
    assert menu[1].args[0]["visible"] == [False, True, True]
    assert menu[1].args[1]["yaxis.ticktext"] == ["a", "b"]


def test_usage_figure_rows_are_task_layers():
    fig = usage_figure({"copy": [[1.0, 0.25], [1.0, 0.5]], "sort": [[1.0, 0.75], [1.0, 0.0]]})
    assert fig.data[0].y == ("copy / layer 0", "copy / layer 1", "sort / layer 0", "sort / layer 1")
    assert list(fig.data[0].z[3]) == [1.0, 0.0]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return explorer_browser.train_small_run(tmp_path_factory.mktemp("explorer") / "run")


def test_the_command_writes_one_offline_page_and_the_report_links_it(small_run, tmp_path):
    from graphheads.cli import main
    from graphheads.report import make_report

    out = tmp_path / "page.html"
    assert main(["viz", "--run", str(small_run), "--out", str(out)]) == 0
    page = out.read_text()
    external = []  # script, link or img tags that fetch something (a script's text is not parsed)

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if any(name in ("src", "href") for name, _ in attrs):
                external.append((tag, attrs))

    Tags().feed(page)
    assert external == []
    assert get_plotlyjs()[:2000] in page  # plotly.js inlined
    assert page.count('class="plotly-graph-div"') == 1 + 2 + 1 + 1 + 2  # curves, 2 graphs, ...
    report = make_report(small_run)
    assert (report / "explorer.html").exists()
    assert "[explorer.html](explorer.html)" in (report / "summary.md").read_text()


def test_a_failed_page_leaves_the_earlier_one(small_run, tmp_path, monkeypatch):
    import graphheads.explorer_page as page_module

    out = tmp_path / "explorer.html"
    out.write_text("earlier")

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(page_module.explorer, "gates_figure", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        page_module.write_explorer(small_run, out)
    assert out.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_without_plotly_the_command_names_the_extra(small_run, monkeypatch, capsys):
    from graphheads.cli import main

    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.io", None)
    with pytest.raises(SystemExit) as stop:
        main(["viz", "--run", str(small_run)])
    assert stop.value.code == 2
    assert "pip install 'graphheads[viz]'" in capsys.readouterr().err


@pytest.mark.slow
def test_explorer_in_a_headless_browser(small_run, tmp_path):
    """The page in Debian's Chromium: no console errors, one arrow element per drawn
    edge, a hover label on a gate cell, and a click on a head marking its tokens."""
    missing = explorer_browser.browser_missing()
    if missing:
        if os.environ.get("GRAPHHEADS_REQUIRE_BROWSER"):  # .ci/run installs one
            pytest.fail(f"GRAPHHEADS_REQUIRE_BROWSER is set, but {missing}")
        pytest.skip(f"no headless browser: {missing}")
    from graphheads.explorer_page import write_explorer

    page = write_explorer(small_run, tmp_path / "explorer.html")
    with explorer_browser.chromium() as driver:
        explorer_browser.open_page(driver, page)
        graphs = explorer_browser.head_graph_ids(driver)
        assert len(graphs) == 2  # one per layer
        for graph in graphs:
            drawn, visible = explorer_browser.edge_counts(driver, graph)
            assert drawn == visible == 16  # 2 per head of 8, of 56 edges
        label = explorer_browser.hover(driver, "gh-gates", 2, 1)
        assert "head r2" in label and "gate" in label and ("active" in label or "off" in label)
        before = driver.execute_script("return document.getElementById('gh-selection').textContent")
        nodes = driver.execute_script(
            "const g = document.getElementById(arguments[0]); return g.data.length - 1", graphs[0]
        )
        x, y = driver.execute_script(
            "const t = document.getElementById(arguments[0]).data[arguments[1]];"
            "return [t.x[3], t.y[3]]",
            graphs[0],
            nodes,
        )
        explorer_browser.click(driver, graphs[0], x, y, nodes)
        after = driver.execute_script("return document.getElementById('gh-selection').textContent")
        marked = driver.execute_script(
            "const g = document.getElementById('gh-gates'); return g.data[g.data.length - 1].y"
        )
        first = driver.execute_script(
            "return document.getElementById('gh-gates').data[0].customdata.map(row => row[3][0])"
        )
        assert after != before and after.startswith("head 3 (routed), copy / layer 0")
        assert marked == [i for i, state in enumerate(first) if state != "off"]
        # a head of layer 1's graph: the gates switch to layer 1 (same task)
        explorer_browser.click(driver, graphs[1], x, y, nodes)
        shown = explorer_browser.shown_gates(driver)
        assert shown["name"] == "copy / layer 1" and shown["marked"] == [
            i for i, row in enumerate(shown["customdata"]) if row[3][0] != "off"
        ]
        assert explorer_browser.selection(driver).startswith("head 3 (routed), copy / layer 1")
        # a cell of the usage map: that task and layer
        usage = driver.execute_script(
            "return [...document.querySelectorAll('.gh-heads')]"
            ".find(g => g.data[0].type === 'heatmap' && g.id !== 'gh-gates').id"
        )
        row = driver.execute_script(
            "return document.getElementById(arguments[0]).data[0].y.indexOf('sort / layer 0')",
            usage,
        )
        explorer_browser.click(driver, usage, 4, row)
        assert explorer_browser.shown_gates(driver)["name"] == "sort / layer 0"
        assert explorer_browser.selection(driver).startswith("head 4 (routed), sort / layer 0")
        # another example from the menu clears the marks
        explorer_browser.pick_menu_item(driver, "gh-gates", 1)
        shown = explorer_browser.shown_gates(driver)
        assert shown["name"] == "copy / layer 1" and shown["marked"] == []
        assert explorer_browser.selection(driver).startswith("click a head")
        assert explorer_browser.console_errors(driver) == []


def test_open_run_loads_a_run_in_one_line(small_run, tmp_path):
    import json

    import graphheads

    run = graphheads.open_run(small_run)
    lines = [json.loads(line) for line in (small_run / "metrics.jsonl").read_text().splitlines()]
    assert (run.step, run.metrics, run.folder) == (30, lines, small_run)
    assert run.last_eval == [r for r in lines if r["kind"] == "eval"][-1]
    assert not run.model.training and run.config.train.steps == 30
    assert set(run.last_eval["accuracy"]) == set(run.data.tasks)
    assert graphheads.open_run(small_run / "checkpoint.pt").step == 30
    with pytest.raises(FileNotFoundError, match="no run folder or checkpoint at"):
        graphheads.open_run(tmp_path / "missing")


def test_named_heads_large_graphs_and_bad_inputs():
    import networkx as nx

    from graphheads.explorer import coactivation_figure, curves_figure

    named = nx.DiGraph()
    named.add_edge("q", "k", weight=2.0)
    named.add_edge("k", "v", weight=1.0)
    fig = head_graph_figure(HeadGraph.from_networkx(named), num_shared=1)
    nodes = fig.data[-1]  # the heads, drawn last (over the arrows)
    assert list(nodes.text) == ["q", "k", "v"] and list(nodes.customdata) == [0, 1, 2]
    bar = fig.data[1].marker.colorbar.title.text
    assert bar == "weight - median"  # no initial graph: not a change from a start
    assert nodes.hovertext[0].startswith("head q (shared)")
    # a 32-head dense graph: at most 8 per head drawable, the slider up to them
    big = head_graph_figure(HeadGraph.complete(32), usage=[0.5] * 32)
    assert len(big.layout.annotations) == 256
    assert [s.label for s in big.layout.sliders[0].steps] == ["32", "64", "128", "256"]
    with pytest.raises(ValueError, match=r"usage must have one value per head \(32\), got 3"):
        head_graph_figure(HeadGraph.complete(32), usage=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="3 token names for 2 rows of gates"):
        TokenGates(["a", "b", "c"], [torch.zeros(2, 4)], [torch.zeros(2, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="sort layer 0 has 3 heads, not 2"):
        usage_figure({"copy": [[1.0, 0.5]], "sort": [[1.0, 0.5, 0.2]]})
    # curves without evaluations, and evaluations whose tasks differ
    records = [{"kind": "train", "step": 1, "loss": 2.0},
               {"kind": "eval", "step": 1, "loss": 2.0, "accuracy": {"copy": 0.5}},
               {"kind": "eval", "step": 2, "loss": 1.0, "accuracy": {"sort": 0.25}}]  # fmt: skip
    curves = curves_figure(records)
    assert {t.name for t in curves.data} >= {"copy", "sort"}
    assert curves.layout.xaxis2.matches == "x"  # one step axis for loss and accuracy
    titles = [a.text for a in curves_figure(records[:1]).layout.annotations]
    assert "held-out bits per byte" not in titles and "token accuracy per task" not in titles
    coact = nx.Graph()
    coact.add_node(0, usage=1.0, shared=True)
    coact.add_node(1, usage=0.5, shared=False)
    coact.add_edge(0, 1, weight=0.5)
    assert coactivation_figure({"copy": coact}).data[-1].marker.color == ("#d95f02", "#1b9e77")


def test_a_dense_run_gets_curves_and_says_why_there_is_no_routing(tmp_path):
    from graphheads.explorer_page import explorer_sections

    run = explorer_browser.train_small_run(tmp_path / "mha", "model.attention=mha")
    title, sections = explorer_sections(run)
    assert "mha attention, 2 layers x 8 heads" in title and "routed" not in title
    assert [s[0] for s in sections] == ["Training curves"]
    assert "No routing figures: dense attention (attention='mha') routes no heads" in sections[0][1]

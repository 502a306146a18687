"""The explorer of a trained run: one self-contained HTML page (plotly.js inlined, no
network at view time) with the figures of :mod:`graphheads.explorer`, written by
``graphheads viz --run DIR`` and by the report.

Clicking a head (a node of a layer's head graph, a cell of the usage or gates heatmaps)
shows that layer's (and task's) gates, marks the tokens routed to the head there and lists
them above the figure; picking another example or layer in the menu clears the marks.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from graphheads import explorer
from graphheads.builders import make_head_graph
from graphheads.data import TaskSuite
from graphheads.data.tasks import IGNORE_INDEX
from graphheads.train.checkpoint import write_text_atomically
from graphheads.train.evaluation import forward_batch, load_run, read_metrics
from graphheads.transformer import DecoderOnlyLM
from graphheads.types import RoutingOutput
from graphheads.viz import coactivation_graph, routing_caption

__all__ = ["explorer_sections", "write_explorer"]

# the page's one script: a click on a head marks the tokens routed to it
_SCRIPT = """
const ghIdle = "click a head to list the tokens routed to it";
function ghGates() { return document.getElementById("gh-gates"); }
function ghShown(gd) {  // the visible gates trace (the last trace holds the marks)
  return gd.data.findIndex((t, i) => i < gd.data.length - 1 && t.visible !== false);
}
function ghClear() {
  const gd = ghGates();
  Plotly.restyle(gd, {x: [[]], y: [[]]}, [gd.data.length - 1]);
  document.getElementById("gh-selection").textContent = ghIdle;
}
function ghMark(gd, index, head) {
  const trace = gd.data[index], xs = [], ys = [], names = [];
  trace.customdata.forEach((row, token) => {
    if (row[head] && row[head][0] !== "off") {
      xs.push(head); ys.push(token); names.push(row[head][1]);
    }
  });
  Plotly.restyle(gd, {x: [xs], y: [ys]}, [gd.data.length - 1]);
  const kind = trace.customdata.length && trace.customdata[0][head] &&
    trace.customdata[0][head][0] === "shared" ? "shared" : "routed";
  document.getElementById("gh-selection").textContent =
    `head ${head} (${kind}), ${trace.name}: ${ys.length} of ${trace.customdata.length} ` +
    `tokens routed to it: ` + names.map((n, i) => `${ys[i]}:${n}`).join(" ");
}
// mark head's tokens in the gates of (task, layer); null keeps the shown one's
function ghSelectHead(head, layer, task) {
  const gd = ghGates();
  if (!gd) return;
  const shown = ghShown(gd);
  const now = gd.data[shown].meta;
  const want = {task: task ?? now.task, layer: layer ?? now.layer};
  const index = gd.data.findIndex((t, i) => i < gd.data.length - 1 &&
    t.meta.task === want.task && t.meta.layer === want.layer);
  if (index < 0 || index === shown) { ghMark(gd, shown, head); return; }
  const tokens = gd.data[index].meta.tokens;
  Plotly.update(gd, {visible: gd.data.map((t, i) => i === index || i === gd.data.length - 1)},
    {"yaxis.tickvals": tokens.map((_, i) => i), "yaxis.ticktext": tokens,
     "yaxis.range": [tokens.length - 0.5, -0.5], "updatemenus[0].active": index})
    .then(() => ghMark(gd, index, head));
}
document.querySelectorAll(".gh-heads").forEach(gd => gd.on("plotly_click", event => {
  const point = event.points[0];
  if (point.data.type === "heatmap") {  // usage: (kind, task, layer); gates: the trace's
    const where = gd.id === "gh-gates" ? point.data.meta : point.customdata;
    const [task, layer] = Array.isArray(where) ? [where[1], where[2]] : [where.task, where.layer];
    ghSelectHead(point.x, layer, task);
  } else if (Number.isInteger(point.customdata)) {  // a head graph's node
    ghSelectHead(point.customdata, Number(gd.closest("[data-layer]").dataset.layer), null);
  }
}));
if (ghGates()) ghGates().on("plotly_buttonclicked", ghClear);
"""

_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.row { display: flex; flex-wrap: wrap; gap: 1em; }
#gh-selection { font-family: monospace; background: #f4f4f4; padding: .6em; min-height: 1.2em; }
p.read { color: #555; max-width: 60em; }
"""


def _routing_of(model: DecoderOnlyLM, batch: Any) -> tuple[list[RoutingOutput], torch.Tensor]:
    with torch.no_grad():
        out, targets = forward_batch(model, batch)
    return list(out.routing), targets


def explorer_sections(run_dir: str | Path) -> tuple[str, list[tuple[str, str, list[Any]]]]:
    """The page title and its sections, each (heading, how to read it, plotly figures),
    from a run folder or checkpoint."""
    model, _, data, step = load_run(run_dir)
    config = model.config
    folder = Path(run_dir).resolve()
    folder = folder if folder.is_dir() else folder.parent
    records = read_metrics(folder)
    heads = f"{config.num_heads} heads"
    if config.attention != "mha":
        heads += f" ({config.num_shared} shared, top-{config.routed_top_k} routed)"
    title = (
        f"{folder.name}: step {step}, {config.attention} attention, {config.num_layers} "
        f"layers x {heads}"
    )
    curves = (
        "Training curves",
        "Train loss per logged step (faint: one batch each) with its trailing mean, and "
        "the evaluation; beside it, evaluation accuracy per task or held-out bits/byte.",
        [explorer.curves_figure(records)],
    )
    if config.attention == "mha" or not isinstance(model, DecoderOnlyLM):
        why = (
            "dense attention (attention='mha') routes no heads"
            if config.attention == "mha"
            else "the explorer draws the routing of decoder-only models; this run trained "
            "an encoder-decoder (train.model_type='seq2seq')"
        )
        return title, [(curves[0], f"{curves[1]} No routing figures: {why}.", curves[2])]
    sections = [curves]
    gen = torch.Generator().manual_seed(0)
    if isinstance(data, TaskSuite):
        batches = {task: data.sample(32, gen, task=task) for task in data.tasks}
    else:
        batches = {"text": data.sample(8, gen, split="val")}
    usage: dict[str, list[list[float]]] = {}
    coactivation: dict[str, list[Any]] = {}
    examples: dict[str, explorer.TokenGates] = {}
    for name, batch in batches.items():
        routing, targets = _routing_of(model, batch)
        unscored = targets == IGNORE_INDEX
        graphs = [coactivation_graph(r, padding_mask=unscored) for r in routing]
        coactivation[name] = graphs
        usage[name] = [[g.nodes[i]["usage"] for i in sorted(g.nodes)] for g in graphs]
        ids = batch.inputs[0].tolist()
        if isinstance(data, TaskSuite):
            length = data.sequence_length(name) - 1
            tokens = data.token_names(ids[:length])
        else:
            length = min(len(ids), 64)
            tokens = data.token_names(ids[:length])
        examples[name] = explorer.TokenGates(
            tokens,
            [r.gates[0, :length].detach() for r in routing],
            [r.active_heads[0, :length].detach() for r in routing],
        )
    graphs_per_layer = model.head_graphs()
    start = make_head_graph(config) if graphs_per_layer else None
    if graphs_per_layer:
        sections.append(
            (
                "Head graphs",
                "Arrows u -> v carry routing signals between heads; colour is how far each "
                "weight moved from where training started (red up, blue down, on a symmetric "
                "scale), width the weight. The slider draws more of the strongest edges; "
                "hover an arrow's middle for its weight; click a head to mark its tokens "
                "below.",
                [
                    explorer.head_graph_figure(
                        g,
                        initial=start,
                        usage=torch.tensor([usage[n][i] for n in usage]).mean(0),
                        num_shared=config.num_shared,
                        title=f"layer {i} head graph",
                    )
                    for i, g in enumerate(graphs_per_layer)
                ],
            )
        )
    sections += [
        (
            "Head usage",
            "The fraction of each task's scored tokens that use each head, per layer; "
            "shared heads are on for every token. Click a head to mark its tokens below.",
            [explorer.usage_figure(usage, num_shared=config.num_shared)],
        ),
        (
            "Gates of one example",
            "One example per task (a window of held-out text for text runs): each token's "
            "gate per head. Pick the example and layer in the menu; hover a cell for token, "
            "head, gate and state; click a head to mark the tokens routed to it.",
            [
                explorer.gates_figure(
                    examples, num_shared=config.num_shared, caption=routing_caption(config)
                )
            ],
        ),
        (
            "Co-activation",
            "Heads that fire for the same tokens, per layer: line width is the fraction of "
            "tokens using both heads, node size the fraction using the head.",
            [
                explorer.coactivation_figure(
                    {n: per_layer[i] for n, per_layer in coactivation.items()},
                    title=f"layer {i}: heads firing together",
                )
                for i in range(config.num_layers)
            ],
        ),
    ]
    return title, sections


def write_explorer(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the explorer page of a run (default: ``run_dir/report/explorer.html``),
    atomically: a failure leaves any earlier page as it was. Returns its path."""
    try:
        import plotly.io as pio
        from plotly.offline import get_plotlyjs
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "graphheads viz needs plotly: pip install 'graphheads[viz]'"
        ) from err
    run_dir = Path(run_dir)
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    title, sections = explorer_sections(run_dir)
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, text, figures in sections:
        body += [f"<h2>{html.escape(heading)}</h2>", f'<p class="read">{html.escape(text)}</p>']
        if heading == "Gates of one example":
            body.append('<div id="gh-selection">click a head to list the tokens routed to it</div>')
        body.append('<div class="row">')
        for i, fig in enumerate(figures):
            div_id = {"Gates of one example": "gh-gates"}.get(heading, f"gh-{len(body)}-{i}")
            fig.update_layout(modebar={"orientation": "v"})  # beside the plot, not on titles
            div = pio.to_html(
                fig, full_html=False, include_plotlyjs=False, div_id=div_id,
                config={"displaylogo": False, "responsive": True},
            )  # fmt: skip
            heads = heading in ("Head graphs", "Head usage", "Gates of one example")
            layer = f' data-layer="{i}"' if heading == "Head graphs" else ""
            body.append(f'<div class="{"gh-heads-box" if heads else "box"}"{layer}>{div}</div>')
        body.append("</div>")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>\n"
        + "\n".join(body)
        + "\n<script>\ndocument.querySelectorAll('.gh-heads-box .plotly-graph-div')"
        ".forEach(gd => gd.classList.add('gh-heads'));\n" + _SCRIPT + "</script>\n</body></html>\n"
    )
    path = Path(out) if out is not None else folder / "report" / "explorer.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, page)
    return path

"""A report folder for a training run: figures as PNG and a Markdown summary."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import networkx as nx
import torch
from torch import nn

from graphheads import viz
from graphheads.builders import make_head_graph
from graphheads.data import TaskBatch, TaskSuite
from graphheads.data.tasks import IGNORE_INDEX
from graphheads.train.evaluation import forward_batch, read_metrics
from graphheads.train.trainer import load_run
from graphheads.transformer import DecoderOnlyLM
from graphheads.viz import routing_caption

__all__ = ["make_report", "read_metrics", "routing_caption", "task_coactivation"]


def task_coactivation(
    model: nn.Module, data: TaskSuite, *, batch_size: int = 32, seed: int = 0
) -> dict[str, list[nx.Graph]]:
    """Per task, per layer: the :func:`~graphheads.viz.coactivation_graph` of the heads
    over the scored tokens of a batch of that task (task-conditioned models get the task's
    id, as in training)."""
    gen = torch.Generator().manual_seed(seed)
    graphs = {}
    with torch.no_grad():
        for task in data.tasks:
            out, targets = forward_batch(model, data.sample(batch_size, gen, task=task))
            unscored = targets == IGNORE_INDEX
            graphs[task] = [viz.coactivation_graph(r, padding_mask=unscored) for r in out.routing]
    return graphs


def _save(fig: plt.Figure, path: Path) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def make_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report``: loss.png, accuracy.png, head_usage.png,
    head_graph_layer{i}.png, routing_layer{i}.png, coactivation_layer{i}.png (per task),
    summary.md, and with plotly (the viz extra) the interactive explorer.html
    (:func:`graphheads.explorer_page.write_explorer`). Returns the folder."""
    run_dir = Path(run_dir)
    model, _, data, step = load_run(run_dir)
    records = read_metrics(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    figures: list[str] = [_save(viz.plot_loss_curve(records), out / "loss.png")]
    evals = [r for r in records if r.get("kind") == "eval"]
    last = evals[-1] if evals else {}
    config = model.config
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        f"Step {step}; model: {config.attention} attention, {config.num_layers} layers, "
        f"{config.num_heads} heads ({config.num_shared} shared, top-{config.routed_top_k} routed), "
        f"d_model {config.d_model}, graph {config.graph!r} ({config.graph_learnable} weights).",
        "",
    ]
    if "accuracy" in last:
        figures.append(
            _save(
                viz.plot_task_accuracy(last["accuracy"], last.get("chance")), out / "accuracy.png"
            )
        )
        lines += ["| task | token accuracy | exact match | chance |", "| --- | --- | --- | --- |"]
        for task, acc in last["accuracy"].items():
            exact, chance = last["exact_match"][task], last["chance"][task]
            lines.append(f"| {task} | {acc:.3f} | {exact:.3f} | {chance:.3f} |")
        lines.append("")
    elif "bits_per_byte" in last:
        lines += [
            f"Validation bits per byte: {last['bits_per_byte']:.3f} (the loss figure is in "
            f"nats per token: {last['loss']:.3f} at the last evaluation)",
            "",
        ]
    usage = last.get("head_usage")
    text_coactivation: dict[str, list[nx.Graph]] = {}
    if not isinstance(data, TaskSuite) and config.attention != "mha":  # measured here
        if isinstance(model, DecoderOnlyLM):
            text_sample = data.sample(8, torch.Generator().manual_seed(0), split="val")
            with torch.no_grad():
                out_text, targets = forward_batch(model, text_sample)
            graphs_text = [
                viz.coactivation_graph(r, padding_mask=targets == IGNORE_INDEX)
                for r in out_text.routing
            ]
            text_coactivation = {"text": graphs_text}
            usage = {"text": [[g.nodes[i]["usage"] for i in sorted(g.nodes)] for g in graphs_text]}
    if usage:
        figures.append(
            _save(viz.plot_head_usage(usage, num_shared=config.num_shared), out / "head_usage.png")
        )
        lines += [
            "Head usage per task: head_usage.png gives the fraction of scored tokens using "
            "each head, per layer. Shared heads are on for every token; the routed heads "
            "used most:",
            "",
        ]
        shared, k = config.num_shared, config.routed_top_k
        for task, per_layer in usage.items():
            top = [
                (torch.tensor(row[shared:]).topk(k).indices + shared).tolist() for row in per_layer
            ]
            site = "layer" if isinstance(model, DecoderOnlyLM) else "decoder attention"
            per_layer = "; ".join(f"{site} {i} {heads}" for i, heads in enumerate(top))
            lines.append(f"- {task}: most used routed heads: {per_layer}")
        lines.append("")
    graphs = model.head_graphs()
    start = make_head_graph(config) if graphs else None  # the weights training started from
    for i, graph in enumerate(graphs):
        layer_use = None
        if usage and len(next(iter(usage.values()))) == len(graphs):
            layer_use = torch.tensor([per_layer[i] for per_layer in usage.values()]).mean(0)
        fig = viz.draw_head_graph(
            graph,
            usage=layer_use,
            num_shared=config.num_shared,
            initial=start,
            title=f"layer {i} head graph",
        )
        figures.append(_save(fig, out / f"head_graph_layer{i}.png"))
    if isinstance(model, DecoderOnlyLM) and config.attention != "mha":
        gen = torch.Generator().manual_seed(0)
        examples: dict[str, tuple[TaskBatch, int, list[str]]] = {}  # batch, tokens, names
        if isinstance(data, TaskSuite):
            for task in data.tasks:
                batch = data.sample(1, gen, task=task)
                length = data.sequence_length(task) - 1
                examples[task] = (
                    batch,
                    length,
                    data.token_names(batch.inputs[0, :length].tolist()),
                )
        else:  # a held-out window of text, its first 48 tokens
            batch = text_sample.rows(slice(0, 1))
            names = data.token_names(batch.inputs[0, :48].tolist())
            examples["text"] = (batch, len(names), names)
        with torch.no_grad():
            routings = {
                name: forward_batch(model, ex[0])[0].routing for name, ex in examples.items()
            }
        for layer in range(config.num_layers):
            fig, axes = plt.subplots(
                1, len(examples), figsize=(3.6 * len(examples), 6.5), layout="constrained"
            )
            axes_list = [axes] if len(examples) == 1 else list(axes)
            gate_max = max(float(routings[t][layer].gates.max()) for t in examples)
            for i, (ax, (name, (_, length, names))) in enumerate(
                zip(axes_list, examples.items(), strict=True)
            ):
                viz.plot_routing(
                    routings[name][layer].gates[0, :length],
                    tokens=names,
                    num_shared=config.num_shared,
                    ax=ax,
                    title=name,
                    colorbar=False,  # one bar for the row: no label between panels
                    vmax=gate_max,
                )
                if i:
                    ax.set_ylabel("")
            fig.colorbar(axes_list[0].images[0], ax=axes_list, label="gate", shrink=0.8)
            fig.suptitle(f"layer {layer} routing (tokens x heads)")
            fig.supxlabel(textwrap.fill(routing_caption(config), 110), fontsize=7)
            figures.append(_save(fig, out / f"routing_layer{layer}.png"))
        coactivation = (
            task_coactivation(model, data) if isinstance(data, TaskSuite) else text_coactivation
        )
        for layer in range(config.num_layers):
            fig, axes = plt.subplots(
                1, len(coactivation), figsize=(3.4 * len(coactivation), 3.8), layout="constrained"
            )
            axes_list = [axes] if len(coactivation) == 1 else list(axes)
            for ax, (task, per_layer) in zip(axes_list, coactivation.items(), strict=True):
                viz.draw_coactivation(per_layer[layer], ax=ax, title=task)
            fig.suptitle(f"layer {layer}: heads firing together, per task")
            figures.append(_save(fig, out / f"coactivation_layer{layer}.png"))
    if importlib.util.find_spec("plotly") is not None:
        from graphheads.explorer_page import write_explorer

        write_explorer(run_dir, out / "explorer.html")
        lines += ["Interactive: [explorer.html](explorer.html) (`graphheads viz`).", ""]
    else:
        lines += ["The interactive explorer.html needs plotly: pip install 'graphheads[viz]'.", ""]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in figures]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return out

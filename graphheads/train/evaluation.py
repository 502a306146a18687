"""Evaluation and what the trainer and the commands share: building data and models
from a run configuration, the forward pass of a batch, loading a finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphheads.data import (
    IGNORE_INDEX,
    PAD,
    SEP,
    ByteTextDataset,
    TaskBatch,
    TaskSuite,
    TokenShardDataset,
    bits_per_byte,
    to_device,
)
from graphheads.train.checkpoint import CheckpointError, load_checkpoint
from graphheads.train.config import DataConfig, RunConfig
from graphheads.transformer import DecoderOnlyLM, ModelConfig, ModelOutput, Transformer
from graphheads.types import RoutingOutput

__all__ = [
    "Data",
    "build_data",
    "build_model",
    "evaluate",
    "forward_batch",
    "lm_loss_sum",
    "load_run",
    "model_device",
    "read_metrics",
    "scored_routing",
    "split_at_separator",
]

Data = TaskSuite | ByteTextDataset | TokenShardDataset
METRICS_NAME = "metrics.jsonl"  # a run folder's metrics, one JSON record per line


def build_data(config: DataConfig) -> Data:
    if config.text is not None:
        return ByteTextDataset(config.text, seq_len=config.seq_len)
    if config.tokens is not None:
        return TokenShardDataset(config.tokens, seq_len=config.seq_len)
    return TaskSuite(
        config.tasks,
        length=config.length,
        num_symbols=config.num_symbols,
        modulus=config.modulus,
        hops=config.hops,
    )


def build_model(config: ModelConfig, model_type: str) -> DecoderOnlyLM | Transformer:
    """``"lm"``: :class:`DecoderOnlyLM`; ``"seq2seq"``: the encoder-decoder :class:`Transformer`."""
    if model_type == "lm":
        return DecoderOnlyLM(config)
    if model_type == "seq2seq":
        return Transformer(config)
    raise ValueError(f"model_type must be 'lm' or 'seq2seq', got {model_type!r}")


def split_at_separator(batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Task rows -> encoder-decoder form: the source is each row up to and including its
    first SEP (right-padded, with its padding mask), the decoder reads the row from that
    SEP on and predicts the same targets. Returns (src, src_padding, tgt_in, tgt_out,
    tgt_padding), on the batch's device.

    The lengths depend on where the SEPs are, so this reads the batch (three host reads):
    split a batch while it is still on the CPU, as :func:`forward_batch` does, and
    move the pieces to the accelerator after."""
    inputs, targets = batch.inputs, batch.targets
    is_sep = inputs == SEP
    if not bool(is_sep.any(1).all()):
        raise ValueError("seq2seq training needs rows with a SEP token (the built-in task suite)")
    sep = is_sep.to(torch.uint8).argmax(1)  # (b,) first SEP per row
    t = inputs.size(1)
    src_len = int(sep.max()) + 1
    src_padding = torch.arange(src_len, device=inputs.device) > sep.unsqueeze(1)  # (b, s)
    src = inputs[:, :src_len].masked_fill(src_padding, PAD)
    positions = sep.unsqueeze(1) + torch.arange(t - int(sep.min()), device=inputs.device)
    outside = positions >= t  # (b, t')
    positions = positions.clamp(max=t - 1)
    tgt_in = inputs.gather(1, positions).masked_fill(outside, PAD)
    tgt_out = targets.gather(1, positions).masked_fill(outside, IGNORE_INDEX)
    tgt_padding = outside
    if batch.padding is not None:
        tgt_padding = tgt_padding | batch.padding.gather(1, positions)
    return src, src_padding, tgt_in, tgt_out, tgt_padding


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (a sharded parameter: where its shard lives)."""
    return next(model.parameters()).device


def forward_batch(
    model: nn.Module, batch: TaskBatch, device: torch.device | None = None
) -> tuple[ModelOutput, Tensor]:
    """The model's output on ``batch`` and the targets aligned with its logits (on the
    model's device). Padding is passed as the key padding mask: no token attends to it
    and the load-balance loss counts only real tokens. A model with task embeddings gets
    the batch's task ids.

    The batch may be on the CPU: it moves to ``device`` (default: the model's) after an
    encoder-decoder's rows are split (:func:`split_at_separator`), so the split never
    waits for an accelerator."""
    device = model_device(model) if device is None else device
    core = getattr(model, "_orig_mod", model)  # under torch.compile
    core = core.module if isinstance(core, nn.parallel.DistributedDataParallel) else core
    if isinstance(core, Transformer):
        pieces = (to_device(p, device, non_blocking=True) for p in split_at_separator(batch))
        src, src_padding, tgt_in, tgt_out, tgt_padding = pieces
        out = model(src, tgt_in, src_key_padding_mask=src_padding, tgt_key_padding_mask=tgt_padding)
        return out, tgt_out
    batch = batch.to(device, non_blocking=True)
    if getattr(core, "task_embedding", None) is not None:  # task-conditioned routing
        if batch.task_ids is None:
            raise ValueError("forward_batch: a model with task embeddings needs batch.task_ids")
        out = model(batch.inputs, key_padding_mask=batch.padding, task_ids=batch.task_ids)
        return out, batch.targets
    return model(batch.inputs, key_padding_mask=batch.padding), batch.targets


def scored_routing(out: ModelOutput) -> tuple[RoutingOutput, ...]:
    """The routing of the blocks whose queries are the scored (target) tokens: the
    decoder's blocks, never an encoder's (whatever the lengths)."""
    return out.routing_of("decoder")


def load_run(path: str | Path) -> tuple[DecoderOnlyLM | Transformer, RunConfig, Data, int]:
    """Model (eval mode), run config, data and step from a run folder or checkpoint."""
    state = load_checkpoint(path)
    if "run_config" not in state:
        kind = "a continual run" if "continual_config" in state else "not a training run"
        raise CheckpointError(
            f"{path} holds {kind}, which the commands that read a `graphheads train` run "
            "(eval, generate, export, report, graphheads.load) do not take"
        )
    run_config = RunConfig.from_dict(state["run_config"])
    model = build_model(ModelConfig.from_saved(state["model_config"]), run_config.train.model_type)
    model.load_state_dict(state["model"])
    return model.eval(), run_config, build_data(run_config.data), int(state["step"])


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"no metrics at {path}: the run has not trained yet (a run folder from "
            "`graphheads convert --run` gets them when `graphheads train` continues it)"
        )
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def lm_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Data, *, batches: int, batch_size: int, seed: int
) -> dict[str, Any]:
    """Loss and accuracy on fixed held-out batches; for task suites also per-task token
    accuracy, exact-match rate, chance level and head usage (the fraction of scored
    tokens that use each head, per layer)."""
    was_training = model.training
    device = model_device(model)  # batches go where the model is
    model.eval()
    gen = torch.Generator().manual_seed(10**9 + seed)
    result: dict[str, Any] = {}
    if isinstance(data, ByteTextDataset | TokenShardDataset):
        total, count = 0.0, 0
        for _ in range(batches):
            batch = data.sample(batch_size, gen, split="val").to(device)
            total += lm_loss_sum(model(batch.inputs).logits, batch.targets).item()
            count += batch.targets.numel()
        result = {"loss": total / count}
        if isinstance(data, ByteTextDataset) or data.bytes_level:  # a token is a byte
            result["bits_per_byte"] = bits_per_byte(total / count)
    else:
        accuracy, exact, usage, losses = {}, {}, {}, []
        for task in data.tasks:
            correct = scored_total = seq_right = seqs = 0
            loss_sum = 0.0
            use: Tensor | None = None
            for _ in range(batches):
                batch = data.sample(batch_size, gen, task=task)  # split on the CPU
                out, targets = forward_batch(model, batch, device)
                scored = targets != IGNORE_INDEX
                hit = (out.logits.argmax(-1) == targets) & scored
                correct += int(hit.sum())
                scored_total += int(scored.sum())
                seq_right += int((hit.sum(1) == scored.sum(1)).sum())
                seqs += targets.size(0)
                loss_sum += lm_loss_sum(out.logits, targets).item()
                blocks = scored_routing(out)
                if blocks:
                    layer_use = torch.stack([r.active_heads[scored].float().sum(0) for r in blocks])
                    use = layer_use if use is None else use + layer_use
            accuracy[task] = correct / scored_total
            exact[task] = seq_right / seqs
            losses.append(loss_sum / scored_total)
            if use is not None:
                usage[task] = (use / scored_total).tolist()
        result = {
            "loss": sum(losses) / len(losses),
            "accuracy": accuracy,
            "exact_match": exact,
            "chance": {t: data.chance_accuracy(t) for t in data.tasks},
        }
        if usage:
            result["head_usage"] = usage
    model.train(was_training)
    return result

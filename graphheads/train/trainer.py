"""The trainer: AdamW, warm-up + cosine, clipping, the load-balance loss, evaluation,
JSONL metrics, atomic checkpoints, exact resume, and DistributedDataParallel.

Repeatability: the batch of step ``s`` is drawn from a generator seeded by
``(seed, s)``, so a resumed run sees the same batches as an uninterrupted one; the
global torch RNG (dropout) is saved in every checkpoint. Under ``torchrun`` every rank
draws the same global batch and trains on its own slice; the language-model loss is
normalised by the *global* count of scored tokens, so the averaged gradients equal the
single-process ones. The load-balance loss is computed on each rank's tokens (as
MoE trainers do), so with ``aux_loss_weight > 0`` DDP and single-process runs differ by
that term only.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from graphheads.data import (
    IGNORE_INDEX,
    PAD,
    SEP,
    ByteTextDataset,
    TaskBatch,
    TaskSuite,
    bits_per_byte,
)
from graphheads.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from graphheads.train.config import DataConfig, RunConfig
from graphheads.transformer import DecoderOnlyLM, ModelConfig, ModelOutput, Transformer
from graphheads.types import RoutingOutput

__all__ = [
    "CheckpointError",
    "TrainResult",
    "Trainer",
    "build_data",
    "build_model",
    "evaluate",
    "forward_batch",
    "load_checkpoint",
    "load_run",
    "save_checkpoint",
    "scored_routing",
]

METRICS_NAME = "metrics.jsonl"

Data = TaskSuite | ByteTextDataset


def build_data(config: DataConfig) -> Data:
    if config.text is not None:
        return ByteTextDataset(config.text, seq_len=config.seq_len)
    return TaskSuite(
        config.tasks, length=config.length, num_symbols=config.num_symbols, modulus=config.modulus
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
    tgt_padding)."""
    inputs, targets = batch.inputs, batch.targets
    is_sep = inputs == SEP
    if not bool(is_sep.any(1).all()):
        raise ValueError("seq2seq training needs rows with a SEP token (the built-in task suite)")
    sep = is_sep.to(torch.uint8).argmax(1)  # (b,) first SEP per row
    t = inputs.size(1)
    src_len = int(sep.max()) + 1
    src_padding = torch.arange(src_len) > sep.unsqueeze(1)  # (b, s) True at padding
    src = inputs[:, :src_len].masked_fill(src_padding, PAD)
    positions = sep.unsqueeze(1) + torch.arange(t - int(sep.min()))  # (b, t')
    outside = positions >= t
    positions = positions.clamp(max=t - 1)
    tgt_in = inputs.gather(1, positions).masked_fill(outside, PAD)
    tgt_out = targets.gather(1, positions).masked_fill(outside, IGNORE_INDEX)
    tgt_padding = outside
    if batch.padding is not None:
        tgt_padding = tgt_padding | batch.padding.gather(1, positions)
    return src, src_padding, tgt_in, tgt_out, tgt_padding


def forward_batch(model: nn.Module, batch: TaskBatch) -> tuple[ModelOutput, Tensor]:
    """The model's output on ``batch`` and the targets aligned with its logits. Padding
    is passed as the key padding mask: no token attends to it and the load-balance loss
    counts only real tokens."""
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if isinstance(core, Transformer):
        src, src_padding, tgt_in, tgt_out, tgt_padding = split_at_separator(batch)
        out = model(src, tgt_in, src_key_padding_mask=src_padding, tgt_key_padding_mask=tgt_padding)
        return out, tgt_out
    return model(batch.inputs, key_padding_mask=batch.padding), batch.targets


def scored_routing(out: ModelOutput) -> tuple[RoutingOutput, ...]:
    """The routing of the blocks whose queries are the scored (target) tokens: the
    decoder's blocks, never an encoder's (whatever the lengths)."""
    return out.routing_of("decoder")


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def load_run(path: str | Path) -> tuple[DecoderOnlyLM | Transformer, RunConfig, Data, int]:
    """Model (eval mode), run config, data and step from a run folder or checkpoint."""
    state = load_checkpoint(path)
    run_config = RunConfig.from_dict(state["run_config"])
    model = build_model(ModelConfig(**state["model_config"]), run_config.train.model_type)
    model.load_state_dict(state["model"])
    return model.eval(), run_config, build_data(run_config.data), int(state["step"])


def _lm_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
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
    model.eval()
    gen = torch.Generator().manual_seed(10**9 + seed)
    result: dict[str, Any] = {}
    if isinstance(data, ByteTextDataset):
        total, count = 0.0, 0
        for _ in range(batches):
            batch = data.sample(batch_size, gen, split="val")
            total += _lm_loss_sum(model(batch.inputs).logits, batch.targets).item()
            count += batch.targets.numel()
        result = {"loss": total / count, "bits_per_byte": bits_per_byte(total / count)}
    else:
        accuracy, exact, usage, losses = {}, {}, {}, []
        for task in data.tasks:
            correct = scored_total = seq_right = seqs = 0
            loss_sum = 0.0
            use: Tensor | None = None
            for _ in range(batches):
                out, targets = forward_batch(model, data.sample(batch_size, gen, task=task))
                scored = targets != IGNORE_INDEX
                hit = (out.logits.argmax(-1) == targets) & scored
                correct += int(hit.sum())
                scored_total += int(scored.sum())
                seq_right += int((hit.sum(1) == scored.sum(1)).sum())
                seqs += targets.size(0)
                loss_sum += _lm_loss_sum(out.logits, targets).item()
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


@dataclass
class TrainResult:
    step: int  # the last step trained
    final_eval: dict[str, Any]  # empty when interrupted
    seconds: float
    interrupted: str | None = None  # the signal's name when SIGINT/SIGTERM stopped the run


# settings a run may change when it continues from its checkpoint: more (or fewer) steps
RESUMABLE_CHANGES = ("steps",)


class _StopSignals:
    """While active, SIGINT and SIGTERM set ``received`` (the loop stops at the next step
    boundary) and restore the previous handlers, so a second signal acts at once. Only in
    the main thread (Python delivers signals there); a no-op elsewhere."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name
        self.restore()

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()


class Trainer:
    """Train a :class:`~graphheads.transformer.DecoderOnlyLM` (or, with
    ``train.model_type="seq2seq"``, the encoder-decoder
    :class:`~graphheads.transformer.Transformer`) as a :class:`RunConfig` says.

    Args:
        config: the run configuration.
        out_dir: the run folder (checkpoint, metrics, config); ``None`` keeps nothing.
        progress: show a tqdm progress bar (rank 0 only).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the trainer joins the process group (gloo on
    CPU, NCCL on CUDA) and wraps the model in DistributedDataParallel.
    """

    def __init__(
        self, config: RunConfig, out_dir: str | Path | None = None, *, progress: bool = True
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.data = build_data(config.data)
        self.model_config = config.model_config(self.data.vocab_size, self.data.max_seq_len)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        train = config.train
        if train.batch_size % self.world_size:
            raise ValueError(
                f"Trainer: batch_size ({train.batch_size}) must be divisible by the number of "
                f"processes ({self.world_size})"
            )
        if train.model_type == "seq2seq" and not isinstance(self.data, TaskSuite):
            raise ValueError(
                "Trainer: model_type 'seq2seq' needs the built-in task suite, not text"
            )
        torch.manual_seed(train.seed)
        self.model = build_model(self.model_config, train.model_type)
        self.wrapped: nn.Module = self.model
        if self.world_size > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(self.model)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=train.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step = 0

    # -- schedule ---------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Linear warm-up to 1, then cosine decay to ``min_lr_ratio``."""
        t = self.config.train
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * cosine

    # -- files --------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _path(self, name: str) -> Path | None:
        return None if self.out_dir is None else self.out_dir / name

    def log(self, record: dict[str, Any]) -> None:
        path = self._path(METRICS_NAME)
        if path is None or not self.is_main:
            return
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "run_config": self.config.to_dict(),
            "model_config": asdict(self.model_config),
        }

    def save(self) -> None:
        path = self._path(CHECKPOINT_NAME)
        if path is not None and self.is_main:
            save_checkpoint(path, self.state())

    def check_resume(self) -> dict[str, Any] | None:
        """The run folder's checkpoint if this configuration may continue it, ``None``
        if there is none; :class:`CheckpointError` (before anything is written) if the
        checkpoint belongs to another configuration. Only ``train.steps`` may differ
        (:data:`RESUMABLE_CHANGES`): a finished run is extended by asking for more steps."""
        path = self._path(CHECKPOINT_NAME)
        if path is None or not path.exists():
            return None
        state = load_checkpoint(path)
        saved, given = state["run_config"], self.config.to_dict()
        for key in RESUMABLE_CHANGES:
            saved = {**saved, "train": {**saved["train"], key: given["train"][key]}}
        if saved != given:
            changed = [
                f"{section}.{key}"
                for section in given
                for key in sorted(set(given[section]) | set(saved.get(section, {})))
                if given[section].get(key) != saved.get(section, {}).get(key)
            ]
            raise CheckpointError(
                f"{path} was written by a run with another configuration (changed: "
                f"{', '.join(changed)}); use a new run folder, the same configuration, or "
                "--restart. Only train.steps may change to continue a run."
            )
        if int(state["step"]) > self.config.train.steps:
            raise CheckpointError(
                f"{path} is at step {state['step']}, past train.steps="
                f"{self.config.train.steps}; ask for at least {state['step']} steps"
            )
        return state

    def try_resume(self) -> bool:
        """Continue from the run folder's checkpoint, if there is one (see
        :meth:`check_resume`). Metric lines written after that checkpoint are dropped: the
        resumed run writes them again."""
        state = self.check_resume()
        if state is None:
            return False
        self._load_state(state)
        return True

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self._keep_metrics_up_to(self.step)

    def _keep_metrics_up_to(self, step: int) -> None:
        """Drop the metric lines after ``step`` (all of them for step 0): lines a resumed
        or restarted run writes again are never duplicated."""
        metrics = self._path(METRICS_NAME)
        if not self.is_main or metrics is None or not metrics.exists():
            return
        kept = [line for line in metrics.read_text().splitlines() if _line_step(line) <= step]
        _write_atomically(metrics, "".join(line + "\n" for line in kept))

    def _stop_requested(self, stop: _StopSignals) -> bool:
        """Whether any rank received SIGINT/SIGTERM (all ranks then stop together)."""
        if self.world_size == 1:
            return stop.received is not None
        flag = torch.tensor([float(stop.received is not None)])
        dist.all_reduce(flag)
        if flag.item() > 0 and stop.received is None:
            stop.received = "peer"
        return flag.item() > 0

    # -- training ---------------------------------------------------------------------
    def train_step(self, batch: TaskBatch) -> dict[str, float]:
        """One optimiser step on the global ``batch`` (this rank trains on its slice)."""
        t = self.config.train
        n_scored = (batch.targets != IGNORE_INDEX).sum().clamp_min(1)
        per_rank = batch.inputs.size(0) // self.world_size
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        out, targets = forward_batch(self.wrapped, batch.rows(rows))
        ce_sum = _lm_loss_sum(out.logits, targets)
        lm_loss = ce_sum * self.world_size / n_scored  # DDP averages: the global mean
        aux = ce_sum.new_zeros(())
        if out.routing and out.aux_loss is not None:
            aux = out.aux_loss / len(out.routing)
        loss = lm_loss + t.aux_loss_weight * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (
            nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            if t.grad_clip > 0
            else torch.zeros(())
        )
        self.optimizer.step()
        self.scheduler.step()
        logged = ce_sum.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(logged)
        return {
            "loss": (logged / n_scored).item(),
            "aux_loss": float(aux.detach()),
            "grad_norm": float(grad_norm),
        }

    def fit(self, *, resume: bool = True) -> TrainResult:
        """Train to ``config.train.steps``, evaluating, logging and checkpointing.

        With ``resume`` the run continues from the folder's checkpoint (a checkpoint of
        another configuration is refused before anything in the folder changes);
        without it the folder's checkpoint and metrics are replaced. SIGINT or SIGTERM
        stops the run at the next step boundary with a checkpoint written
        (``TrainResult.interrupted``); the same call then resumes from it.
        """
        state = self.check_resume() if resume else None  # refuse before writing anything
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if state is None:
                stale = self.out_dir / CHECKPOINT_NAME
                if stale.exists():  # --restart: the old checkpoint no longer describes the run
                    stale.unlink()
            _write_atomically(
                self.out_dir / "config.json",
                json.dumps(
                    {"run": self.config.to_dict(), "model": asdict(self.model_config)}, indent=2
                ),
            )
        if state is not None:
            self._load_state(state)
        else:
            self._keep_metrics_up_to(0)  # a fresh start: lines of an earlier attempt go
        with _StopSignals() as stop:
            return self._loop(stop)

    def _loop(self, stop: _StopSignals) -> TrainResult:
        t = self.config.train
        self.model.train()
        start = time.perf_counter()
        final: dict[str, Any] = {}
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not (self.progress and self.is_main),
            desc="train",
        )
        while self.step < t.steps:
            batch = self.data.sample(t.batch_size, _step_generator(t.seed, self.step))
            metrics = self.train_step(batch)
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                lr = self.scheduler.get_last_lr()[0]
                self.log({"kind": "train", "step": self.step, "lr": lr, **metrics})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if self.step % t.eval_every == 0 or self.step == t.steps:
                if self.is_main:
                    final = evaluate(
                        self.model,
                        self.data,
                        batches=t.eval_batches,
                        batch_size=t.eval_batch_size,
                        seed=t.seed,
                    )
                    self.log({"kind": "eval", "step": self.step, **final})
            saved = self.step % t.checkpoint_every == 0 or self.step == t.steps
            if saved:
                self.save()
            if self.step < t.steps and self._stop_requested(stop):
                if not saved:
                    self.save()
                bar.close()
                return TrainResult(
                    self.step, {}, time.perf_counter() - start, interrupted=stop.received
                )
        bar.close()
        if not final and self.is_main:  # resumed at the end: report the final state
            final = evaluate(
                self.model,
                self.data,
                batches=t.eval_batches,
                batch_size=t.eval_batch_size,
                seed=t.seed,
            )
        return TrainResult(self.step, final, time.perf_counter() - start)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line: drop it

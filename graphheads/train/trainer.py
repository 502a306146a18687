"""The trainer: AdamW, warm-up + cosine, clipping, the load-balance loss, evaluation,
JSONL metrics, atomic checkpoints, exact resume, and DistributedDataParallel.

Repeatability: the batch of step ``s`` is drawn from a generator seeded by ``(seed, s)``;
checkpoints hold the CPU's and CUDA's generators (dropout) and fp16's loss scale. Under
``torchrun`` every rank draws the same global batch and trains on its own slice; the LM
loss is normalised by the *global* count of scored tokens, so the averaged gradients
equal the single-process ones. The load-balance loss is computed on each rank's tokens
(as MoE trainers do): with ``aux_loss_weight > 0`` DDP and one process differ by that
term only. The selection-bias update (``balance="bias"``) counts every rank's tokens,
so every rank keeps one bias. Collectives run on the device (NCCL: CUDA only) but the
stop flag's, which runs on the CPU through a gloo group.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from graphheads.blocks import TransformerBlock, TransformerStack
from graphheads.data import IGNORE_INDEX, TaskBatch, TaskSuite, to_device
from graphheads.gates import layer_head_counts
from graphheads.goh import update_routing_balance
from graphheads.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_resumable,
    full_state,
    load_checkpoint,
    load_full_state,
    refuse_restart_of_conversion,
    save_checkpoint,
    write_text_atomically,
)
from graphheads.train.config import RunConfig
from graphheads.train.evaluation import (
    METRICS_NAME,
    build_data,
    build_model,
    evaluate,
    forward_batch,
    lm_loss_sum,
    load_run,
    scored_routing,
)
from graphheads.train.run_log import RunLog
from graphheads.train.runtime import (
    StopSignals,
    autocast,
    check_precision,
    grad_scaler,
    model_flops_per_token,
    peak_flops,
    resolve_device,
    restore_rng_states,
    rng_states,
)

__all__ = [
    "METRICS_NAME",  # now defined in graphheads.train.evaluation
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


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class TrainResult:
    step: int  # the last step trained
    final_eval: dict[str, Any]  # empty when interrupted
    seconds: float
    interrupted: str | None = None  # the signal's name when SIGINT/SIGTERM stopped the run


class Trainer:
    """Train a :class:`~graphheads.transformer.DecoderOnlyLM` (or, with
    ``train.model_type="seq2seq"``, the encoder-decoder
    :class:`~graphheads.transformer.Transformer`) as a :class:`RunConfig` says.

    Args:
        config: the run configuration.
        out_dir: the run folder (checkpoint, metrics, config); ``None`` keeps nothing.
        progress: show a tqdm progress bar (rank 0 only).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the trainer joins the process group (gloo on
    CPU, NCCL on CUDA) and wraps the model in DistributedDataParallel, or shards it with
    FSDP2 (``train.parallel="fsdp"``). Device, precision, compile, gradient accumulation
    and activation checkpointing: :mod:`graphheads.train.runtime` and the docs.
    """

    def __init__(
        self, config: RunConfig, out_dir: str | Path | None = None, *, progress: bool = True
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.data = build_data(config.data)
        self.model_config = config.model_config(self.data.vocab_size, self.data.max_seq_len)
        train = config.train
        self.device = resolve_device(train.device)
        check_precision(train.precision, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.cpu_group: Any = None  # the stop flag's; None: the default group serves CPU
        if self.world_size > 1 and "gloo" not in dist.get_backend():  # (a GPU flag waits)
            self.cpu_group = dist.new_group(backend="gloo")
        if train.batch_size % (self.world_size * train.grad_accum):
            raise ValueError(
                f"Trainer: batch_size ({train.batch_size}) must be divisible by the number of "
                f"processes ({self.world_size}) x grad_accum ({train.grad_accum})"
            )
        if train.model_type == "seq2seq" and not isinstance(self.data, TaskSuite):
            raise ValueError(
                "Trainer: model_type 'seq2seq' needs the built-in task suite, not text"
            )
        tasks = len(self.data.tasks) if isinstance(self.data, TaskSuite) else 0
        if self.model_config.task_embeddings not in (0, tasks):
            raise ValueError(
                f"Trainer: model.task_embeddings ({self.model_config.task_embeddings}) must "
                f"be 0 or the number of tasks ({tasks}: task-conditioned routing needs the "
                "built-in task suite)"
            )
        torch.manual_seed(train.seed)
        self.model = build_model(self.model_config, train.model_type).to(self.device)
        for stack in self.model.modules():
            if isinstance(stack, TransformerStack):
                stack.activation_checkpointing = train.activation_checkpointing
        self.wrapped: nn.Module = self.model
        self.fsdp = self.world_size > 1 and train.parallel == "fsdp"
        if self.fsdp:  # FSDP2: each block's parameters sharded, then the rest
            for block in self.model.modules():
                if isinstance(block, TransformerBlock):
                    fully_shard(block)
            fully_shard(self.model)
        elif self.world_size > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if train.compile:
            self.wrapped = torch.compile(self.wrapped)  # type: ignore[assignment]
        self.scaler = grad_scaler(train.precision, self.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=train.lr,
            fused=self.device.type == "cuda" and not self.fsdp,  # GradScaler: no sync either
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step = 0
        self.run_log = RunLog(
            self.out_dir, log_to=train.log_to, model=self.model, main=self.is_main
        )

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
        self.run_log.write(record)

    def state(self) -> dict[str, Any]:
        """The full (unsharded, CPU) training state through torch.distributed.checkpoint's
        state-dict API: under FSDP every rank must call it (it gathers the shards)."""
        return {
            "step": self.step,
            **full_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            **rng_states(self.device),
            **({} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()}),
            "run_config": self.config.to_dict(),
            "model_config": asdict(self.model_config),
        }

    def save(self) -> None:
        path = self._path(CHECKPOINT_NAME)
        if path is None:
            return
        state = self.state() if self.is_main or self.fsdp else None  # FSDP: a collective
        if state is not None and self.is_main:
            save_checkpoint(path, state)

    def check_resume(self) -> dict[str, Any] | None:
        """The run folder's checkpoint if this configuration may continue it (see
        :func:`~graphheads.train.checkpoint.check_resumable`), ``None`` if there is none."""
        path = self._path(CHECKPOINT_NAME)
        return None if path is None else check_resumable(path, self.config)

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
        load_full_state(self.model, self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state, self.device)
        if self.scaler is not None and "grad_scaler" in state:  # fp16's loss scale
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        self.run_log.keep_up_to(self.step)

    def _stop_requested(self, stop: StopSignals) -> bool:
        """Whether SIGINT/SIGTERM stops the run after this step; under several processes
        whether any rank received one (all stop together), agreed through the gloo group
        (``cpu_group``): a CPU flag, never given to NCCL, and no wait for the device."""
        if self.world_size == 1:
            return stop.received is not None
        flag = torch.tensor([float(stop.received is not None)])
        dist.all_reduce(flag, group=self.cpu_group)
        if flag.item() > 0 and stop.received is None:
            stop.received = "peer"
        return stop.received is not None

    # -- training ---------------------------------------------------------------------
    def train_step(self, batch: TaskBatch) -> dict[str, Tensor]:
        """One optimiser step on the global ``batch`` (this rank trains on its slice, in
        ``grad_accum`` micro-batches). Returns the step's metrics as tensors on the
        device: no host sync here (the loop reads them on log steps only)."""
        t = self.config.train
        n_scored = to_device((batch.targets != IGNORE_INDEX).sum().clamp_min(1), self.device, True)
        per_rank = batch.inputs.size(0) // self.world_size
        micro = per_rank // t.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        ce_total = torch.zeros((), device=self.device)
        aux_total = torch.zeros((), device=self.device)
        balance = self.model_config.balance
        aux_weight = t.aux_loss_weight if balance != "bias" else 0.0
        counts: list[Tensor] = []  # per router: (r + 1,) head choices and tokens, summed
        for i in range(t.grad_accum):
            start = self.rank * per_rank + i * micro
            part = batch.rows(slice(start, start + micro))  # seq2seq: split on the CPU first
            part = part.to(self.device, non_blocking=True) if t.model_type == "lm" else part
            last = i == t.grad_accum - 1
            sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if not last and isinstance(self.model_ddp, nn.parallel.DistributedDataParallel):
                sync = self.model_ddp.no_sync()  # all-reduce once, after the last micro-batch
            if self.fsdp:  # reduce-scatter once, after the last micro-batch
                self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
            with sync:
                with autocast(t.precision, self.device):
                    out, targets = forward_batch(self.wrapped, part, self.device)
                    ce_sum = lm_loss_sum(out.logits.float(), targets)
                aux = ce_sum.new_zeros(())
                if out.routing and out.aux_loss is not None:
                    aux = out.aux_loss / len(out.routing)
                # the global mean over scored tokens (DDP averages over ranks); the
                # load-balance loss is averaged over micro-batches
                loss = ce_sum * self.world_size / n_scored + aux_weight * aux / t.grad_accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if balance != "aux_loss":  # real tokens' choices, for the bias update below
                step = layer_head_counts(
                    out.routing, part.padding if t.model_type == "lm" else None
                )
                counts = step if not counts else [a + b for a, b in zip(counts, step, strict=True)]
            ce_total += ce_sum.detach()
            aux_total += aux.detach() / t.grad_accum
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = (
            nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            if t.grad_clip > 0
            else torch.zeros((), device=self.device)
        )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if counts:  # balancing without an auxiliary loss (DeepSeek-V3), after the step
            self._update_balance(counts)
        return {"loss": ce_total / n_scored, "aux_loss": aux_total, "grad_norm": grad_norm}

    def _update_balance(self, counts: list[Tensor]) -> None:
        """The selection-bias step from every rank's head choices: the counts are summed
        over ranks (one all-reduce on the device), so every rank takes the same step and
        the biases, which neither DDP nor FSDP keep equal, stay equal."""
        flat = torch.cat(counts)
        if self.world_size > 1:
            dist.all_reduce(flat)
        update_routing_balance(
            self.model, flat.split([c.numel() for c in counts]), self.model_config.balance_rate
        )

    def _read_metrics(self, metrics: dict[str, Tensor]) -> dict[str, float]:
        """The step's metrics as numbers (one host sync; the loss summed over ranks)."""
        loss = metrics["loss"].clone()
        if self.world_size > 1:
            dist.all_reduce(loss)
        values = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in metrics.items()}
        return {"loss": loss.item(), **{k: v.item() for k, v in values.items() if k != "loss"}}

    @property
    def model_ddp(self) -> nn.Module:
        """The DDP wrapper (or the model) under a possible ``torch.compile`` wrapper."""
        return getattr(self.wrapped, "_orig_mod", self.wrapped)

    def fit(self, *, resume: bool = True) -> TrainResult:
        """Train to ``config.train.steps``, evaluating, logging and checkpointing.

        With ``resume`` the run continues from the folder's checkpoint (a checkpoint of
        another configuration is refused before anything in the folder changes);
        without it the folder's checkpoint and metrics are replaced. SIGINT or SIGTERM
        stops the run at the next step boundary with a checkpoint written
        (``TrainResult.interrupted``); the same call then resumes from it.
        """
        state = self.check_resume() if resume else None  # refuse before writing anything
        if not resume and self.out_dir is not None:
            refuse_restart_of_conversion(self.out_dir)
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if state is None:
                stale = self.out_dir / CHECKPOINT_NAME
                if stale.exists():  # --restart: the old checkpoint no longer describes the run
                    stale.unlink()
            write_text_atomically(
                self.out_dir / "config.json",
                json.dumps(
                    {"run": self.config.to_dict(), "model": asdict(self.model_config)}, indent=2
                ),
            )
        if state is not None:
            self._load_state(state)
        else:
            self.run_log.keep_up_to(0)  # a fresh start: lines of an earlier attempt go
        with StopSignals() as stop:
            try:
                return self._loop(stop)
            finally:
                self.run_log.close()

    def _loop(self, stop: StopSignals) -> TrainResult:
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
        tokens, since = 0, time.perf_counter()
        peak, c = peak_flops(self.device, t.precision), self.model_config
        layers = c.num_layers + (c.num_decoder_layers or c.num_layers) * (t.model_type != "lm")
        params = sum(p.numel() for p in self.model.parameters())
        flops_per_token = model_flops_per_token(params, layers, c.d_model, self.data.max_seq_len)
        while self.step < t.steps:
            batch = self.data.sample(t.batch_size, _step_generator(t.seed, self.step))
            metrics = self.train_step(batch)
            tokens += batch.inputs.numel()
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                lr = self.scheduler.get_last_lr()[0]
                values = self._read_metrics(metrics)
                rate = tokens / max(time.perf_counter() - since, 1e-9)
                record = {"kind": "train", "step": self.step, "lr": lr, **values}
                if peak is not None:  # model FLOPs utilisation (CUDA, bf16/fp16)
                    record["mfu"] = round(rate * flops_per_token / peak, 4)
                self.log({**record, "tokens_per_s": round(rate, 1)})
                bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{rate:.0f}")
                tokens, since = 0, time.perf_counter()
            if self.step % t.eval_every == 0 or self.step == t.steps:
                if self.is_main or self.fsdp:  # FSDP: every rank runs the forward passes
                    final = self._evaluate()
                    self.log({"kind": "eval", "step": self.step, **final})  # rank 0 writes
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
        if not final and (self.is_main or self.fsdp):  # resumed at the end: report it
            final = self._evaluate()
        return TrainResult(self.step, final, time.perf_counter() - start)

    def _evaluate(self) -> dict[str, Any]:
        t = self.config.train
        return evaluate(
            self.model, self.data, batches=t.eval_batches, batch_size=t.eval_batch_size, seed=t.seed
        )

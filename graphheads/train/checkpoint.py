"""Checkpoints: written atomically (a temporary file, fsync, rename), loaded without
running code from the file (``weights_only=True``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from graphheads.hub import write_atomically
from graphheads.train.config import RunConfig

__all__ = [
    "CHECKPOINT_NAME",
    "CONVERTED_FROM",
    "RESUMABLE_CHANGES",
    "RUN_FILE",
    "CheckpointError",
    "check_resumable",
    "full_state",
    "load_checkpoint",
    "load_full_state",
    "metric_line_step",
    "refuse_restart_of_conversion",
    "save_checkpoint",
    "write_text_atomically",
]

CHECKPOINT_FORMAT = "graphheads-checkpoint-v2"  # v2: one-block layout (0.2)
CHECKPOINT_NAME = "checkpoint.pt"
CONVERTED_FROM = "converted_from.json"  # in a run folder `graphheads convert --run` made
RUN_FILE = "run.json"  # its settings, which `graphheads train --config` reads
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)

# settings a run may change when it continues from its checkpoint: more steps, and how
# (not what) it computes
RESUMABLE_CHANGES = (  # section.key: how a run computes, never what it computes
    "train.steps",
    "train.parallel",
    "train.device",
    "train.precision",
    "train.compile",
    "train.grad_accum",
    "train.activation_checkpointing",
    "train.log_to",
    "model.execution",  # every execution gives the same results (0.2 runs saved "dense")
    "model.sparse_backend",  # so does every sparse backend
)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not a graphheads checkpoint."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a temporary file in the same folder, fsync, rename.
    A reader sees the old checkpoint or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file)."""
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).exists() and (path / "model.safetensors").exists():
            raise CheckpointError(
                f"{path} is an exported model folder, not a run folder: load it in Python "
                f"with graphheads.load({str(path)!r})"
            )
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({reason})") from err
    if isinstance(state, dict) and state.get("format") == "graphheads-checkpoint-v1":
        raise CheckpointError(
            f"{path} was written by graphheads 0.1, whose module layout 0.2 replaced; "
            "train the run again"
        )
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a graphheads checkpoint")
    return state


def check_resumable(path: Path, config: RunConfig) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if a run with ``config`` may continue it, ``None`` if
    there is none; :class:`CheckpointError` (before anything is written) if it belongs to
    another configuration. Only :data:`RESUMABLE_CHANGES` may differ (``train.steps``: a
    finished run is extended by asking for more steps; the rest: how the run computes)."""
    if not path.exists():
        return None
    state = load_checkpoint(path)
    # through RunConfig: settings added since the checkpoint take their defaults
    saved = RunConfig.from_dict(state["run_config"]).to_dict()
    given = config.to_dict()
    for name in RESUMABLE_CHANGES:  # take the given value (or its absence: the default)
        section, key = name.split(".")
        part = {k: v for k, v in saved.get(section, {}).items() if k != key}
        if key in given.get(section, {}):
            part[key] = given[section][key]
        saved = {**saved, section: part}
    if saved != given:
        changed = [
            f"{section}.{key}"
            for section in given
            for key in sorted(set(given[section]) | set(saved.get(section, {})))
            if given[section].get(key) != saved.get(section, {}).get(key)
        ]
        if (path.parent / CONVERTED_FROM).exists() and path.name == CHECKPOINT_NAME:
            run_file = path.parent / RUN_FILE
            raise CheckpointError(
                f"{path.parent} was made by `graphheads convert --run` with other settings "
                f"(changed: {', '.join(changed)}); continue it with its own: graphheads "
                f"train --config {run_file} --out {path.parent} (only "
                f"{', '.join(RESUMABLE_CHANGES)} may change)"
            )
        raise CheckpointError(
            f"{path} was written by a run with another configuration (changed: "
            f"{', '.join(changed)}); use a new run folder, the same configuration, or "
            f"--restart. Only {', '.join(RESUMABLE_CHANGES)} may change to continue a run."
        )
    if int(state["step"]) > config.train.steps:
        raise CheckpointError(
            f"{path} is at step {state['step']}, past train.steps="
            f"{config.train.steps}; ask for at least {state['step']} steps"
        )
    return state


def refuse_restart_of_conversion(out_dir: Path) -> None:
    """A folder ``graphheads convert --run`` made holds the converted weights only in its
    checkpoint: starting it over would train from scratch, so it is refused."""
    if (Path(out_dir) / CONVERTED_FROM).exists():
        raise ValueError(
            f"{out_dir} was made by `graphheads convert --run`: a restart would train from "
            "scratch, without the converted weights; convert again into a new folder (with "
            "the settings you want as --set) instead"
        )


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}``: full (unsharded) state dicts on the CPU,
    through torch.distributed.checkpoint's state-dict API (optimizer state keyed by
    parameter names). Under FSDP every rank must call it: it gathers the shards."""
    return {
        "model": get_model_state_dict(model, options=FULL_STATE),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL_STATE),
    }


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load what :func:`full_state` wrote (each rank keeps its shard under FSDP); an
    optimizer state keyed by parameter index (checkpoints of 0.2) loads as it was saved.
    The optimizer keeps its own kernel choice (``fused``, ``foreach``): loading replaces
    the param groups, and a fused optimizer handed a saved non-fused group broke fp16's
    GradScaler (which passes its scale to fused kernels only)."""
    load = StateDictOptions(full_state_dict=True)
    kernels = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    for group in state["optimizer"]["param_groups"]:
        group.update(kernels)
    set_model_state_dict(model, state["model"], options=load)
    if all(isinstance(k, int) for k in state["optimizer"]["state"]):
        optimizer.load_state_dict(state["optimizer"])
    else:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=load)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole (a temporary file, then a rename)."""
    write_atomically(path, text.encode())


def metric_line_step(line: str) -> int:
    """The step of a ``metrics.jsonl`` line (a torn line sorts last)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line: drop it

"""A routed run from a trained run: ``graphheads convert --run DIR --attention goh``.

The MoH-LLaMA3 recipe (Jin et al. 2024) on graphheads' own models: take a trained dense
(or MoH) run, give its attention layers routers, and continue training. The new run
starts at step 0 (its own warm-up and schedule, a fresh optimiser) from the converted
weights; ``graphheads train`` continues it. A dense control is the same command with
``--attention mha``: the same weights, schedule and tokens, no routing.

Routers start so that, with every routed head on (``top_k`` = all routed heads), the
converted model computes exactly what the trained model computed. A dense source's MoH
routers start near uniform (:meth:`MoHRouter.reset_to_uniform`: small random logits, so
each token keeps its own heads, gates within about 1% of 1), and its graph-routers start
as such an MoH router (:meth:`GraphRouter.copy_from_moh`, graph scale 0): MoH and GoH
conversions differ only in the graph branch. An MoH source's routers are kept, or become
the graph-router's linear part.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphheads.goh import GraphRouter
from graphheads.moh import MoHRouter
from graphheads.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from graphheads.train.config import RunConfig, apply_overrides

__all__ = ["CONVERSIONS", "RUN_FILE", "convert_run", "load_converted_weights"]

RUN_FILE = "run.json"
# (source attention, target attention) pairs convert_run takes
CONVERSIONS = {("mha", "mha"), ("mha", "moh"), ("mha", "goh"), ("moh", "moh"), ("moh", "goh")}


@torch.no_grad()
def load_converted_weights(
    target: nn.Module, source_state: dict[str, torch.Tensor], source_attention: str
) -> None:
    """Put a trained model's weights (``source_state``, its state dict) on ``target``,
    a model of the same sizes whose attention may be routed: every source weight must
    have a place in ``target`` and only router weights may be new. New routers start
    uniform (dense source) or take the source's MoH router (MoH source, target GoH)."""
    state = target.state_dict()
    unexpected = sorted(k for k in source_state if k not in state and ".router." not in k)
    new = sorted(k for k in state if k not in source_state)
    not_router = [k for k in new if ".router." not in k]
    if unexpected or not_router:
        raise ValueError(
            "convert: the trained model and the converted one differ in more than their "
            f"routers (only in the trained model: {unexpected[:4]}; only in the converted "
            f"one: {not_router[:4]}); change only the attention and routing settings"
        )
    for key, value in source_state.items():
        if key in state and ".router." not in key:
            if state[key].shape != value.shape:
                raise ValueError(
                    f"convert: {key} has shape {tuple(value.shape)} in the trained model and "
                    f"{tuple(state[key].shape)} in the converted one"
                )
    routed = {k: v for k, v in source_state.items() if ".router." not in k}
    target.load_state_dict(routed, strict=False)
    for name, module in target.named_modules():
        mine = {k[len(name) + 1 :]: v for k, v in source_state.items() if k.startswith(f"{name}.")}
        if isinstance(module, GraphRouter) and source_attention == "moh":
            trained = MoHRouter(
                module.d_model,
                module.num_heads,
                module.num_shared,
                module.top_k,
                gate_convention=module.gate_convention,
                hard_gates=module.hard_gates,
            )
            _load_router(trained, mine, name)
            module.copy_from_moh(trained)
        elif isinstance(module, GraphRouter):  # starts as the uniform MoH router below
            uniform = MoHRouter(module.d_model, module.num_heads, module.num_shared, module.top_k)
            uniform.reset_to_uniform()
            module.copy_from_moh(uniform)
        elif isinstance(module, MoHRouter) and source_attention == "moh":
            _load_router(module, mine, name)
        elif isinstance(module, MoHRouter):
            module.reset_to_uniform()


def _load_router(router: MoHRouter, state: dict[str, torch.Tensor], name: str) -> None:
    """A trained MoH router's weights (and selection bias, where both keep one)."""
    wanted = router.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(
            f"convert: the trained router {name} has no {missing} (a parameter-free router, "
            "or other shared heads): an MoH run converts only with its own num_shared"
        )
    router.load_state_dict({k: v for k, v in state.items() if k in wanted})


def convert_run(
    run: str | Path,
    out: str | Path,
    *,
    attention: str,
    num_shared: int | None = None,
    top_k: int | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Write a new run folder ``out`` whose model is the trained run ``run`` (a run
    folder or checkpoint) with ``attention`` ("mha", "moh" or "goh"), ``num_shared``
    always-on heads and ``top_k`` routed heads per token; ``overrides`` are
    ``section.key=value`` settings of the new run (``train.steps=...``, graph settings).
    The folder holds a step-0 checkpoint and ``run.json``; continue it with
    ``graphheads train --config OUT/run.json --out OUT``. ``out`` is written whole or
    not at all. Returns ``out``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"convert: {out} exists and is not empty; give a new folder")
    try:
        state = load_checkpoint(run)
    except CheckpointError as err:
        raise ValueError(f"convert: {err}") from err
    if "run_config" not in state:
        raise ValueError(f"convert: {run} is not a `graphheads train` run")
    source = RunConfig.from_dict(state["run_config"])
    if source.train.model_type != "lm":
        raise ValueError("convert: only decoder-only LM runs (train.model_type='lm') convert")
    source_attention = str(state["model_config"].get("attention", "mha"))
    if (source_attention, attention) not in CONVERSIONS:
        raise ValueError(
            f"convert: cannot convert attention {source_attention!r} to {attention!r}; "
            f"conversions: {sorted(CONVERSIONS)}"
        )
    model: dict[str, Any] = {**source.model, "attention": attention}
    if attention == "mha":
        for key in ("num_shared", "top_k"):
            if locals()[key] is not None:
                raise ValueError(f"convert: --{key.replace('_', '-')} needs routed attention")
    else:
        if num_shared is None or top_k is None:
            raise ValueError("convert: routed attention needs num_shared and top_k")
        model.update(num_shared=num_shared, top_k=top_k)
        trained_shared = state["model_config"].get("num_shared")
        if source_attention == "moh" and num_shared != trained_shared:
            raise ValueError(
                f"convert: the MoH run has num_shared={trained_shared}; its routers convert "
                f"only with the same shared heads, not num_shared={num_shared}"
            )
    config = RunConfig.from_dict(apply_overrides({**source.to_dict(), "model": model}, overrides))
    # the trainer builds the model, optimiser and schedule of the new run (nothing on disk)
    from graphheads.train.trainer import Trainer

    trainer = Trainer(config, None, progress=False)
    load_converted_weights(trainer.model, state["model"], source_attention)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_checkpoint(tmp / "checkpoint.pt", trainer.state())
        (tmp / RUN_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (tmp / "converted_from.json").write_text(
            json.dumps(
                {
                    "run": str(run),
                    "step": int(state["step"]),
                    "attention": source_attention,
                    "model_config": state["model_config"],
                },
                indent=2,
            )
            + "\n"
        )
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

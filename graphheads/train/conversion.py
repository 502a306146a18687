"""A routed run from a trained run: ``graphheads convert --run DIR --attention goh``.

The MoH-LLaMA3 recipe (Jin et al. 2024) on graphheads' own models: take a trained dense
(or MoH) run, give its attention layers routers, and continue training. The new run
starts at step 0 (its own warm-up and schedule, a fresh optimiser) from the converted
weights; ``graphheads train`` continues it. A dense control is the same command with
``--attention mha``: the same weights, schedule and tokens, no routing.

Routers start so that, with every routed head on, the converted model computes exactly
what the trained model computed (a dense source at ``top_k`` = all routed heads, an MoH
source at its own ``top_k``). A dense source's MoH routers start near uniform
(:meth:`MoHRouter.reset_to_uniform`: small random logits, so each token keeps its own
heads, gates within about 1% of 1), and its graph-routers start as the same MoH router
(:meth:`GraphRouter.copy_from_moh`, graph scale 0): MoH and GoH conversions of one run
start with the same routing and differ only in the graph branch. An MoH source's
routers are kept, or become the graph-router's linear part.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphheads.config import GRAPH_FIELDS, ROUTER_FIELDS, ModelConfig
from graphheads.goh import GraphRouter
from graphheads.moh import MoHRouter
from graphheads.train.checkpoint import (
    CONVERTED_FROM,
    RUN_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from graphheads.train.config import RunConfig, apply_overrides

__all__ = ["CONVERSIONS", "RUN_FILE", "convert_run", "load_converted_weights"]

# (source attention, target attention) pairs convert_run takes
CONVERSIONS = {("mha", "mha"), ("mha", "moh"), ("mha", "goh"), ("moh", "moh"), ("moh", "goh")}
# the model settings a conversion may change (the rest would change what the trained
# weights compute); attention, num_shared and top_k come from convert_run's arguments
ADJUSTABLE = {"attention", "dropout", *ROUTER_FIELDS, *GRAPH_FIELDS}
FROM_ARGUMENTS = ("attention", "num_shared", "top_k")


def _is_new_key(key: str) -> bool:
    """Weights a conversion may add: routers, and task embeddings (zero at init)."""
    return ".router." in key or key.startswith("task_embedding.")


@torch.no_grad()
def load_converted_weights(
    target: nn.Module,
    source_state: dict[str, torch.Tensor],
    source_attention: str,
    *,
    seed: int = 0,
) -> None:
    """Put a trained model's weights (``source_state``, its state dict) on ``target``,
    a model of the same sizes whose attention may be routed: every source weight must
    have a place in ``target`` and only router weights may be new.

    A dense source's routers start near uniform: router i draws the small random logits
    of :meth:`MoHRouter.reset_to_uniform` from a generator seeded by ``(seed, i)``, and a
    graph-router starts as that MoH router (:meth:`GraphRouter.copy_from_moh`, graph
    scale 0), so MoH and GoH conversions of one run start with the same routing. An MoH
    source's routers are kept (with their selection bias), or become the graph-router's
    linear part."""
    state = target.state_dict()
    unexpected = sorted(k for k in source_state if k not in state and not _is_new_key(k))
    not_router = sorted(k for k in state if k not in source_state and not _is_new_key(k))
    if unexpected or not_router:
        raise ValueError(
            "convert: the trained model and the converted one differ in more than their "
            f"routers (only in the trained model: {unexpected[:4]}; only in the converted "
            f"one: {not_router[:4]}); change only the attention and routing settings"
        )
    kept = {k: v for k, v in source_state.items() if not _is_new_key(k) or k in state}
    kept = {k: v for k, v in kept.items() if ".router." not in k}
    for key, value in kept.items():
        if state[key].shape != value.shape:
            raise ValueError(
                f"convert: {key} has shape {tuple(value.shape)} in the trained model and "
                f"{tuple(state[key].shape)} in the converted one"
            )
    target.load_state_dict(kept, strict=False)
    routers = [(n, m) for n, m in target.named_modules() if isinstance(m, MoHRouter | GraphRouter)]
    for index, (name, module) in enumerate(routers):
        mine = {k[len(name) + 1 :]: v for k, v in source_state.items() if k.startswith(f"{name}.")}
        like = functools.partial(MoHRouter, module.d_model, module.num_heads, module.num_shared,
                                 module.top_k, gate_convention=module.gate_convention,
                                 hard_gates=module.hard_gates)  # fmt: skip
        if source_attention == "moh":
            trained = like(balance_bias="selection_bias" in mine)
            _load_router(trained, mine, name)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + index)
                trained = like()
                trained.reset_to_uniform()
        if isinstance(module, GraphRouter):
            module.reset_to_uniform()  # graph scale and prior at 0
            module.copy_from_moh(trained)
        else:
            for gate in ("routed_gate", "shared_gate", "type_gate"):
                if getattr(module, gate) is not None:
                    getattr(module, gate).weight.copy_(getattr(trained, gate).weight)
        if module.selection_bias is not None:
            if trained.selection_bias is not None:
                module.selection_bias.copy_(trained.selection_bias)
            else:
                module.selection_bias.zero_()


def _load_router(router: MoHRouter, state: dict[str, torch.Tensor], name: str) -> None:
    """A trained MoH router's weights (and selection bias, where it kept one)."""
    wanted = router.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(f"convert: the trained router {name} has no {missing}")
    router.load_state_dict({k: v for k, v in state.items() if k in wanted})


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"convert: {out} exists and is not a folder; give a new folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"convert: {out} exists and is not empty; give a new folder")


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
    always-on heads and ``top_k`` routed heads per token (for an MoH run, by default its
    own); ``overrides`` are
    ``section.key=value`` settings of the new run (``train.*``; of the model only the
    routing and graph settings and dropout, which leave the trained weights' function
    as it was). The folder holds a step-0 checkpoint, ``run.json`` and
    ``converted_from.json``; continue it with ``graphheads train --config OUT/run.json
    --out OUT``. ``out`` is written whole or not at all. Returns ``out``.

    With every routed head on, the converted model computes what the trained model
    did: for a dense source at ``top_k`` = all routed heads, for an MoH source at its
    own ``top_k``."""
    out = Path(out)
    if isinstance(overrides, str):
        raise ValueError(f"convert: overrides must be a list of settings, got {overrides!r}")
    _check_out(out)
    try:
        state = load_checkpoint(run)
    except CheckpointError as err:
        raise ValueError(f"convert: {err}") from err
    if "run_config" not in state:
        raise ValueError(f"convert: {run} is not a `graphheads train` run")
    source = RunConfig.from_dict(state["run_config"])
    if source.train.model_type != "lm":
        raise ValueError("convert: only decoder-only LM runs (train.model_type='lm') convert")
    trained = ModelConfig.from_saved(state["model_config"])
    if (trained.attention, attention) not in CONVERSIONS:
        raise ValueError(
            f"convert: cannot convert attention {trained.attention!r} to {attention!r}; "
            f"conversions: {', '.join(f'{a} to {b}' for a, b in sorted(CONVERSIONS))}"
        )
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in {f"model.{k}" for k in FROM_ARGUMENTS}:
            flag = key.removeprefix("model.").replace("_", "-")
            raise ValueError(f"convert: give {key} as --{flag}, not as an override")
    model: dict[str, Any] = {**source.model, "attention": attention}
    if attention == "mha":
        for key, value in (("num-shared", num_shared), ("top-k", top_k)):
            if value is not None:
                raise ValueError(f"convert: --{key} needs routed attention (moh or goh)")
    else:
        if trained.attention == "moh":  # by default the MoH run's own
            num_shared = trained.num_shared if num_shared is None else num_shared
            top_k = trained.top_k if top_k is None else top_k
        if num_shared is None or top_k is None:
            raise ValueError("convert: routed attention needs --num-shared and --top-k")
        model.update(num_shared=num_shared, top_k=top_k)
        if trained.attention == "moh" and num_shared != trained.num_shared:
            raise ValueError(
                f"convert: the MoH run has num_shared={trained.num_shared}; its routers "
                f"convert only with the same shared heads, not num_shared={num_shared}"
            )
    config = RunConfig.from_dict(apply_overrides({**source.to_dict(), "model": model}, overrides))
    # the trainer builds the model, optimiser and schedule of the new run (on the CPU in
    # fp32, uncompiled: how a run computes may change on resume), nothing on disk
    from graphheads.train.trainer import Trainer

    build = RunConfig.from_dict(
        apply_overrides(
            config.to_dict(), ["train.device=cpu", "train.precision=fp32", "train.compile=false"]
        )
    )
    with torch.random.fork_rng(devices=[]):
        trainer = Trainer(build, None, progress=False)
    changed = sorted(
        k
        for k, v in asdict(trainer.model_config).items()
        if k not in ADJUSTABLE and v != getattr(trained, k)
    )
    if changed:
        raise ValueError(
            f"convert: {', '.join(f'model.{k}' for k in changed)} would change what the "
            "trained weights compute; a conversion changes only the attention, routing and "
            "graph settings and dropout"
        )
    if attention != "mha" and trained.attention == "mha":
        if trainer.model_config.gate_convention == "paper":
            raise ValueError(
                "convert: gate_convention='paper' gates uniform logits below 1, so the "
                "converted model would not start as the trained one; use 'reference'"
            )
    if attention == "goh" and trainer.model_config.graph_scale_init != 0:
        raise ValueError(
            "convert: a converted graph-router starts with its graph scale at 0 (as the "
            f"trained model), not graph_scale_init={trainer.model_config.graph_scale_init}"
        )
    load_converted_weights(trainer.model, state["model"], trained.attention, seed=config.train.seed)
    checkpoint = {**trainer.state(), "run_config": config.to_dict()}
    source_record = {
        "run": str(Path(run).resolve()),
        "step": int(state["step"]),
        "attention": trained.attention,
        "model_config": state["model_config"],
    }
    _write_folder(
        out,
        {
            RUN_FILE: json.dumps(config.to_dict(), indent=2) + "\n",
            CONVERTED_FROM: json.dumps(source_record, indent=2) + "\n",
        },
        checkpoint,
    )
    return out


def _write_folder(out: Path, texts: dict[str, str], checkpoint: dict[str, Any]) -> None:
    """``out`` with these files and ``checkpoint.pt``, whole or not at all: written in a
    hidden sibling folder, then renamed (folders it had to create go again on failure)."""
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed conversion
    try:
        tmp.mkdir()  # the umask's permissions, as the folders train makes
        save_checkpoint(tmp / "checkpoint.pt", checkpoint)
        for name, text in texts.items():
            (tmp / name).write_text(text)
        if out.exists():
            out.rmdir()  # empty (checked before)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        raise

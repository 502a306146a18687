"""graphheads in Megatron-LM's own training script: a layer spec that ``pretrain_gpt.py``
picks with ``--spec``, its routing settings from the environment, and the head
load-balance loss's logging.

    GRAPHHEADS_ATTENTION=goh GRAPHHEADS_NUM_SHARED=2 GRAPHHEADS_TOP_K=3 \\
    torchrun --nproc_per_node 8 pretrain_gpt.py \\
        --spec graphheads.integrations.megatron.lm layer_spec \\
        --transformer-impl local --normalization RMSNorm --swiglu ...

``--spec MODULE NAME`` makes Megatron-LM use the object ``NAME`` of ``MODULE`` as its
layer spec, built when the module is imported, so the settings come from environment
variables (:data:`SETTINGS`; every rank of a job sees the same ones). The scale of the
head load-balance loss needs nothing: Megatron-LM sets up megatron-core's micro-batch
calculator, which :func:`~graphheads.integrations.megatron.head_loss_scale` reads.
Megatron-LM's loop logs and clears the auxiliary-loss tracker only for models with
experts: :func:`log_head_loss` does it for the head loss (one call per iteration, e.g.
beside ``training_log``), and without it the tracker only sums up.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from megatron.core import num_microbatches_calculator as microbatches_calculator
from megatron.core.transformer.moe.moe_utils import (
    get_moe_layer_wise_logging_tracker,
    track_moe_metrics,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from graphheads.integrations.megatron.attention import AUX_LOSS_NAME
from graphheads.integrations.megatron.specs import goh_layer_spec, moh_layer_spec

__all__ = ["SETTINGS", "layer_spec", "log_head_loss", "spec_from_env"]

# environment variable -> (meaning, default)
SETTINGS: dict[str, tuple[str, str]] = {
    "GRAPHHEADS_ATTENTION": ("'goh' (graph-router) or 'moh' (linear router)", "goh"),
    "GRAPHHEADS_NUM_SHARED": ("always-on heads per layer", "2"),
    "GRAPHHEADS_TOP_K": ("routed heads per token", "2"),
    "GRAPHHEADS_LOAD_BALANCE_COEFF": ("beta of the head load-balance loss", "0.01"),
    "GRAPHHEADS_FEATURE_DIM": ("graph-router node features F (goh)", "16"),
    "GRAPHHEADS_GRAPH_LAYERS": ("message-passing layers over the head graph (goh)", "2"),
    "GRAPHHEADS_CORE_ATTENTION": (
        "'te' (Transformer Engine's TEDotProductAttention), 'torch' (SDPA) or 'auto' "
        "(te where Transformer Engine imports and CUDA is there)",
        "auto",
    ),
}


def _read(env: Mapping[str, str], name: str, kind: type) -> Any:
    raw = env.get(name, SETTINGS[name][1])
    try:
        return kind(raw)
    except ValueError as err:
        raise ValueError(
            f"graphheads.integrations.megatron.lm: {name}={raw!r} is not a {kind.__name__} "
            f"({SETTINGS[name][0]})"
        ) from err


def _core_attention(choice: str) -> type | None:
    """Transformer Engine's core attention for ``te`` (or ``auto`` where it runs);
    ``None``, graphheads' SDPA one, otherwise."""
    if choice not in ("auto", "te", "torch"):
        raise ValueError(
            f"graphheads.integrations.megatron.lm: GRAPHHEADS_CORE_ATTENTION={choice!r}, "
            "expected 'auto', 'te' or 'torch'"
        )
    if choice == "torch" or (choice == "auto" and not torch.cuda.is_available()):
        return None
    try:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
    except ImportError as err:
        if choice == "te":
            raise ValueError(
                "graphheads.integrations.megatron.lm: GRAPHHEADS_CORE_ATTENTION='te' but "
                f"Transformer Engine does not import ({err})"
            ) from err
        return None
    return TEDotProductAttention


def spec_from_env(env: Mapping[str, str] | None = None) -> ModuleSpec:
    """The routed GPT layer spec the environment variables of :data:`SETTINGS` describe
    (``os.environ`` by default): Megatron's local layer spec with
    :class:`~graphheads.integrations.megatron.RoutedSelfAttention`. A ValueError names
    a variable whose value cannot be used."""
    env = os.environ if env is None else env
    prefix = "GRAPHHEADS_"
    ours = [name.removeprefix(prefix) for name in SETTINGS]
    misspelt = sorted(  # a name close to a setting's; other GRAPHHEADS_* names are not ours
        k
        for k in env
        if k.startswith(prefix)
        and k not in SETTINGS
        and difflib.get_close_matches(k.removeprefix(prefix), ours, n=1, cutoff=0.8)
    )
    if misspelt:
        raise ValueError(
            f"graphheads.integrations.megatron.lm: unknown setting(s) {misspelt}; "
            f"known: {sorted(SETTINGS)}"
        )
    attention = env.get("GRAPHHEADS_ATTENTION", SETTINGS["GRAPHHEADS_ATTENTION"][1])
    coeff = _read(env, "GRAPHHEADS_LOAD_BALANCE_COEFF", float)
    if not (math.isfinite(coeff) and coeff >= 0):
        raise ValueError(
            f"graphheads.integrations.megatron.lm: GRAPHHEADS_LOAD_BALANCE_COEFF={coeff} must "
            "be a finite number >= 0"
        )
    common: dict[str, Any] = {
        "core_attention": _core_attention(
            env.get("GRAPHHEADS_CORE_ATTENTION", SETTINGS["GRAPHHEADS_CORE_ATTENTION"][1])
        ),
        "load_balance_coeff": coeff,
        # Megatron's torch norm follows config.normalization (LayerNorm or RMSNorm);
        # the default (apex's fused LayerNorm where apex is installed) refuses RMSNorm
        "normalization": "RMSNorm",
    }
    num_shared = _read(env, "GRAPHHEADS_NUM_SHARED", int)
    top_k = _read(env, "GRAPHHEADS_TOP_K", int)
    if attention == "moh":
        return moh_layer_spec(num_shared, top_k, **common)
    if attention == "goh":
        return goh_layer_spec(
            num_shared,
            top_k,
            **common,
            feature_dim=_read(env, "GRAPHHEADS_FEATURE_DIM", int),
            graph_layers=_read(env, "GRAPHHEADS_GRAPH_LAYERS", int),
        )
    raise ValueError(
        f"graphheads.integrations.megatron.lm: GRAPHHEADS_ATTENTION={attention!r}, expected "
        "'goh' or 'moh'"
    )


#: what ``--spec graphheads.integrations.megatron.lm layer_spec`` picks
layer_spec: ModuleSpec = spec_from_env()


def log_head_loss(
    iteration: int, writer: Any = None, wandb_writer: Any = None
) -> dict[str, torch.Tensor]:
    """Log the head load-balance loss of the iteration that just ended and clear it:
    Megatron's ``track_moe_metrics`` for :data:`AUX_LOSS_NAME` (summed over pipeline
    stages, averaged over micro-batches and layers), to a TensorBoard and/or W&B writer.
    Returns ``{AUX_LOSS_NAME: value}``, one data-parallel replica's value (empty before
    any routed layer trained in this process: every pipeline stage must have trained one,
    since the stages all-reduce). Call it on every rank, once per iteration, after the
    step. It clears Megatron's whole auxiliary-loss tracker: meant for models without
    experts (with experts, Megatron-LM's own call logs it too, divided by the number of
    expert layers)."""
    tracker = get_moe_layer_wise_logging_tracker()
    if AUX_LOSS_NAME not in tracker:
        return {}
    calculator = microbatches_calculator._GLOBAL_NUM_MICROBATCHES_CALCULATOR
    microbatches = 1 if calculator is None else microbatches_calculator.get_num_microbatches()
    totals: dict[str, torch.Tensor] = {}
    track_moe_metrics(
        loss_scale=1.0 / microbatches,
        iteration=iteration,
        writer=writer,
        wandb_writer=wandb_writer,
        total_loss_dict=totals,
        track_names=[AUX_LOSS_NAME],
        num_layers=tracker[AUX_LOSS_NAME]["values"].numel(),
    )
    return totals

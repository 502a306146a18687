"""Megatron GPT layer specs with graphheads' routed self-attention: Megatron's local spec
(``get_gpt_layer_local_spec``: separate input norm, column/row-parallel projections)
whose self-attention is :class:`~graphheads.integrations.megatron.RoutedSelfAttention`
and whose core attention is
:class:`~graphheads.integrations.megatron.TorchCoreAttention` unless given."""

from __future__ import annotations

from typing import Any

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from graphheads.graph import HeadGraph
from graphheads.integrations.megatron.attention import (
    RoutedSelfAttention,
    RouterKind,
    TorchCoreAttention,
)

__all__ = ["goh_layer_spec", "moh_layer_spec"]


def _routed_spec(
    router: RouterKind,
    num_shared: int,
    top_k: int,
    *,
    normalization: str | None,
    qk_layernorm: bool,
    core_attention: type | None,
    load_balance_coeff: float,
    graph: HeadGraph | None,
    router_kwargs: dict[str, Any],
) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    attention = spec.submodules.self_attention
    submodules = attention.submodules
    submodules.core_attention = core_attention or TorchCoreAttention
    params: dict[str, Any] = {
        "attn_mask_type": AttnMaskType.causal,
        "router": router,
        "num_shared": num_shared,
        "top_k": top_k,
        "load_balance_coeff": load_balance_coeff,
        "router_kwargs": router_kwargs,
    }
    if graph is not None:
        params["graph"] = graph
    spec.submodules.self_attention = ModuleSpec(
        module=RoutedSelfAttention, params=params, submodules=submodules
    )
    return spec


def moh_layer_spec(
    num_shared: int,
    top_k: int,
    *,
    normalization: str | None = None,
    qk_layernorm: bool = False,
    core_attention: type | None = None,
    load_balance_coeff: float = 0.01,
    **router_kwargs: Any,
) -> ModuleSpec:
    """Megatron's local GPT layer spec with Mixture-of-Head self-attention
    (:class:`RoutedSelfAttention` with a :class:`~graphheads.moh.MoHRouter`).

    Args:
        num_shared: always-on heads.
        top_k: routed heads per token.
        normalization: ``"LayerNorm"`` (default) or ``"RMSNorm"``.
        qk_layernorm: normalise queries and keys per head (Megatron's option).
        core_attention: the core-attention class (default :class:`TorchCoreAttention`).
        load_balance_coeff: beta of the load-balance loss.
        router_kwargs: further :class:`~graphheads.moh.MoHRouter` arguments.
    """
    return _routed_spec(
        "moh",
        num_shared,
        top_k,
        normalization=normalization,
        qk_layernorm=qk_layernorm,
        core_attention=core_attention,
        load_balance_coeff=load_balance_coeff,
        graph=None,
        router_kwargs=router_kwargs,
    )


def goh_layer_spec(
    num_shared: int,
    top_k: int,
    graph: HeadGraph | None = None,
    *,
    normalization: str | None = None,
    qk_layernorm: bool = False,
    core_attention: type | None = None,
    load_balance_coeff: float = 0.01,
    **router_kwargs: Any,
) -> ModuleSpec:
    """Megatron's local GPT layer spec with Graph-of-Heads self-attention
    (:class:`RoutedSelfAttention` with a :class:`~graphheads.goh.GraphRouter`). Every
    layer builds its own router and head graph (a copy of ``graph``).

    Args:
        num_shared: always-on heads.
        top_k: routed heads per token.
        graph: the head graph (default: complete with learnable edge weights).
        normalization: ``"LayerNorm"`` (default) or ``"RMSNorm"``.
        qk_layernorm: normalise queries and keys per head (Megatron's option).
        core_attention: the core-attention class (default :class:`TorchCoreAttention`).
        load_balance_coeff: beta of the load-balance loss.
        router_kwargs: further :class:`~graphheads.goh.GraphRouter` arguments
            (``feature_dim``, ``graph_layers``, ``conv``, ``hard_gates``, ...).
    """
    return _routed_spec(
        "goh",
        num_shared,
        top_k,
        normalization=normalization,
        qk_layernorm=qk_layernorm,
        core_attention=core_attention,
        load_balance_coeff=load_balance_coeff,
        graph=graph,
        router_kwargs=router_kwargs,
    )

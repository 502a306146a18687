"""Models wired from a :class:`~graphheads.config.ModelConfig`, in one place.

:func:`build_attention` is the seam that turns ``ModelConfig.attention`` ("mha", "moh",
"goh") into an attention module, so a stack swaps its attention at every layer;
:func:`build_stack` makes the blocks of an encoder, a decoder or a decoder-only LM.
Leaf modules never read a config: only this module does.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

from torch import nn

from graphheads.attention import MultiHeadAttention
from graphheads.blocks import (
    FeedForward,
    SwiGLUFeedForward,
    TransformerBlock,
    TransformerStack,
    make_norm,
)
from graphheads.config import ModelConfig
from graphheads.gates import check_routing_config
from graphheads.goh import GoHAttention, routers_of
from graphheads.graph import HeadGraph
from graphheads.moh import MoHAttention
from graphheads.rotary import RotaryEmbedding

__all__ = [
    "GraphSource",
    "build_attention",
    "build_stack",
    "graph_source",
    "make_head_graph",
    "set_top_k",
]

GraphSource = Callable[[], "HeadGraph | None"]


def make_head_graph(config: ModelConfig) -> HeadGraph:
    """The preset head graph ``config.graph`` names."""
    return HeadGraph.preset(
        config.graph,
        config.num_heads,
        learnable=config.graph_learnable,
        num_shared=config.num_shared,
    )


def build_attention(
    config: ModelConfig, *, graph: HeadGraph | None = None, carry: bool = False, cross: bool = False
) -> nn.Module:
    """The attention module for one attention block of a stack.

    "mha" gives :class:`~graphheads.attention.MultiHeadAttention`, "moh"
    :class:`~graphheads.moh.MoHAttention` and "goh" :class:`~graphheads.goh.GoHAttention`
    over ``graph`` (default: a new ``config.graph`` preset); ``carry`` makes the
    graph-router read the previous layer's head states. With ``block="llama"`` the
    projections have no biases and self-attention (not ``cross``) rotates queries and keys
    (rotary positions); ``num_kv_heads`` gives grouped-query attention.
    """
    llama = config.block == "llama"
    shape = {
        "dropout": config.dropout,
        "bias": not llama,
        "num_kv_heads": config.num_kv_heads,
        "rotary": (
            RotaryEmbedding(
                config.d_model // config.num_heads, config.max_seq_len, config.rope_theta
            )
            if llama and not cross
            else None
        ),
    }
    if config.attention == "mha":
        return MultiHeadAttention(config.d_model, config.num_heads, **shape)  # type: ignore[arg-type]
    if config.attention == "moh":
        return MoHAttention(
            config.d_model,
            config.num_heads,
            config.num_shared,
            config.routed_top_k,
            gate_convention=config.gate_convention,
            hard_gates=config.hard_gates,
            execution=config.execution,
            sparse_backend=config.sparse_backend,
            balance_bias=config.balance != "aux_loss",
            **shape,  # type: ignore[arg-type]
        )
    return GoHAttention(
        config.d_model,
        config.num_heads,
        config.num_shared,
        config.routed_top_k,
        graph if graph is not None else make_head_graph(config),
        **shape,  # type: ignore[arg-type]
        feature_dim=config.graph_feature_dim,
        graph_layers=config.graph_layers,
        conv=config.graph_conv,
        carry_head_states=carry,
        graph_scale_init=config.graph_scale_init,
        gate_convention=config.gate_convention,
        hard_gates=config.hard_gates,
        execution=config.execution,
        sparse_backend=config.sparse_backend,
        balance_bias=config.balance != "aux_loss",
    )


def graph_source(config: ModelConfig, graph: HeadGraph | None) -> GraphSource:
    """Where each GoH block's head graph comes from: ``graph`` (a template: copied per
    block, or the one object for all blocks with ``share_graph``), else the preset
    ``config.graph``; ``None`` lets a block build its own preset graph."""
    if config.attention != "goh":
        if graph is not None:
            raise ValueError(f"graph is only used with attention='goh', not {config.attention!r}")
        return lambda: None
    if graph is not None and graph.num_heads != config.num_heads:
        raise ValueError(
            f"graph has {graph.num_heads} heads, config has num_heads={config.num_heads}"
        )
    if config.share_graph:
        shared = graph if graph is not None else make_head_graph(config)
        return lambda: shared
    if graph is not None:
        return lambda: copy.deepcopy(graph)
    return lambda: None


def build_stack(
    config: ModelConfig, graphs: GraphSource, *, num_layers: int, cross_attention: bool
) -> TransformerStack:
    """``num_layers`` blocks (with cross-attention for a decoder) and, for pre-norm, the
    final norm. ``block="llama"``: pre-norm RMSNorm blocks with a SwiGLU FFN."""
    carry = config.carry_head_states
    llama = config.block == "llama"
    norm_kind = "rms" if llama else "layer"
    pre_norm = llama or config.norm_first

    def feed_forward() -> nn.Module:
        if llama:
            return SwiGLUFeedForward(config.d_model, config.d_ff)
        return FeedForward(
            config.d_model, config.d_ff, dropout=config.dropout, activation=config.activation
        )

    blocks = [
        TransformerBlock(
            self_attn=build_attention(config, graph=graphs(), carry=carry and i > 0),
            cross_attn=(
                build_attention(config, graph=graphs(), cross=True) if cross_attention else None
            ),
            feed_forward=feed_forward(),
            d_model=config.d_model,
            dropout=config.dropout,
            norm_first=pre_norm,
            layer_norm_eps=config.layer_norm_eps,
            norm=norm_kind,
        )
        for i in range(num_layers)
    ]
    norm = make_norm(norm_kind, config.d_model, config.layer_norm_eps) if pre_norm else None
    return TransformerStack(blocks, norm=norm, carry_head_states=carry)


def set_top_k(model: nn.Module, top_k: int) -> int:
    """Route every token to ``top_k`` routed heads in every router of ``model`` (a
    graphheads model, a converted Hugging Face model, a model after
    :func:`~graphheads.integrations.pytorch.route_heads`): for schedules that change how
    many heads are active during tuning. A graphheads model's ``config`` follows, so a
    checkpoint rebuilds it. Checked for every router before any changes (ValueError
    naming the value); returns the number of routers changed."""
    routers = routers_of(model)
    if not routers:
        raise ValueError(f"set_top_k: {type(model).__name__} has no routers")
    for router in routers:
        check_routing_config("set_top_k", router.num_heads, router.num_shared, top_k)
    for router in routers:
        router.top_k = top_k
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        setattr(model, "config", dataclasses.replace(config, top_k=top_k))  # noqa: B010
    recorded = getattr(config, "graphheads", None)  # a converted Hugging Face model's
    if isinstance(recorded, dict) and "top_k" in recorded:  # settings, for save_pretrained
        recorded["top_k"] = top_k
    return len(routers)

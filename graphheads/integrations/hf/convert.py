"""Conversion of transformers attention modules into graph-routed ones, and the gated
attention kernel registered with transformers (see :mod:`graphheads.integrations.hf`).

Shape legend: b batch, t tokens, h heads, e head width.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from graphheads.goh import GraphRouter, record_routing
from graphheads.graph import HeadGraph

__all__ = [
    "ATTENTION_NAME",
    "SUPPORTED_ATTENTION",
    "RoutedHFAttention",
    "convert_to_goh",
    "converted_modules",
    "record_routing",
]

ATTENTION_NAME = "graphheads"
SUPPORTED_ATTENTION = ("LlamaAttention", "GPT2Attention", "BertSelfAttention")


def gated_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    head_gates: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' SDPA kernel, then each head's output (b, t, h, e) times its gate."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if head_gates is not None:
        out = out * head_gates.unsqueeze(-1).to(out.dtype)  # (b, t, h, e)
    return out, weights


def _register_kernel() -> None:
    """Register the gated kernel and its mask format (SDPA's); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, gated_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class RoutedHFAttention(nn.Module):
    """Mixin put in front of a transformers attention class by :func:`convert_to_goh`.

    ``router`` scores heads in its own order (important heads first, so that they can be
    the shared ones); model head j is router head ``head_position[j]``.
    """

    router: GraphRouter
    head_position: Tensor

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        routing = self.router(hidden_states)
        gates = routing.gates.index_select(-1, self.head_position)  # (b, t, h), model order
        return super().forward(hidden_states, *args, head_gates=gates, **kwargs)


def _routed_class(base: type, made: dict[type, type]) -> type:
    """One routed subclass per attention class (``made`` holds this conversion's)."""
    if base not in made:
        made[base] = type(f"Routed{base.__name__}", (RoutedHFAttention, base), {})
    return made[base]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if any(c.__name__ in SUPPORTED_ATTENTION for c in type(m).__mro__)
        and not isinstance(m, RoutedHFAttention)
    ]


def converted_modules(model: nn.Module) -> list[RoutedHFAttention]:
    """The routed attention modules of a converted model, in layer order."""
    return [m for m in model.modules() if isinstance(m, RoutedHFAttention)]


def convert_to_goh(
    model: nn.Module,
    *,
    num_shared: int,
    top_k: int,
    graph: HeadGraph | None = None,
    head_importance: Tensor | None = None,
    feature_dim: int = 16,
    num_layers: int = 2,
    prior_step: float = 0.01,
) -> nn.Module:
    """Route the heads of every attention module of ``model`` (changed in place).

    Args:
        model: a transformers ``LlamaForCausalLM``/``LlamaModel``, ``GPT2LMHeadModel``/
            ``GPT2Model`` or ``BertModel`` (or another model built from those attention
            classes).
        num_shared: always-on heads per layer.
        top_k: routed heads per token; ``num_heads - num_shared`` keeps every head on and
            reproduces the original model exactly.
        graph: head-graph template, copied per layer (default: complete graph with
            learnable edge weights). Router head i is the i-th most important head.
        head_importance: (layers, heads) scores; the most important heads of each layer
            become its shared heads and the preferred routed heads.
        feature_dim: node feature width of the routers.
        num_layers: message-passing layers of the routers.
        prior_step: with fewer than all heads on, router head i starts with score prior
            ``-i * prior_step`` (small: gates start near 1).

    Returns:
        ``model``, now using the ``"graphheads"`` attention kernel.
    """
    modules = _attention_modules(model)
    if not modules:
        kind = "already converted" if converted_modules(model) else "not a supported model"
        raise ValueError(
            f"convert_to_goh: {type(model).__name__} is {kind}; supported attention classes: "
            f"{list(SUPPORTED_ATTENTION)}"
        )
    config: Any = getattr(model, "config", None)
    num_heads, d_model = int(config.num_attention_heads), int(config.hidden_size)
    if head_importance is not None and tuple(head_importance.shape) != (len(modules), num_heads):
        raise ValueError(
            f"convert_to_goh: head_importance has shape {tuple(head_importance.shape)}, "
            f"expected (layers, heads) = ({len(modules)}, {num_heads})"
        )
    _register_kernel()
    classes: dict[type, type] = {}
    for layer, module in enumerate(modules):
        param = next(module.parameters())
        template = (
            copy.deepcopy(graph)
            if graph is not None
            else HeadGraph.complete(num_heads, learnable="edge")
        )
        router = GraphRouter.starting_uniform(
            d_model,
            num_heads,
            num_shared,
            top_k,
            template,
            prior_step=prior_step,
            feature_dim=feature_dim,
            num_layers=num_layers,
        )
        order = (
            torch.argsort(head_importance[layer], descending=True, stable=True)
            if head_importance is not None
            else torch.arange(num_heads)
        )
        module.__class__ = _routed_class(type(module), classes)
        module.add_module("router", router.to(device=param.device, dtype=param.dtype))
        module.register_buffer("head_position", torch.argsort(order).to(param.device))
    model.set_attn_implementation(ATTENTION_NAME)  # type: ignore[operator]
    return model

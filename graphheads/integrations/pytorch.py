"""Graph-routed heads in plain PyTorch models: every ``torch.nn.MultiheadAttention``.

:func:`route_heads` replaces each :class:`torch.nn.MultiheadAttention` of a model (a
``torch.nn.TransformerEncoder``, a ViT, anything) by a :class:`RoutedMultiheadAttention`:
a subclass with the same parameters (the original state_dict keys load), the same call
signature and the same return value, plus a :class:`~graphheads.goh.GraphRouter` as
``router`` whose gates scale each head's output before ``out_proj``. Routers start from
uniform routing, so with every head on the model computes what it did before (tested
against the original modules). Read the routing with
:func:`~graphheads.goh.record_routing`; change the active heads with
:func:`~graphheads.builders.set_top_k`.

Shape legend: b batch, t query tokens, s key tokens, h heads, e head width, d width.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphheads.goh import GraphRouter
from graphheads.graph import HeadGraph
from graphheads.masks import self_attention_mask
from graphheads.moh import MoHRouter

__all__ = ["RoutedMultiheadAttention", "RouterKind", "route_heads"]

RouterKind = Literal["goh", "moh"]


class RoutedMultiheadAttention(nn.MultiheadAttention):
    """A drop-in :class:`torch.nn.MultiheadAttention` whose heads are gated by a
    :class:`~graphheads.goh.GraphRouter` or a :class:`~graphheads.moh.MoHRouter`
    (``self.router``, reading the query input).

    Build it with :meth:`from_torch` (or :func:`route_heads`). ``forward`` takes
    ``nn.MultiheadAttention``'s arguments and returns ``(output, weights)`` as it does;
    ``weights`` are the attention probabilities (the gates scale head outputs, not
    probabilities). ``add_bias_kv`` and ``add_zero_attn`` are not supported.
    """

    router: GraphRouter | MoHRouter

    @classmethod
    def from_torch(
        cls,
        module: nn.MultiheadAttention,
        *,
        num_shared: int,
        top_k: int,
        graph: HeadGraph | None = None,
        prior_step: float = 0.01,
        router: RouterKind = "goh",
        **router_kwargs: Any,
    ) -> RoutedMultiheadAttention:
        """A routed copy of ``module`` (same weights, same device and dtype). ``router``:
        "goh" (:meth:`GraphRouter.starting_uniform`, the other arguments as there) or
        "moh" (a :class:`~graphheads.moh.MoHRouter` reset to uniform routing)."""
        if router not in ("goh", "moh"):
            raise ValueError(
                f"RoutedMultiheadAttention: router must be 'goh' or 'moh', got {router!r}"
            )
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(
                "RoutedMultiheadAttention: add_bias_kv and add_zero_attn are not supported"
            )
        weight = module.out_proj.weight
        routed = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        )
        routed.load_state_dict(module.state_dict())
        gate: GraphRouter | MoHRouter
        if router == "goh":
            gate = GraphRouter.starting_uniform(
                module.embed_dim,
                module.num_heads,
                num_shared,
                top_k,
                copy.deepcopy(graph) if graph is not None else None,
                prior_step=prior_step,
                **router_kwargs,
            )
        else:
            gate = MoHRouter(module.embed_dim, module.num_heads, num_shared, top_k, **router_kwargs)
            gate.reset_to_uniform()
        routed.add_module("router", gate.to(device=weight.device, dtype=weight.dtype))
        # nn.TransformerEncoderLayer's inference fast path runs a fused kernel on the packed
        # weights instead of calling forward() (the routing would be skipped); it checks
        # this flag. The weights are used the same way either way.
        routed._qkv_same_embed_dim = False
        return routed.train(module.training)  # an eval model stays in eval (no dropout)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:  # (t, d): one sequence
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (t, b, d) -> (b, t, d)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        b, t, _ = query.shape
        s, h = key.size(1), self.num_heads
        e = self.embed_dim // h
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q = F.linear(query, w_q, b_q).view(b, t, h, e).transpose(1, 2)  # (b, h, t, e)
        k = F.linear(key, w_k, b_k).view(b, s, h, e).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(b, s, h, e).transpose(1, 2)
        mask, causal = self_attention_mask(
            batch_size=b,
            num_heads=h,
            query_len=t,
            key_len=s,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            dtype=q.dtype,
            device=q.device,
        )
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # the probabilities are wanted: compute attention once, from them
            scores = q @ k.transpose(-2, -1) / e**0.5
            if mask is not None:
                scores = scores + mask
            elif causal:
                scores = scores.masked_fill(
                    torch.ones(t, s, dtype=torch.bool, device=q.device).triu(1), float("-inf")
                )
            weights = F.dropout(scores.softmax(-1), dropout, self.training)  # (b, h, t, s)
            heads = weights @ v  # as nn.MultiheadAttention: the weights after dropout
        else:
            heads = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal
            )  # (b, h, t, e)
        gates = self.router(query).gates  # (b, t, h)
        heads = heads * gates.transpose(1, 2).unsqueeze(-1).to(heads.dtype)
        out = self.out_proj(heads.transpose(1, 2).reshape(b, t, self.embed_dim))
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(1)
            if unbatched:
                weights = weights.squeeze(0)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def route_heads(
    model: nn.Module,
    *,
    num_shared: int,
    top_k: int,
    graph: HeadGraph | None = None,
    prior_step: float = 0.01,
    router: RouterKind = "goh",
    **router_kwargs: Any,
) -> nn.Module:
    """Replace every :class:`torch.nn.MultiheadAttention` inside ``model`` (changed in
    place, and returned) by a :class:`RoutedMultiheadAttention` with the same weights.

    Args:
        model: any module holding ``nn.MultiheadAttention`` submodules.
        num_shared: always-on heads per attention module.
        top_k: routed heads per token; ``num_heads - num_shared`` keeps every head on and
            computes what the original model computed.
        graph: head-graph template, copied per module (default: the complete graph with
            learnable edge weights).
        prior_step: with fewer heads on, router head i starts with score prior
            ``-i * prior_step``.
        router: "goh" (graph-router, default) or "moh" (MoH's linear router; ``graph``
            and ``prior_step`` do not apply).
        router_kwargs: more router arguments (``feature_dim``, ``graph_layers``, ...).

    Raises ValueError, before changing anything, when ``model`` holds no
    ``nn.MultiheadAttention`` or a setting does not fit one of them.
    """
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and not isinstance(m, RoutedMultiheadAttention)
    ]
    if not targets:
        raise ValueError(f"route_heads: {type(model).__name__} holds no nn.MultiheadAttention")
    routed = {
        name: RoutedMultiheadAttention.from_torch(
            m,
            num_shared=num_shared,
            top_k=top_k,
            graph=graph,
            prior_step=prior_step,
            router=router,
            **router_kwargs,
        )
        for name, m in targets
    }  # every module built (and checked) before the model changes
    for name, module in routed.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    for encoder in model.modules():  # as nn.TransformerEncoder's own check at init decides
        if isinstance(encoder, nn.TransformerEncoder) and any(
            isinstance(m, RoutedMultiheadAttention) for m in encoder.modules()
        ):  # nested tensors would skip the routed forward (and fail in it)
            encoder.use_nested_tensor = False
    return model

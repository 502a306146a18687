r"""Mixture-of-Head attention (Jin et al. 2024, https://arxiv.org/abs/2410.11842).

Heads are experts: every token uses the first ``num_shared`` heads (always on) and the
``top_k`` best of the remaining ``num_heads - num_shared`` routed heads; each head's output
is scaled by its gate before the output projection.

The gate, as the authors' released code computes it (``gate_convention="reference"``),
per token with router input x::

    p   = softmax(x W_r)                      # routed_gate: d -> H_r
    m   = one-hot of top-k(p)
    g_r = k * (p * m) / max(sum(p * m), eps)
    g_s = h_s * softmax(x W_s)                # shared_gate: d -> h_s (all ones if h_s == 1)
    a   = 2 * softmax(x W_h)                  # type_gate: d -> 2, two-stage weights
    g   = [a_0 * g_s, a_1 * g_r]

``gate_convention="paper"`` drops the factors k, h_s and 2 and the renormalisation over
the chosen heads (equations 5-6 of the paper). The load-balance loss over the tokens of
a batch is ``L_b = H_r * sum_i P_i f_i`` with ``P_i`` the mean routed probability and
``f_i`` the fraction of tokens choosing routed head i; at perfect balance ``L_b = top_k``.

Shape legend: b batch, t tokens, h heads, r routed heads, k top-k, d model width,
e head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from graphheads.attention import AttentionOutput, KVCache, MultiHeadAttention
from graphheads.sparse import sparse_routed_attention

__all__ = [
    "GateConvention",
    "MoHAttention",
    "MoHRouter",
    "RoutedAttention",
    "RoutingOutput",
    "load_balance_loss",
    "moh_gates",
]

GateConvention = Literal["reference", "paper"]
Execution = Literal["dense", "sparse"]


@dataclass
class RoutingOutput:
    """The routing of one attention block.

    Attributes:
        gates: (b, t, h) the weight of every head's output; 0 for unchosen routed heads.
        router_probs: (b, t, r) softmax over the routed heads (``p``).
        routed_mask: (b, t, r) 1.0 where a routed head is chosen (``m``).
        top_k_indices: (b, t, k) the chosen routed heads, counted among routed heads
            (add ``num_shared`` for the head index).
        load_balance_loss: scalar ``H_r * sum_i P_i f_i`` (0 without routed heads).
        head_states: (b, t, h, f) the graph-router's final node states (GoH only).
    """

    gates: Tensor
    router_probs: Tensor
    routed_mask: Tensor
    top_k_indices: Tensor
    load_balance_loss: Tensor
    head_states: Tensor | None = None

    @property
    def num_shared(self) -> int:
        return int(self.gates.size(-1) - self.routed_mask.size(-1))

    @property
    def active_heads(self) -> Tensor:
        """(b, t, h) bool: True for every head a token uses (shared heads always)."""
        shared = self.routed_mask.new_ones((*self.routed_mask.shape[:-1], self.num_shared))
        return torch.cat([shared, self.routed_mask], dim=-1) > 0


def load_balance_loss(router_probs: Tensor, routed_mask: Tensor) -> Tensor:
    """``H_r * sum_i P_i f_i`` over all tokens: P_i mean probability, f_i mean choice."""
    num_routed = router_probs.size(-1)
    if num_routed == 0:
        return router_probs.new_zeros(())
    p_mean = router_probs.reshape(-1, num_routed).mean(dim=0)  # (r,)
    f_mean = routed_mask.reshape(-1, num_routed).mean(dim=0)  # (r,)
    return num_routed * (p_mean * f_mean).sum()


def moh_gates(
    routed_logits: Tensor,
    shared_logits: Tensor | None,
    type_logits: Tensor | None,
    *,
    num_shared: int,
    top_k: int,
    gate_convention: GateConvention = "reference",
    hard_gates: bool = False,
) -> RoutingOutput:
    """The MoH gate from router logits.

    Args:
        routed_logits: (b, t, r) scores of the routed heads (r may be 0).
        shared_logits: (b, t, h_s) scores of the shared heads, or ``None`` for equal
            weights (used when ``num_shared <= 1``).
        type_logits: (b, t, 2) two-stage scores [shared, routed], or ``None`` for equal
            weights (used when there are no shared or no routed heads).
        num_shared: h_s.
        top_k: routed heads chosen per token.
        gate_convention: "reference" (released code) or "paper" (equations 5-6).
        hard_gates: forward 0/1 gates, backward through the soft gates (straight-through).
    """
    reference = gate_convention == "reference"
    lead = routed_logits.shape[:-1]
    num_routed = routed_logits.size(-1)
    probs = routed_logits.softmax(dim=-1)  # (b, t, r)
    if num_routed > 0:
        top_idx = torch.topk(probs, top_k, dim=-1).indices  # (b, t, k)
        mask = torch.zeros_like(probs).scatter(-1, top_idx, 1.0)  # (b, t, r), no one-hot
        chosen = probs * mask
        if reference:
            denom = chosen.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).eps)
            routed_gates = top_k * chosen / denom
        else:
            routed_gates = chosen
    else:
        top_idx = torch.zeros((*lead, 0), dtype=torch.long, device=probs.device)
        mask = routed_gates = probs
    if num_shared > 0:
        if shared_logits is None:
            shared_gates = routed_logits.new_ones((*lead, num_shared))
            if not reference:
                shared_gates = shared_gates / num_shared
        else:
            shared_gates = shared_logits.softmax(dim=-1) * (num_shared if reference else 1)
        if num_routed > 0:
            scale = 2.0 if reference else 1.0
            if type_logits is None:
                weights = routed_logits.new_full((*lead, 2), 0.5 * scale)
            else:
                weights = type_logits.softmax(dim=-1) * scale  # (b, t, 2)
            shared_gates = weights[..., :1] * shared_gates
            routed_gates = weights[..., 1:] * routed_gates
        gates = torch.cat([shared_gates, routed_gates], dim=-1)  # (b, t, h)
    else:
        gates = routed_gates
    if hard_gates:
        hard = (gates > 0).to(gates.dtype)
        gates = hard + (gates - gates.detach())  # exactly 0/1 forward, soft gradient backward
    return RoutingOutput(
        gates=gates,
        router_probs=probs,
        routed_mask=mask,
        top_k_indices=top_idx,
        load_balance_loss=load_balance_loss(probs, mask),
    )


def check_routing_config(owner: str, num_heads: int, num_shared: int, top_k: int) -> None:
    """ValueError naming the values for an impossible (num_heads, num_shared, top_k)."""
    if num_heads < 1:
        raise ValueError(f"{owner}: num_heads must be >= 1, got {num_heads}")
    if not 0 <= num_shared <= num_heads:
        raise ValueError(
            f"{owner}: num_shared ({num_shared}) must be in [0, num_heads ({num_heads})]"
        )
    num_routed = num_heads - num_shared
    if num_routed > 0 and not 1 <= top_k <= num_routed:
        raise ValueError(
            f"{owner}: top_k ({top_k}) must be in [1, routed heads ({num_routed}) = "
            f"num_heads ({num_heads}) - num_shared ({num_shared})]"
        )
    if num_routed == 0 and top_k != 0:
        raise ValueError(
            f"{owner}: top_k ({top_k}) must be 0 when every head is shared "
            f"(num_shared == num_heads == {num_heads})"
        )


class MoHRouter(nn.Module):
    r"""The Mixture-of-Head router of Jin et al. 2024.

    Args:
        d_model: width of the router input x.
        num_heads: heads H.
        num_shared: always-on heads h_s (the first h_s heads).
        top_k: routed heads per token (1 <= top_k <= H - h_s when there are routed heads).
        gate_convention: "reference" (default, the released code) or "paper".
        hard_gates: 0/1 gates with a straight-through estimator.
        parameter_free: the MoH-LLaMA3 router: routed scores are the L2 norms of the
            routed heads' queries divided by their per-token standard deviation over routed
            heads; shared and two-stage weights are equal. Needs ``queries`` in forward.

    Submodules (public names, one-to-one with other implementations' weights):
        ``routed_gate`` (d -> H - h_s, no bias), ``shared_gate`` (d -> h_s, no bias; only
        when h_s > 1), ``type_gate`` (d -> 2, no bias; only with shared and routed heads).

    Shapes: x (b, t, d), queries (b, t, h, e) -> :class:`RoutingOutput`.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_shared: int,
        top_k: int,
        *,
        gate_convention: GateConvention = "reference",
        hard_gates: bool = False,
        parameter_free: bool = False,
    ) -> None:
        super().__init__()
        check_routing_config(type(self).__name__, num_heads, num_shared, top_k)
        if gate_convention not in ("reference", "paper"):
            raise ValueError(
                f"MoHRouter: gate_convention must be 'reference' or 'paper', "
                f"got {gate_convention!r}"
            )
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_shared = num_shared
        self.num_routed = num_heads - num_shared
        self.top_k = top_k
        self.gate_convention: GateConvention = gate_convention
        self.hard_gates = hard_gates
        self.parameter_free = parameter_free
        learned = not parameter_free
        self.routed_gate = (
            nn.Linear(d_model, self.num_routed, bias=False)
            if learned and self.num_routed > 0
            else None
        )
        self.shared_gate = (
            nn.Linear(d_model, num_shared, bias=False) if learned and num_shared > 1 else None
        )
        self.type_gate = (
            nn.Linear(d_model, 2, bias=False)
            if learned and num_shared > 0 and self.num_routed > 0
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for gate in (self.routed_gate, self.shared_gate, self.type_gate):
            if gate is not None:
                gate.reset_parameters()

    @torch.no_grad()
    def reset_to_uniform(self) -> None:
        """Zero every gate weight: uniform routing, and with ``top_k`` equal to all routed
        heads every gate is exactly 1 (dense multi-head attention)."""
        for gate in (self.routed_gate, self.shared_gate, self.type_gate):
            if gate is not None:
                gate.weight.zero_()

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_shared={self.num_shared}, top_k={self.top_k}, "
            f"gate_convention={self.gate_convention!r}, parameter_free={self.parameter_free}"
        )

    def routed_logits(self, x: Tensor, queries: Tensor | None) -> Tensor:
        if self.parameter_free:
            if queries is None:
                raise ValueError("MoHRouter: parameter_free routing needs the per-head queries")
            norms = queries[..., self.num_shared :, :].norm(dim=-1)  # (b, t, r)
            if self.num_routed > 1:
                std = norms.std(dim=-1, keepdim=True)  # per token, over routed heads
                norms = norms / (std + torch.finfo(norms.dtype).eps)
            return norms
        if self.routed_gate is None:
            return x.new_zeros((*x.shape[:-1], 0))
        return self.routed_gate(x)

    def forward(
        self, x: Tensor, *, queries: Tensor | None = None, head_states: Tensor | None = None
    ) -> RoutingOutput:
        if head_states is not None:
            raise ValueError("MoHRouter: head_states is only used by the graph-router")
        if x.size(-1) != self.d_model:
            raise ValueError(f"MoHRouter: input width {x.size(-1)} != d_model ({self.d_model})")
        return moh_gates(
            self.routed_logits(x, queries),
            None if self.shared_gate is None else self.shared_gate(x),
            None if self.type_gate is None else self.type_gate(x),
            num_shared=self.num_shared,
            top_k=self.top_k,
            gate_convention=self.gate_convention,
            hard_gates=self.hard_gates,
        )


class RoutedAttention(MultiHeadAttention):
    """Multi-head attention whose head outputs are scaled by a router's gates before
    ``out_proj``. The router is any module with ``num_heads`` and
    ``forward(x, *, queries, head_states) -> RoutingOutput`` (:class:`MoHRouter`,
    :class:`~graphheads.goh.GraphRouter`).

    Projections keep the :class:`MultiHeadAttention` names (``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj``). Routing of token t reads only token t (the query input),
    so causal models stay causal and decoding with a cache routes as a full pass does.

    ``execution="dense"`` (default) computes every head and multiplies by the gates
    (static shapes: ``torch.compile``, DDP, FSDP); ``"sparse"`` computes only the active
    (token, head) pairs (:mod:`graphheads.sparse`), with equal results.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        router: nn.Module,
        dropout: float = 0.0,
        bias: bool = True,
        fused: bool = True,
        execution: Execution = "dense",
    ) -> None:
        super().__init__(d_model, num_heads, dropout=dropout, bias=bias, fused=fused)
        if execution not in ("dense", "sparse"):
            raise ValueError(
                f"{type(self).__name__}: execution must be 'dense' or 'sparse', got {execution!r}"
            )
        self.execution: Execution = execution
        self.sparse_chunk_rows = 64  # rows per routed head per chunk on the sparse path
        if getattr(router, "num_heads", None) != num_heads:
            raise ValueError(
                f"{type(self).__name__}: router has {getattr(router, 'num_heads', None)} heads, "
                f"attention has num_heads={num_heads}"
            )
        self.router = router

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        head_states: Tensor | None = None,
    ) -> AttentionOutput:
        key = query if key is None else key
        value = key if value is None else value
        self.check_inputs(query, key, value)
        sparse = self.execution == "sparse"
        needs_queries = bool(getattr(self.router, "parameter_free", False))
        q = self.project_query(query) if not sparse or needs_queries else None  # (b, h, t, e)
        routing: RoutingOutput = self.router(
            query, queries=None if q is None else q.transpose(1, 2), head_states=head_states
        )
        kv = self.project_kv(key, value, kv_cache)
        cache = kv if use_cache else None
        if sparse:
            output = sparse_routed_attention(
                self,
                query,
                kv,
                routing,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                is_causal=is_causal,
                q=q,
                chunk_rows=self.sparse_chunk_rows,
            )
            return AttentionOutput(output, routing, cache)
        assert q is not None
        heads = self.attend(
            q, kv, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal
        )
        gated = heads * routing.gates.transpose(1, 2).unsqueeze(-1)  # (b, h, t, e)
        return AttentionOutput(self.out_proj(self.merge_heads(gated)), routing, cache)


class MoHAttention(RoutedAttention):
    """Mixture-of-Head attention: :class:`MultiHeadAttention` plus a :class:`MoHRouter`
    (``self.router``). Returns :class:`~graphheads.attention.AttentionOutput` whose
    ``routing`` is the block's :class:`RoutingOutput`.

    Args:
        d_model: model width.
        num_heads: heads H.
        num_shared: always-on heads (the first ``num_shared``).
        top_k: routed heads per token.
        dropout: dropout on the attention weights.
        bias: whether the projections have a bias.
        fused: use PyTorch's fused attention kernel.
        gate_convention: "reference" or "paper" (see :class:`MoHRouter`).
        hard_gates: 0/1 gates with a straight-through estimator.
        parameter_free: the MoH-LLaMA3 router (see :class:`MoHRouter`).
        execution: "dense" (default) or "sparse" (see :class:`RoutedAttention`).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_shared: int,
        top_k: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        fused: bool = True,
        gate_convention: GateConvention = "reference",
        hard_gates: bool = False,
        parameter_free: bool = False,
        execution: Execution = "dense",
    ) -> None:
        router = MoHRouter(
            d_model,
            num_heads,
            num_shared,
            top_k,
            gate_convention=gate_convention,
            hard_gates=hard_gates,
            parameter_free=parameter_free,
        )
        super().__init__(
            d_model,
            num_heads,
            router=router,
            dropout=dropout,
            bias=bias,
            fused=fused,
            execution=execution,
        )

r"""Mixture-of-Head attention (Jin et al. 2024, https://arxiv.org/abs/2410.11842).

Heads are experts: every token uses the first ``num_shared`` heads (always on) and the
``top_k`` best of the remaining ``num_heads - num_shared`` routed heads; each head's output
is scaled by its gate before the output projection. :class:`MoHRouter` computes the
router logits with linear maps of the token (``routed_gate``, ``shared_gate``,
``type_gate``); :func:`graphheads.gates.moh_gates` turns them into the gate;
:class:`MoHAttention` is :class:`~graphheads.routed.RoutedAttention` with this router.

Shape legend: b batch, t tokens, h heads, r routed heads, k top-k, d model width,
e head width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from graphheads.compat import FORWARD_STACKLEVEL, padding_from_token_mask
from graphheads.execution import Execution, SparseBackendChoice
from graphheads.gates import (
    GateConvention,
    check_routing_config,
    moh_gates,
    router_precision,
    split_linear,
)
from graphheads.rotary import RotaryEmbedding
from graphheads.routed import RoutedAttention
from graphheads.types import RoutingOutput

__all__ = ["MoHAttention", "MoHRouter"]


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
        balance_bias: keep a top-k selection bias (buffer ``selection_bias``) for
            balancing without an auxiliary loss (:func:`~graphheads.gates.update_balance_bias`).

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
        balance_bias: bool = False,
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
        self.selection_bias: Tensor | None
        if balance_bias:  # DeepSeek-V3 balancing: a bias on the routed heads' top-k choice
            self.register_buffer("selection_bias", torch.zeros(num_heads - num_shared))
        else:
            self.selection_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for gate in (self.routed_gate, self.shared_gate, self.type_gate):
            if gate is not None:
                gate.reset_parameters()

    @torch.no_grad()
    def reset_to_uniform(self, spread: float = 1e-2) -> None:
        """Routing that starts (near) uniform. The shared and two-stage gates are zeroed.
        With ``top_k`` equal to all routed heads the routed gate is zeroed too: every gate
        is then exactly 1 (dense multi-head attention). With fewer heads on, exactly
        uniform logits would send every token to the same heads (top-k breaks ties by
        index), so the routed gate is re-initialised and scaled by ``spread`` instead:
        each token picks its own heads, and its gates stay within about ``spread`` of 1."""
        if not spread > 0:
            raise ValueError(f"MoHRouter.reset_to_uniform: spread must be > 0, got {spread}")
        for gate in (self.shared_gate, self.type_gate):
            if gate is not None:
                gate.weight.zero_()
        if self.routed_gate is not None:
            if self.top_k < self.num_routed:
                self.routed_gate.reset_parameters()
                self.routed_gate.weight.mul_(spread)
            else:
                self.routed_gate.weight.zero_()

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
        self,
        x: Tensor,
        *,
        queries: Tensor | None = None,
        head_states: Tensor | None = None,
        padding_mask: Tensor | None = None,
        token_mask: Tensor | None = None,  # deprecated: padding_mask
    ) -> RoutingOutput:
        """Routing for router input x (b, t, d); ``queries`` (b, t, h, e) for the
        parameter-free router; ``padding_mask`` (b, t) True at padding, which the
        load-balance loss skips (``token_mask``, True at real tokens, is deprecated)."""
        padding_mask = padding_from_token_mask(
            "MoHRouter", token_mask, padding_mask, stacklevel=FORWARD_STACKLEVEL
        )
        if head_states is not None:
            raise ValueError("MoHRouter: head_states is only used by the graph-router")
        if x.size(-1) != self.d_model:
            raise ValueError(f"MoHRouter: input width {x.size(-1)} != d_model ({self.d_model})")
        weights = [
            None if self.routed_gate is None else self.routed_gate.weight,
            None if self.shared_gate is None else self.shared_gate.weight,
            None if self.type_gate is None else self.type_gate.weight,
        ]
        present = next((w for w in weights if w is not None), None)
        with router_precision(x, present) as x:  # fp32 routing under autocast
            routed_logits, shared_logits, type_logits = split_linear(x, weights)  # one GEMM
            if self.parameter_free or routed_logits is None:
                if queries is not None:
                    queries = queries.to(x.dtype)
                routed_logits = self.routed_logits(x, queries)
            return moh_gates(
                routed_logits,
                shared_logits,
                type_logits,
                num_shared=self.num_shared,
                top_k=self.top_k,
                gate_convention=self.gate_convention,
                hard_gates=self.hard_gates,
                padding_mask=padding_mask,
                selection_bias=self.selection_bias,
            )


class MoHAttention(RoutedAttention):
    """Mixture-of-Head attention: :class:`MultiHeadAttention` plus a :class:`MoHRouter`
    (``self.router``). Returns :class:`~graphheads.types.AttentionOutput` whose
    ``routing`` is the block's :class:`RoutingOutput`.

    Args:
        d_model: model width.
        num_heads: heads H.
        num_shared: always-on heads (the first ``num_shared``).
        top_k: routed heads per token.
        dropout: dropout on the attention weights.
        bias: whether the projections have a bias.
        fused_attention: use PyTorch's fused attention kernel.
        gate_convention: "reference" or "paper" (see :class:`MoHRouter`).
        hard_gates: 0/1 gates with a straight-through estimator.
        parameter_free: the MoH-LLaMA3 router (see :class:`MoHRouter`).
        balance_bias: the router keeps a top-k selection bias for balancing without an
            auxiliary loss (:func:`~graphheads.gates.update_balance_bias`).
        sparse_backend: "auto" (default), "chunked" or "flex" (see
            :class:`~graphheads.routed.RoutedAttention`).
        execution: "auto" (default), "dense" or "sparse" (see
            :class:`~graphheads.routed.RoutedAttention`).
        sparse_chunk_rows: rows per routed head per chunk on the sparse path (see
            :class:`~graphheads.routed.RoutedAttention`).
        num_kv_heads: key/value heads, as in
            :class:`~graphheads.attention.MultiHeadAttention`.
        rotary: rotary embeddings, as in :class:`~graphheads.attention.MultiHeadAttention`.
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
        fused_attention: bool = True,
        gate_convention: GateConvention = "reference",
        hard_gates: bool = False,
        parameter_free: bool = False,
        balance_bias: bool = False,
        execution: Execution = "auto",
        sparse_backend: SparseBackendChoice = "auto",
        sparse_chunk_rows: int = 64,
        num_kv_heads: int | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        router = MoHRouter(
            d_model,
            num_heads,
            num_shared,
            top_k,
            gate_convention=gate_convention,
            hard_gates=hard_gates,
            parameter_free=parameter_free,
            balance_bias=balance_bias,
        )
        super().__init__(
            d_model,
            num_heads,
            router=router,
            dropout=dropout,
            bias=bias,
            fused_attention=fused_attention,
            execution=execution,
            sparse_backend=sparse_backend,
            sparse_chunk_rows=sparse_chunk_rows,
            num_kv_heads=num_kv_heads,
            rotary=rotary,
        )

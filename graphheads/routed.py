r"""Routed attention: multi-head attention whose head outputs are scaled by a router's
gates before the output projection. Both routers use it: MoH's linear router
(:mod:`graphheads.moh`) and the graph-router (:mod:`graphheads.goh`).

Data flows one way::

    x -> router(x) -> gates (b, t, h) -> heads (b, h, t, e) * gates -> out_proj

Three execution paths give equal outputs (and, under autograd, gradients) up to
rounding: ``"dense"`` computes every head and multiplies by the gates (static shapes:
``torch.compile``, DDP, FSDP); ``"sparse"`` computes only the active (token, head) pairs
(:func:`graphheads.sparse.sparse_routed_attention`); ``"decode"``, for one-token
inference steps (decoding with a cache), reads only the active heads' caches
(:func:`graphheads.sparse.routed_decode_attention`). Which one a call runs, and why, is
:func:`graphheads.execution.choose_execution`'s choice from the module's ``execution``
setting (``"auto"``, the default, runs dense except for one-token inference steps where
routed decoding pays: compiled, with a cache large enough).

Shape legend: b batch, t query tokens, s key tokens, h heads, e head width, d model width.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from graphheads.attention import MultiHeadAttention
from graphheads.compat import FORWARD_STACKLEVEL, padding_from_token_mask
from graphheads.execution import (
    EXECUTIONS,
    SPARSE_BACKENDS,
    Execution,
    ExecutionChoice,
    SparseBackendChoice,
    choose_execution,
    takes_sparse_path,
)
from graphheads.rotary import RotaryEmbedding
from graphheads.sparse import routed_decode_attention, sparse_routed_attention
from graphheads.types import AttentionOutput, KVCache, RoutingOutput

__all__ = ["Execution", "RoutedAttention", "Router", "SparseBackendChoice"]


class Router(Protocol):
    """What :class:`RoutedAttention` needs of a router (:class:`~graphheads.moh.MoHRouter`,
    :class:`~graphheads.goh.GraphRouter`). ``queries`` (b, t, h, e) are every head's
    projected queries; on the sparse path, which projects only the active heads'
    queries, they are ``None`` unless the router's ``parameter_free`` attribute is true
    (or the attention has rotary positions)."""

    num_heads: int

    def __call__(
        self,
        x: Tensor,
        *,
        queries: Tensor | None = None,
        head_states: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> RoutingOutput: ...


class RoutedAttention(MultiHeadAttention):
    """Multi-head attention whose head outputs are scaled by a router's gates before
    ``out_proj``. The router is any module with ``num_heads`` and ``forward(x, *,
    queries, head_states, padding_mask) -> RoutingOutput`` (a router written for 0.3,
    whose forward takes ``token_mask``, True at real tokens, still works for one release,
    with a DeprecationWarning when the attention is built).

    Projections keep the :class:`~graphheads.attention.MultiHeadAttention` names
    (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``). Routing of token t reads only
    token t (the query input), so causal models stay causal and decoding with a cache
    routes as a full pass does.

    Args:
        d_model: model width.
        num_heads: heads H; must equal ``router.num_heads``.
        router: the router.
        dropout: dropout on the attention weights.
        bias: whether the projections have a bias.
        fused_attention: use PyTorch's fused SDPA kernel.
        execution: ``"auto"`` (default), ``"dense"`` or ``"sparse"`` (see the module
            docstring).
        sparse_backend: how ``"sparse"`` execution attends with the routed heads:
            ``"auto"`` (default: FlexAttention on CUDA, the chunked path elsewhere; see
            :func:`~graphheads.flex.choose_sparse_backend`), ``"flex"`` or ``"chunked"``
            (see :func:`~graphheads.sparse.sparse_routed_attention`).
        sparse_chunk_rows: rows per routed head per chunk on the sparse path.
        num_kv_heads: key/value heads (grouped-query attention), as in
            :class:`~graphheads.attention.MultiHeadAttention`; routing is over query heads.
        rotary: rotary position embeddings, as in
            :class:`~graphheads.attention.MultiHeadAttention`.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        router: nn.Module,
        dropout: float = 0.0,
        bias: bool = True,
        fused_attention: bool = True,
        execution: Execution = "auto",
        sparse_backend: SparseBackendChoice = "auto",
        sparse_chunk_rows: int = 64,
        num_kv_heads: int | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__(
            d_model,
            num_heads,
            dropout=dropout,
            bias=bias,
            fused_attention=fused_attention,
            num_kv_heads=num_kv_heads,
            rotary=rotary,
        )
        name = type(self).__name__
        if execution not in EXECUTIONS:
            raise ValueError(
                f"{name}: execution must be 'auto', 'dense' or 'sparse', got {execution!r}"
            )
        if sparse_backend not in SPARSE_BACKENDS:
            raise ValueError(
                f"{name}: sparse_backend must be 'auto', 'chunked' or 'flex', "
                f"got {sparse_backend!r}"
            )
        if sparse_chunk_rows < 1:
            raise ValueError(f"{name}: sparse_chunk_rows must be >= 1, got {sparse_chunk_rows}")
        if getattr(router, "num_heads", None) != num_heads:
            raise ValueError(
                f"{name}: router has {getattr(router, 'num_heads', None)} heads, "
                f"attention has num_heads={num_heads}"
            )
        self.execution: Execution = execution
        self.sparse_backend: SparseBackendChoice = sparse_backend
        self.sparse_chunk_rows = sparse_chunk_rows
        self.router = router
        self._protocol: tuple[object, bool] = (None, False)  # (router, takes token_mask)
        self._router_takes_token_mask()  # warns now, when built with an old router

    def _router_takes_token_mask(self) -> bool:
        """Whether ``self.router`` follows the 0.3 protocol (its forward takes
        ``token_mask``, True at real tokens, and not ``padding_mask``); looked up again
        when the router is replaced, with a DeprecationWarning for an old one."""
        router = self.router
        if self._protocol[0] is not router:
            old = _takes_token_mask(router)
            self._protocol = (router, old)
            if old:
                warnings.warn(
                    f"{type(self).__name__}: {type(router).__name__}.forward takes "
                    "token_mask= (True at real tokens), which is deprecated and will be "
                    "removed in the next release; take padding_mask= (True at padding, as "
                    "key_padding_mask)",
                    DeprecationWarning,
                    stacklevel=3,
                )
        return self._protocol[1]

    @property
    def merged_masks(self) -> bool:
        """Whether a stack should hand this module its masks merged into one bias (the
        dense kernels want that); the sparse path reads the padding mask per sequence and
        keeps the causal limit itself, so it takes the masks as they are."""
        return self.execution != "sparse"

    def choose_execution(self, query: Tensor, key: Tensor, num_active: int) -> ExecutionChoice:
        """The path a call with these query inputs (b, t, d), keys (b, h_kv, s, e, cache
        included) and active heads per token takes now, and why
        (:func:`graphheads.execution.choose_execution`)."""
        return choose_execution(
            self.execution,
            query_len=query.size(1),
            grad=torch.is_grad_enabled(),
            dropout_p=self.dropout if self.training else 0.0,
            key=key,
            num_active=num_active,
            sparse_backend=self.sparse_backend,
        )

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
        memory_kv: KVCache | None = None,
        head_states: Tensor | None = None,
        padding_mask: Tensor | None = None,
        router_context: Tensor | None = None,
        token_mask: Tensor | None = None,  # deprecated: padding_mask
    ) -> AttentionOutput:
        """As :meth:`MultiHeadAttention.forward`, plus ``head_states`` (the previous
        layer's graph-router states, GoH with carry only), ``padding_mask`` (b, t): True
        at padding query tokens, which the load-balance loss skips (``token_mask``, True
        at real tokens, is deprecated), and ``router_context`` (b, d): added to every
        token's router input (not to the attention's), e.g. a task embedding for
        task-conditioned routing. The path (dense, sparse or routed decoding) is
        :meth:`choose_execution`'s."""
        padding_mask = padding_from_token_mask(
            type(self).__name__, token_mask, padding_mask, stacklevel=FORWARD_STACKLEVEL
        )
        key, value = self.resolve_inputs(query, key, value)
        sparse = takes_sparse_path(
            self.execution,
            query_len=query.size(1),
            grad=torch.is_grad_enabled(),
            dropout_p=self.dropout if self.training else 0.0,
        )
        q = None  # every head's queries; the sparse path makes only the active ones
        if not sparse or self.rotary is not None or getattr(self.router, "parameter_free", False):
            q = self.project_query(query, kv_cache)
        router_input = query
        if router_context is not None:
            if router_context.shape != (query.size(0), query.size(-1)):
                raise ValueError(
                    f"{type(self).__name__}: router_context must be (batch, d_model) = "
                    f"{(query.size(0), query.size(-1))}, got {tuple(router_context.shape)}"
                )
            router_input = query + router_context.unsqueeze(1).to(query.dtype)
        routing: RoutingOutput = self.router(
            router_input,
            queries=None if q is None else q.transpose(1, 2),
            head_states=head_states,
            **(
                {"token_mask": None if padding_mask is None else ~padding_mask.bool()}
                if self._router_takes_token_mask()
                else {"padding_mask": padding_mask}
            ),
        )
        kv = self.keys_values(key, value, kv_cache, memory_kv)
        cache = kv if use_cache else None
        num_active = routing.num_shared + routing.top_k_indices.size(-1)
        choice = self.choose_execution(query, kv.key, num_active)
        if choice.path == "dense":
            assert q is not None
            heads = self.attend(
                q, kv, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal
            )
            gates = routing.gates.transpose(1, 2).unsqueeze(-1).to(heads.dtype)
            output = self.out_proj(self.merge_heads(heads * gates))  # (b, h, t, e) gated
            return AttentionOutput(output, routing, cache)
        bias = None
        if attn_mask is not None or key_padding_mask is not None:
            bias = self.attention_bias(
                query,
                key_len=kv.key.size(-2),
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                is_causal=False,  # the causal part stays a flag (a key limit per chunk)
            )
        weights: dict[str, Any] = {  # the projections both kernels take as tensors
            "q_weight": self.q_proj.weight,
            "q_bias": self.q_proj.bias,
            "out_weight": self.out_proj.weight,
            "out_bias": self.out_proj.bias,
        }
        if choice.path == "decode":  # one token with a causal cache sees every key
            output = routed_decode_attention(
                query,
                kv.key,
                kv.value,
                routing.gates,
                routing.active_head_indices,
                **weights,
                attn_bias=bias,
                queries=q,
                fused_attention=self.fused_attention,
            )
            return AttentionOutput(output, routing, cache)
        keys, values = self.expand_kv(kv)  # (b, h, s, e)
        output = sparse_routed_attention(
            query,
            keys,
            values,
            routing.gates,
            routing.routed_mask,
            **weights,
            attn_bias=bias,
            is_causal=is_causal and query.size(1) > 1,
            dropout_p=self.dropout if self.training else 0.0,
            fused_attention=self.fused_attention,
            queries=q,  # rotated, with rotary: the sparse path then gathers them
            chunk_rows=self.sparse_chunk_rows,
            backend=choice.backend or "chunked",
        )
        return AttentionOutput(output, routing, cache)


def _takes_token_mask(router: object) -> bool:
    """Whether a router's forward takes ``token_mask`` and not ``padding_mask`` (the 0.3
    protocol). A compiled module is looked through; a forward taking ``**kwargs``, or one
    whose signature cannot be read, gets ``padding_mask``."""
    target: Any = getattr(router, "_orig_mod", router)
    try:
        params = inspect.signature(getattr(target, "forward", target)).parameters
    except (TypeError, ValueError):
        return False
    return "token_mask" in params and "padding_mask" not in params

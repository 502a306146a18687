r"""The Graph-of-Heads router: message passing over the head graph before MoH top-k.

Per token with router input x (the attention's query input)::

    l  = x W_l                                     # linear_gate: MoH's router logits
    Z0 = reshape((x A) B, [H, F]) + E  (+ carry(Z_prev))  # node features, E head embeddings
    Z  = Z + act(conv_l(Z, edge_index, edge_weight))      # l = 1..L, over the head graph
    s  = l + alpha * (Z u) + b                     # alpha: graph_scale, zero at init
    routed logits = s[h_s:], shared logits = s[:h_s], two-stage logits = x W_h
    -> the MoH gate of graphheads.gates

The graph branch enters through a learnable per-head scale ``alpha`` initialised at zero
(ReZero-style): at initialisation the router computes exactly the logits of a linear
MoH router with the same ``W_l`` and ``W_h`` (:meth:`GraphRouter.copy_from_moh`), and
the graph earns its influence through training. The node features come from an F-wide
token summary ``x A`` (``in_proj``, d -> F) mapped to every head by ``B``
(``head_proj``, F -> H F): the input projection has rank F, which costs ``d F + H F^2``
per token instead of ``d H F``.

With ``graph_layers=0`` this is a linear router (scores ``x W_l + alpha (x A B + E) u``).
``Z_prev`` are the previous layer's final head states (``carry_head_states``): an edge
from head i at layer l to head i at layer l + 1, so routing signals also travel through
depth.

Shape legend: b batch, t tokens, h heads, f node features, d model width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphheads.compat import FORWARD_STACKLEVEL, padding_from_token_mask, renamed_argument
from graphheads.execution import Execution, SparseBackendChoice
from graphheads.gates import (
    GateConvention,
    apply_balance_step,
    check_routing_config,
    moh_gates,
    router_precision,
    split_linear,
)
from graphheads.gnn import ConvFactory, HeadMessagePassing
from graphheads.graph import HeadGraph
from graphheads.moh import MoHRouter
from graphheads.rotary import RotaryEmbedding
from graphheads.routed import RoutedAttention
from graphheads.types import RoutingOutput

__all__ = ["GoHAttention", "GraphRouter", "collect_head_graphs", "record_routing", "routers_of"]


class GraphRouter(nn.Module):
    r"""Routes tokens to heads with linear logits plus scores refined by message passing
    over a head graph (see the module docstring for the update rule).

    Args:
        d_model: width of the router input x.
        num_heads: heads H (the graph's nodes).
        num_shared: always-on heads (the first ``num_shared``).
        top_k: routed heads per token.
        graph: the :class:`~graphheads.graph.HeadGraph` (default: complete graph with
            learnable edge weights). Its ``num_heads`` must equal ``num_heads``.
        feature_dim: node feature width F (default 16).
        graph_layers: message-passing layers L (default 2; ``ModelConfig.graph_layers``).
        conv: layer name or factory (see :class:`~graphheads.gnn.HeadMessagePassing`).
        carry_head_states: accept the previous layer's head states in ``forward``.
        gate_convention: "reference" or "paper" (see :class:`~graphheads.moh.MoHRouter`).
        hard_gates: 0/1 gates with a straight-through estimator.
        graph_scale_init: initial ``alpha`` of every head (default 0: the router starts
            as a linear MoH router).
        balance_bias: keep a top-k selection bias (buffer ``selection_bias``) for
            balancing without an auxiliary loss (:func:`~graphheads.gates.update_balance_bias`).

    Submodules: ``linear_gate`` (W_l, d -> H), ``in_proj`` (A, d -> F), ``head_proj``
    (B, F -> H F), ``head_embedding`` (E, H x F), ``message_passing``, ``score``
    (u, F -> 1), ``graph_scale`` (alpha, H), ``score_bias`` (a prior per head; zero at
    init), ``type_gate`` (W_h, d -> 2, only with shared and routed heads), ``carry_proj``
    (F -> F, with ``carry_head_states``), ``graph``.

    Shapes: x (b, t, d), head_states (b, t, h, F) -> :class:`RoutingOutput` whose
    ``head_states`` are the final node states Z (b, t, h, F).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_shared: int,
        top_k: int,
        graph: HeadGraph | None = None,
        *,
        feature_dim: int = 16,
        graph_layers: int | None = None,
        conv: str | ConvFactory = "gcn",
        carry_head_states: bool = False,
        gate_convention: GateConvention = "reference",
        hard_gates: bool = False,
        graph_scale_init: float = 0.0,
        balance_bias: bool = False,
        num_layers: int | None = None,  # deprecated: graph_layers
    ) -> None:
        super().__init__()
        check_routing_config(type(self).__name__, num_heads, num_shared, top_k)
        graph_layers = renamed_argument(
            "GraphRouter", "num_layers", num_layers, "graph_layers", graph_layers
        )
        graph_layers = 2 if graph_layers is None else graph_layers
        graph = graph if graph is not None else HeadGraph.complete(num_heads, learnable="edge")
        if graph.num_heads != num_heads:
            raise ValueError(
                f"GraphRouter: graph has {graph.num_heads} heads, attention has "
                f"num_heads={num_heads}"
            )
        if graph.num_shared is not None and graph.num_shared != num_shared:
            raise ValueError(
                f"GraphRouter: graph marks {graph.num_shared} shared heads, router has "
                f"num_shared={num_shared}"
            )
        if feature_dim < 1:
            raise ValueError(f"GraphRouter: feature_dim must be >= 1, got {feature_dim}")
        if gate_convention not in ("reference", "paper"):
            raise ValueError(
                f"GraphRouter: gate_convention must be 'reference' or 'paper', "
                f"got {gate_convention!r}"
            )
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_shared = num_shared
        self.top_k = top_k
        self.feature_dim = feature_dim
        self.gate_convention: GateConvention = gate_convention
        self.hard_gates = hard_gates
        self.graph_scale_init = float(graph_scale_init)
        self.graph = graph
        self.linear_gate = nn.Linear(d_model, num_heads, bias=False)
        self.in_proj = nn.Linear(d_model, feature_dim, bias=False)
        self.head_proj = nn.Linear(feature_dim, num_heads * feature_dim, bias=False)
        self.head_embedding = nn.Parameter(torch.empty(num_heads, feature_dim))
        self.message_passing = HeadMessagePassing(feature_dim, graph_layers, conv=conv)
        self.score = nn.Linear(feature_dim, 1, bias=False)
        self.graph_scale = nn.Parameter(torch.empty(num_heads))
        self.score_bias = nn.Parameter(torch.zeros(num_heads))
        has_both = num_shared > 0 and num_heads - num_shared > 0
        self.type_gate = nn.Linear(d_model, 2, bias=False) if has_both else None
        self.carry_proj = (
            nn.Linear(feature_dim, feature_dim, bias=False) if carry_head_states else None
        )
        self.selection_bias: Tensor | None
        if balance_bias:  # DeepSeek-V3 balancing: a bias on the routed heads' top-k choice
            self.register_buffer("selection_bias", torch.zeros(num_heads - num_shared))
        else:
            self.selection_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.linear_gate, self.in_proj, self.head_proj, self.score):
            linear.reset_parameters()
        nn.init.normal_(self.head_embedding, std=0.02)
        nn.init.constant_(self.graph_scale, self.graph_scale_init)
        nn.init.zeros_(self.score_bias)
        if self.type_gate is not None:
            self.type_gate.reset_parameters()
        if self.carry_proj is not None:
            nn.init.zeros_(self.carry_proj.weight)  # starts as a router without carry

    @classmethod
    def starting_uniform(
        cls,
        d_model: int,
        num_heads: int,
        num_shared: int,
        top_k: int,
        graph: HeadGraph | None = None,
        *,
        prior_step: float = 0.01,
        **kwargs: Any,
    ) -> GraphRouter:
        """A router for the heads of a pretrained model: uniform routing
        (:meth:`reset_to_uniform`), so with every head on the model computes what it did
        before; with fewer heads on, router head i starts with the score prior
        ``-i * prior_step`` (gates near 1, the lowest router indices preferred).
        ``kwargs`` go to the constructor."""
        router = cls(d_model, num_heads, num_shared, top_k, graph, **kwargs)
        router.reset_to_uniform()
        if top_k < num_heads - num_shared:
            with torch.no_grad():
                router.score_bias.copy_(-prior_step * torch.arange(num_heads, dtype=torch.float32))
        return router

    @torch.no_grad()
    def reset_to_uniform(self) -> None:
        """Zero the linear logits, the graph scale, the prior and the two-stage weights:
        every token then routes uniformly, and with ``top_k`` equal to all routed heads
        every gate is exactly 1, so the attention equals dense multi-head attention.
        Training moves on from there (the linear gate and the graph scale still receive
        gradients)."""
        self.linear_gate.weight.zero_()
        self.graph_scale.zero_()
        self.score_bias.zero_()
        if self.type_gate is not None:
            self.type_gate.weight.zero_()

    @torch.no_grad()
    def copy_from_moh(self, router: MoHRouter) -> None:
        """Take a learned :class:`~graphheads.moh.MoHRouter`'s weights and gate settings:
        its routed (and shared) gate rows become ``linear_gate``, its two-stage gate
        ``type_gate``. With the graph scale at zero this router then computes that
        router's routing (up to float rounding)."""
        name = type(self).__name__
        if router.parameter_free:
            raise ValueError(f"{name}.copy_from_moh: a parameter-free MoHRouter has no weights")
        if (router.d_model, router.num_heads, router.num_shared, router.top_k) != (
            self.d_model,
            self.num_heads,
            self.num_shared,
            self.top_k,
        ):
            raise ValueError(
                f"{name}.copy_from_moh: MoHRouter has (d_model, num_heads, num_shared, "
                f"top_k) = {(router.d_model, router.num_heads, router.num_shared, router.top_k)}"
                f", this router {(self.d_model, self.num_heads, self.num_shared, self.top_k)}"
            )
        h_s = self.num_shared
        self.linear_gate.weight.zero_()
        if router.routed_gate is not None:
            self.linear_gate.weight[h_s:] = router.routed_gate.weight
        if router.shared_gate is not None:
            self.linear_gate.weight[:h_s] = router.shared_gate.weight
        if router.type_gate is not None and self.type_gate is not None:
            self.type_gate.weight.copy_(router.type_gate.weight)
        self.gate_convention = router.gate_convention
        self.hard_gates = router.hard_gates

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_shared={self.num_shared}, top_k={self.top_k}, "
            f"feature_dim={self.feature_dim}, graph_layers={len(self.message_passing.layers)}"
        )

    def _scores(
        self, x: Tensor, head_states: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Head scores (b, t, h), final node states (b, t, h, F) and two-stage logits
        (b, t, 2) or ``None``."""
        if x.size(-1) != self.d_model:
            raise ValueError(f"GraphRouter: input width {x.size(-1)} != d_model ({self.d_model})")
        linear, summary, type_logits = split_linear(  # every projection of x in one GEMM
            x,
            [
                self.linear_gate.weight,
                self.in_proj.weight,
                None if self.type_gate is None else self.type_gate.weight,
            ],
        )
        assert linear is not None and summary is not None
        z = F.linear(summary, self.head_proj.weight, self.head_embedding.flatten())
        # (b, t, h, F) laid out head-major in memory: HeadGCNConv then propagates and
        # transforms with plain GEMMs and no copies (see HeadGCNConv.message_and_aggregate)
        z = z.unflatten(-1, (self.num_heads, self.feature_dim)).movedim(-2, 0).contiguous()
        z = z.movedim(0, -2)
        if head_states is not None:
            if self.carry_proj is None:
                raise ValueError(
                    "GraphRouter: got head_states but was built with carry_head_states=False"
                )
            if head_states.shape != z.shape:
                raise ValueError(
                    f"GraphRouter: head_states has shape {tuple(head_states.shape)}, "
                    f"expected {tuple(z.shape)}"
                )
            z = z + self.carry_proj(head_states)
        adj_t = self.graph.gcn_propagation() if self.message_passing.uses_gcn_propagation else None
        z = self.message_passing(z, self.graph.edge_index, self.graph.edge_weight, adj_t=adj_t)
        # readout on the (h, b, t, F) view too: a copy here would also hand the layers'
        # backward gradients in the other layout (slow mixed-stride element-wise kernels)
        graph_scores = self.score(z.movedim(-2, 0)).squeeze(-1).movedim(0, -1)  # (b, t, h)
        scores = linear + self.graph_scale * graph_scores + self.score_bias  # (b, t, h)
        return scores, z, type_logits

    def head_scores(self, x: Tensor, head_states: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Scores (b, t, h) and final node states (b, t, h, F) for router input x."""
        scores, z, _ = self._scores(x, head_states)
        return scores, z

    def forward(
        self,
        x: Tensor,
        *,
        queries: Tensor | None = None,
        head_states: Tensor | None = None,
        padding_mask: Tensor | None = None,
        token_mask: Tensor | None = None,  # deprecated: padding_mask
    ) -> RoutingOutput:
        """Routing for router input x (b, t, d); ``head_states`` (b, t, h, F) from the
        previous layer (carry only); ``padding_mask`` (b, t) True at padding, which the
        load-balance loss skips (``token_mask``, True at real tokens, is deprecated).
        ``queries`` is unused (interface of the routers)."""
        padding_mask = padding_from_token_mask(
            "GraphRouter", token_mask, padding_mask, stacklevel=FORWARD_STACKLEVEL
        )
        h_s = self.num_shared
        with router_precision(x, self.linear_gate.weight) as x:  # fp32 under autocast
            if head_states is not None:
                head_states = head_states.to(x.dtype)
            scores, z, type_logits = self._scores(x, head_states)
            routing = moh_gates(
                scores[..., h_s:],
                scores[..., :h_s] if h_s > 1 else None,
                type_logits,
                num_shared=h_s,
                top_k=self.top_k,
                gate_convention=self.gate_convention,
                hard_gates=self.hard_gates,
                padding_mask=padding_mask,
                selection_bias=self.selection_bias,
            )
        return dataclasses.replace(routing, head_states=z)


class GoHAttention(RoutedAttention):
    """Graph-of-Heads attention: :class:`~graphheads.attention.MultiHeadAttention`
    projections plus a :class:`GraphRouter` (``self.router``); gates scale each head's
    output before ``out_proj``. Returns :class:`~graphheads.types.AttentionOutput`.

    Keyword arguments other than ``dropout``, ``bias``, ``fused_attention``,
    ``execution``, ``sparse_backend``, ``sparse_chunk_rows``, ``num_kv_heads`` and
    ``rotary`` (see :class:`~graphheads.routed.RoutedAttention`) go to
    :class:`GraphRouter`. ``num_layers`` is the deprecated name of ``graph_layers``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_shared: int,
        top_k: int,
        graph: HeadGraph | None = None,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        fused_attention: bool = True,
        feature_dim: int = 16,
        graph_layers: int | None = None,
        conv: str | ConvFactory = "gcn",
        carry_head_states: bool = False,
        gate_convention: GateConvention = "reference",
        hard_gates: bool = False,
        graph_scale_init: float = 0.0,
        balance_bias: bool = False,
        execution: Execution = "auto",
        sparse_backend: SparseBackendChoice = "auto",
        sparse_chunk_rows: int = 64,
        num_kv_heads: int | None = None,
        rotary: RotaryEmbedding | None = None,
        num_layers: int | None = None,  # deprecated: graph_layers
    ) -> None:
        graph_layers = renamed_argument(
            "GoHAttention", "num_layers", num_layers, "graph_layers", graph_layers
        )
        router = GraphRouter(
            d_model,
            num_heads,
            num_shared,
            top_k,
            graph,
            feature_dim=feature_dim,
            graph_layers=graph_layers,
            conv=conv,
            carry_head_states=carry_head_states,
            gate_convention=gate_convention,
            hard_gates=hard_gates,
            graph_scale_init=graph_scale_init,
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


def routers_of(model: nn.Module) -> list[MoHRouter | GraphRouter]:
    """Every router (:class:`~graphheads.moh.MoHRouter`, :class:`GraphRouter`) in
    ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoHRouter | GraphRouter)]


def update_routing_balance(model: nn.Module, head_counts: Sequence[Tensor], rate: float) -> None:
    """After an optimiser step: move the selection bias of every router of ``model`` that
    keeps one (``balance_bias``) towards balance (:func:`~graphheads.gates.apply_balance_step`),
    from that step's counts (r + 1,) of :func:`~graphheads.gates.routed_head_counts`, one
    per router in module order (``ModelOutput.routing`` order). Under several processes,
    all-reduce the counts first (a sum): every rank then takes the same step and the
    biases stay equal."""
    routers = [r for r in routers_of(model) if r.selection_bias is not None]
    if len(routers) != len(head_counts):
        raise ValueError(
            f"update_routing_balance: {len(head_counts)} head counts for {len(routers)} routers"
        )
    for router, counts in zip(routers, head_counts, strict=True):
        assert router.selection_bias is not None
        apply_balance_step(router.selection_bias, counts, rate)


@contextmanager
def record_routing(model: nn.Module) -> Iterator[list[RoutingOutput]]:
    """Collect the :class:`~graphheads.types.RoutingOutput` of every router in ``model``
    during the forward passes inside the ``with`` block, in call order (forward hooks,
    removed on exit; nothing is stored on the modules)::

        with record_routing(model) as routing:
            out = model(**batch)
        aux = sum(r.load_balance_loss for r in routing) / len(routing)
    """
    records: list[RoutingOutput] = []

    def hook(_module: nn.Module, _inputs: Any, output: RoutingOutput) -> None:
        records.append(output)

    handles = [router.register_forward_hook(hook) for router in routers_of(model)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def collect_head_graphs(model: nn.Module) -> list[HeadGraph]:
    """The head graph of every graph-router in ``model``, in module order (the same
    object repeats when layers share one graph)."""
    return [m.graph for m in model.modules() if isinstance(m, GraphRouter)]

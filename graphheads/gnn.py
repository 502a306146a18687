r"""Message passing over the heads of a layer.

Node features live in tensors shaped ``(..., h, f)``: any leading axes (batch, tokens)
are carried along, and a PyTorch Geometric ``MessagePassing`` layer built with
``node_dim=-2`` propagates over the head axis with one ``edge_index`` for all tokens.

:class:`HeadMessagePassing` applies ``L`` residual layers

.. math::
    Z \leftarrow Z + \sigma(\mathrm{conv}_l(Z, \mathcal{E}, w)), \quad l = 1, \dots, L

The default layer is :class:`HeadGCNConv`, the GCN of Kipf & Welling 2017 as PyG's
``GCNConv`` computes it, whose fast dense propagation is its own
``message_and_aggregate`` (as ``GCNConv`` has one for sparse adjacency): the
normalised (h, h) matrix P is built once per forward, the features are propagated by P,
then transformed by one (N h, f) x (f, f) GEMM (``(P Z) W^T = P (Z W^T)``). Per token
that is ``h f^2 + h^2 f`` multiply-adds, not the ``(h f)^2`` of one Kronecker GEMM.
Any other PyG layer works through ``propagate``.

Shape legend: h heads, f features, E edges, N leading positions (batch x tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from graphheads.compat import renamed_argument

__all__ = ["HeadGCNConv", "HeadMessagePassing", "gcn_norm_dense", "make_conv"]

CONVS = ("gcn", "gatv2", "lightgcn", "graphconv")  # make_conv's layer names
ConvFactory = Callable[[int], MessagePassing]
Propagation = Literal["dense", "edges"]


def gcn_norm_dense(edge_index: Tensor, edge_weight: Tensor | None, num_nodes: int) -> Tensor:
    r"""The (h, h) propagation matrix of GCN: ``P[i, j]`` is the weight of the message
    from head j to head i, :math:`\hat{D}^{-1/2} (A^\top + I) \hat{D}^{-1/2}` with
    :math:`\hat{D}_{ii} = \sum_j (A^\top + I)_{ij}`.

    Matches PyG's ``gcn_norm`` with ``add_self_loops=True`` on a coalesced graph (every
    :class:`~graphheads.graph.HeadGraph` is): a head that already has a self-loop keeps
    its weight, every other head gets a self-loop of weight 1.
    """
    src, dst = edge_index[0], edge_index[1]
    if edge_weight is None:
        edge_weight = torch.ones(src.numel(), device=edge_index.device)
    # 1 on the diagonal of every head without a self-loop (PyG's add_remaining_self_loops)
    is_loop = (src == dst).to(edge_weight.dtype)  # static shapes: no boolean indexing
    has_loop = is_loop.new_zeros(num_nodes).index_add(0, src, is_loop)
    loops = (has_loop == 0).to(edge_weight.dtype)
    incoming = torch.diag(loops).index_put((dst, src), edge_weight, accumulate=True)  # [i, j]
    deg = incoming.sum(dim=1)  # in-degree with self-loops
    inv_sqrt = deg.pow(-0.5).masked_fill(deg == 0, 0.0)
    return inv_sqrt[:, None] * incoming * inv_sqrt[None, :]


class HeadGCNConv(MessagePassing):
    r"""The graph convolution of Kipf & Welling 2017 ("Semi-Supervised Classification
    with Graph Convolutional Networks", https://arxiv.org/abs/1609.02907) over the head
    axis, equal to PyG's ``GCNConv(in_channels, out_channels, node_dim=-2)``:

    .. math::
        Z' = \hat{D}^{-1/2} (A^\top + I) \hat{D}^{-1/2} Z \Theta^\top + b

    Args:
        in_channels: input feature width.
        out_channels: output feature width.
        bias: add a learnable bias (default ``True``).
        propagation: ``"dense"`` (default) propagates with the (h, h) matrix in
            :meth:`message_and_aggregate`; ``"edges"`` runs PyG's ``propagate`` over the
            edge list (the reference; same numbers, slower on small graphs).

    The normalisation is recomputed at every call (edge weights may be learnable) unless
    the caller passes it as ``adj_t``.
    Parameter names (``lin.weight``, ``bias``) are ``GCNConv``'s, so its state dict loads.

    Shapes: x (..., h, in_channels), edge_index (2, E), edge_weight (E,) ->
    (..., h, out_channels).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bias: bool = True,
        propagation: Propagation = "dense",
    ) -> None:
        super().__init__(aggr="add", node_dim=-2)
        if propagation not in ("dense", "edges"):
            raise ValueError(
                f"HeadGCNConv: propagation must be 'dense' or 'edges', got {propagation!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.propagation: Propagation = propagation
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.xavier_uniform_(self.lin.weight)  # glorot, as GCNConv
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_weight: Tensor | None = None,
        *,
        adj_t: Tensor | None = None,
    ) -> Tensor:
        """``adj_t``: the graph's normalised (h, h) matrix (:func:`gcn_norm_dense`), when
        the caller already has it (:class:`HeadMessagePassing` builds it once for all its
        dense layers); dense propagation only."""
        num_nodes = x.size(-2)
        # P (Z W^T) + b computed as (P Z) W^T + b: the propagation, then one GEMM over all
        # tokens and heads with the bias fused into it (fewer passes over the features)
        if self.propagation == "dense":
            if adj_t is None:
                adj_t = gcn_norm_dense(edge_index, edge_weight, num_nodes).to(x.dtype)
            out = self.message_and_aggregate(adj_t, x)  # (..., h, f), head-major memory
            # the GEMM on the (h, ..., f) view: contiguous in, head-major out, no copies
            return F.linear(out.movedim(-2, 0), self.lin.weight, self.bias).movedim(0, -2)
        if adj_t is not None:
            raise ValueError("HeadGCNConv: adj_t is taken by dense propagation only")
        edge_index, norm = gcn_norm(edge_index, edge_weight, num_nodes, add_self_loops=True)
        out = self.propagate(edge_index, x=x, edge_weight=norm)
        return F.linear(out, self.lin.weight, self.bias)  # (..., h, f')

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        return edge_weight.view(-1, 1) * x_j

    def message_and_aggregate(self, adj_t: Tensor, x: Tensor) -> Tensor:
        """Messages and their sum in one product: ``adj_t`` (h, h) is the normalised
        matrix with ``adj_t[i, j]`` the weight of head j's message to head i.

        Returns (..., h, f) laid out head-major in memory (a view of a contiguous
        (h, ..., f) tensor): the propagation is then one (h, h) x (h, N f) GEMM with no
        copies when ``x`` is head-major too (as :class:`~graphheads.goh.GraphRouter`
        keeps its node features), and element-wise ops keep that layout."""
        x_hm = x.movedim(-2, 0)  # (h, ..., f): a free view of head-major memory
        out = adj_t @ x_hm.reshape(x_hm.size(0), -1)  # (h, N f)
        return out.view(x_hm.shape).movedim(0, -2)  # (..., h, f)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.in_channels}, {self.out_channels}, "
            f"propagation={self.propagation!r})"
        )


def make_conv(name: str, feature_dim: int) -> MessagePassing:
    """A layer by name, over the head axis: "gcn" (:class:`HeadGCNConv`), "gatv2"
    (:class:`~graphheads.gat.HeadGATv2Conv`: edge weights computed per token from the
    head states), "lightgcn" (PyG ``LGConv``), "graphconv" (PyG ``GraphConv``)."""
    from torch_geometric.nn import GraphConv, LGConv

    from graphheads.gat import HeadGATv2Conv

    if name == "gcn":
        return HeadGCNConv(feature_dim, feature_dim)
    if name == "gatv2":
        return HeadGATv2Conv(feature_dim)
    if name == "lightgcn":
        return LGConv(node_dim=-2)
    if name == "graphconv":
        return GraphConv(feature_dim, feature_dim, node_dim=-2)
    raise ValueError(f"make_conv: unknown conv {name!r}; choose from {list(CONVS)}")


class HeadMessagePassing(nn.Module):
    r"""``graph_layers`` residual message-passing layers over the head axis.

    Args:
        feature_dim: node feature width f.
        graph_layers: L (0 = identity; ``num_layers`` is its deprecated name).
        conv: a layer name for :func:`make_conv`, or a callable ``feature_dim ->
            MessagePassing`` (build it with ``node_dim=-2``; never ``cached=True``).
        activation: non-linearity applied to each layer's output before the residual add.

    Every layer is called as ``layer(z, edge_index, edge_weight)``: how fast it
    propagates is the layer's own business (:class:`HeadGCNConv` is dense). Dense
    :class:`HeadGCNConv` layers also get the normalised (h, h) matrix, built once per
    forward instead of once per layer (``adj_t=``).

    Shapes: z (..., h, f), edge_index (2, E), edge_weight (E,) -> (..., h, f).
    """

    def __init__(
        self,
        feature_dim: int,
        graph_layers: int | None = None,
        *,
        conv: str | ConvFactory = "gcn",
        activation: Callable[[Tensor], Tensor] = F.gelu,
        num_layers: int | None = None,  # deprecated: graph_layers
    ) -> None:
        super().__init__()
        graph_layers = renamed_argument(
            "HeadMessagePassing", "num_layers", num_layers, "graph_layers", graph_layers
        )
        if graph_layers is None:
            raise TypeError("HeadMessagePassing: missing the argument graph_layers")
        if graph_layers < 0:
            raise ValueError(f"HeadMessagePassing: graph_layers must be >= 0, got {graph_layers}")
        self.feature_dim = feature_dim
        self.layers = nn.ModuleList(
            make_conv(conv, feature_dim) if isinstance(conv, str) else conv(feature_dim)
            for _ in range(graph_layers)
        )
        for layer in self.layers:
            if getattr(layer, "node_dim", None) not in (-2,):
                raise ValueError(
                    f"HeadMessagePassing: {type(layer).__name__} must propagate over the "
                    f"head axis (node_dim=-2), got node_dim={getattr(layer, 'node_dim', None)}"
                )
            if getattr(layer, "cached", False):
                raise ValueError(
                    f"HeadMessagePassing: {type(layer).__name__}(cached=True) would cache a "
                    "normalisation of learnable edge weights; build it with cached=False"
                )
        self.activation = activation

    @property
    def uses_gcn_propagation(self) -> bool:
        """Whether a layer propagates with the dense GCN matrix (``adj_t`` of
        :meth:`forward`)."""
        return any(_dense_gcn(layer) for layer in self.layers)

    def forward(
        self,
        z: Tensor,
        edge_index: Tensor,
        edge_weight: Tensor | None = None,
        *,
        adj_t: Tensor | None = None,
    ) -> Tensor:
        """``adj_t``: the graph's GCN propagation matrix (:func:`gcn_norm_dense`) when the
        caller has it (e.g. cached by :meth:`~graphheads.graph.HeadGraph.gcn_propagation`);
        else it is built here, once for all dense GCN layers."""
        for layer in self.layers:
            if _dense_gcn(layer):
                if adj_t is None:
                    adj_t = gcn_norm_dense(edge_index, edge_weight, z.size(-2))
                out = layer(z, edge_index, edge_weight, adj_t=adj_t.to(z.dtype))
            else:
                out = layer(z, edge_index, edge_weight)
            z = z + self.activation(out)
        return z


def _dense_gcn(layer: nn.Module) -> bool:
    return isinstance(layer, HeadGCNConv) and layer.propagation == "dense"

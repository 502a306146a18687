r"""Message passing over the heads of a layer.

Node features live in tensors shaped ``(..., h, f)``: any leading axes (batch, tokens)
are carried along, and a PyTorch Geometric ``MessagePassing`` layer built with
``node_dim=-2`` propagates over the head axis with one ``edge_index`` for all tokens.

:class:`HeadMessagePassing` applies ``L`` residual layers

.. math::
    Z \leftarrow Z + \sigma(\mathrm{conv}_l(Z, \mathcal{E}, w)), \quad l = 1, \dots, L

The default layer is :class:`torch_geometric.nn.GCNConv` (Kipf & Welling 2017), whose
update is :math:`\hat{D}^{-1/2} (A + I) \hat{D}^{-1/2} Z \Theta + b` with degrees taken
at the target node, recomputed at every forward (never ``cached=True``: edge weights may
be learnable). For GCN there is a fused dense path: :func:`gcn_norm_dense` gives the
normalised h x h matrix P once per forward, and each layer is one GEMM of the tokens'
flattened (h f) features with the Kronecker matrix of P and the layer's weight. It gives
the same numbers as the PyG path and is the fast default.

Shape legend: h heads, f features, E edges.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GCNConv, MessagePassing

__all__ = ["HeadMessagePassing", "gcn_norm_dense", "make_conv"]

ConvFactory = Callable[[int], MessagePassing]


def gcn_norm_dense(edge_index: Tensor, edge_weight: Tensor | None, num_nodes: int) -> Tensor:
    r"""The (h, h) propagation matrix of GCN: ``P[i, j]`` is the weight of the message
    from head j to head i, :math:`\hat{D}^{-1/2} (A^\top + I) \hat{D}^{-1/2}` with
    :math:`\hat{D}_{ii} = \sum_j (A^\top + I)_{ij}`.

    Matches PyG's ``gcn_norm`` with ``add_self_loops=True``: a head that already has a
    self-loop keeps its weight, every other head gets a self-loop of weight 1.
    """
    src, dst = edge_index[0], edge_index[1]
    if edge_weight is None:
        edge_weight = torch.ones(src.numel(), device=edge_index.device)
    loop = src == dst
    has_loop = torch.zeros(num_nodes, dtype=torch.bool, device=edge_index.device)
    has_loop[src[loop]] = True
    incoming = edge_weight.new_zeros(num_nodes, num_nodes)  # (h_target, h_source)
    incoming = incoming.index_put((dst, src), edge_weight, accumulate=True)
    incoming = incoming + torch.diag((~has_loop).to(edge_weight.dtype))
    deg = incoming.sum(dim=1)  # in-degree with self-loops
    inv_sqrt = deg.pow(-0.5).masked_fill(deg == 0, 0.0)
    return inv_sqrt[:, None] * incoming * inv_sqrt[None, :]


def make_conv(name: str, feature_dim: int) -> MessagePassing:
    """A PyG layer by name, over the head axis: "gcn", "lightgcn" (LGConv), "graphconv"."""
    from torch_geometric.nn import GraphConv, LGConv

    if name == "gcn":
        return GCNConv(feature_dim, feature_dim, node_dim=-2, cached=False)
    if name == "lightgcn":
        return LGConv(node_dim=-2)
    if name == "graphconv":
        return GraphConv(feature_dim, feature_dim, node_dim=-2)
    raise ValueError(f"make_conv: unknown conv {name!r}; choose 'gcn', 'lightgcn' or 'graphconv'")


class HeadMessagePassing(nn.Module):
    r"""``num_layers`` residual message-passing layers over the head axis.

    Args:
        feature_dim: node feature width f.
        num_layers: L (0 = identity).
        conv: a layer name for :func:`make_conv`, or a callable ``feature_dim ->
            MessagePassing`` (build it with ``node_dim=-2``; never ``cached=True``).
        activation: non-linearity applied to each layer's output before the residual add.
        fused: use the fused dense path where it applies (GCNConv layers with default
            normalisation); it gives the same numbers as the PyG path.

    Shapes: z (..., h, f), edge_index (2, E), edge_weight (E,) -> (..., h, f).
    """

    def __init__(
        self,
        feature_dim: int,
        num_layers: int,
        *,
        conv: str | ConvFactory = "gcn",
        activation: Callable[[Tensor], Tensor] = F.gelu,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"HeadMessagePassing: num_layers must be >= 0, got {num_layers}")
        self.feature_dim = feature_dim
        self.layers = nn.ModuleList(
            make_conv(conv, feature_dim) if isinstance(conv, str) else conv(feature_dim)
            for _ in range(num_layers)
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
        self.fused = fused

    @property
    def can_fuse(self) -> bool:
        """True when every layer is a GCNConv with the default normalisation."""
        return all(
            type(layer) is GCNConv
            and layer.normalize
            and layer.add_self_loops
            and not layer.improved
            and getattr(layer.lin, "bias", None) is None
            for layer in self.layers
        )

    def forward(self, z: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        if not self.layers:
            return z
        if self.fused and self.can_fuse:
            h, f = z.shape[-2:]
            prop = gcn_norm_dense(edge_index, edge_weight, h).to(z.dtype)  # (h, h)
            flat = z.flatten(-2)  # (..., h f): one row per token
            for layer in self.layers:
                assert isinstance(layer, GCNConv)
                # P Z W^T for every token as one GEMM with the (h f, h f) Kronecker matrix
                # M[(j, g), (i, f)] = P[i, j] W[f, g]: no per-token small matmuls or permutes
                msg = flat @ torch.kron(prop.T, layer.lin.weight.T)  # (..., h f)
                if layer.bias is not None:
                    msg = msg + layer.bias.repeat(h)
                flat = flat + self.activation(msg)
            return flat.unflatten(-1, (h, f))
        for layer in self.layers:
            z = z + self.activation(layer(z, edge_index, edge_weight))
        return z

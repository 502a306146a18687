r"""A token-conditional head graph: GATv2 attention over the heads of a layer.

The head graph's edges say which heads may exchange messages; how much each message
weighs is computed per token from the heads' states (Brody, Alon & Yahav 2022, "How
Attentive are Graph Attention Networks?", https://arxiv.org/abs/2105.14491), so head
interaction can depend on the input. For edge j -> i (and a self-loop on every head):

.. math::
    e_{ij} = a^\top \mathrm{LeakyReLU}(W_r z_i + W_l z_j + w_{ji} W_e), \quad
    \alpha_{ij} = \mathrm{softmax}_j(e_{ij}), \quad
    z'_i = \sum_j \alpha_{ij} W_l z_j + b

with ``w_ji`` the head graph's (learnable) edge weight. :class:`HeadGATv2Conv` computes
this densely over the head axis, for every token at once, equal to PyG's
``GATv2Conv(f, f, edge_dim=1)`` run on one graph per token on a coalesced graph (every
:class:`~graphheads.graph.HeadGraph` is; PyG gives repeated edges a softmax term each,
this sums their weights into one); a test checks outputs and gradients. Its parameter
names are ``GATv2Conv``'s, so its state dict loads.

Which heads talk is the graph's edge set: a weight enters the logit as a feature and
cannot switch an edge off, so a graph whose every pair is an edge (``learnable="dense"``)
is the complete graph here (``ModelConfig`` refuses that combination), and a self-loop's
weight is replaced, as in PyG, by the mean of the head's incoming weights.

Shapes: z (..., h, f), edge_index (2, E), edge_weight (E,) -> (..., h, f).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

__all__ = ["HeadGATv2Conv"]


class HeadGATv2Conv(MessagePassing):
    """GATv2 over the head axis (one attention head, self-loops added as PyG does:
    existing ones removed, every head gets one whose edge weight is the mean of its
    incoming edges' weights).

    Args:
        channels: feature width f (in and out).
        negative_slope: LeakyReLU slope (0.2, as GATv2Conv).
    """

    def __init__(self, channels: int, *, negative_slope: float = 0.2) -> None:
        super().__init__(aggr="add", node_dim=-2)
        if channels < 1:
            raise ValueError(f"HeadGATv2Conv: channels must be >= 1, got {channels}")
        self.channels = channels
        self.negative_slope = negative_slope
        self.lin_l = nn.Linear(channels, channels)  # the source (message) transform
        self.lin_r = nn.Linear(channels, channels)  # the target transform
        self.lin_edge = nn.Linear(1, channels, bias=False)
        self.att = nn.Parameter(torch.empty(1, 1, channels))
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for lin in (self.lin_l, self.lin_r, self.lin_edge):
            nn.init.xavier_uniform_(lin.weight)  # glorot, as GATv2Conv
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.xavier_uniform_(self.att.view(1, -1))
        nn.init.zeros_(self.bias)

    def attention(self, z: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        """The attention (..., h, h): ``[..., i, j]`` weighs head j's message to head i
        (0 where the graph has no edge j -> i)."""
        return self._attention(z, self.lin_l(z), edge_index, edge_weight)

    def _attention(
        self, z: Tensor, x_l: Tensor, edge_index: Tensor, edge_weight: Tensor | None
    ) -> Tensor:
        h = z.size(-2)
        src, dst = edge_index[0], edge_index[1]
        keep = (src != dst).to(z.dtype)  # existing self-loops are replaced
        linked = z.new_zeros(h, h).index_put((dst, src), keep, accumulate=True)
        eye = torch.eye(h, dtype=z.dtype, device=z.device)
        mask = (linked + eye) > 0
        scores = self.lin_r(z).unsqueeze(-2) + x_l.unsqueeze(-3)  # (..., i, j, f)
        if edge_weight is not None:
            w = edge_weight.to(z.dtype) * keep
            attr = z.new_zeros(h, h).index_put((dst, src), w, accumulate=True)
            incoming = linked.sum(-1)
            loops = attr.sum(-1) / incoming.clamp_min(1.0)  # mean of incoming; 0 if none
            attr = attr + torch.diag(loops)
            edge = attr.unsqueeze(-1) * self.lin_edge.weight.view(-1)
            scores = scores + edge.to(scores.dtype)  # autocast: stay in the features' dtype
        att = self.att.view(-1).to(scores.dtype)  # no fp32 copy of the (..., h, h, f) scores
        logits = (F.leaky_relu(scores, self.negative_slope) * att).sum(-1).float()
        return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)

    def forward(self, z: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        x_l = self.lin_l(z)
        alpha = self._attention(z, x_l, edge_index, edge_weight)
        out = alpha.to(x_l.dtype) @ x_l
        return out + self.bias.to(out.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.channels})"

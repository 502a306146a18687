r"""Head graphs: the attention heads of one layer as the nodes of a (learnable) graph.

Edges follow PyTorch Geometric's convention: ``edge_index[0]`` holds source heads,
``edge_index[1]`` target heads, and a message travels from source to target.
:meth:`HeadGraph.adjacency` returns ``A[source, target]``.

Edges are coalesced when a graph is built: sorted by (source, target), and repeated
(source, target) pairs become one edge whose weight is the sum of theirs (PyG's
``coalesce``). Every consumer (the dense GCN, PyG layers, plots) sees the same graph.

Edge weights are

* ``"fixed"``: the weights given (a buffer, no gradient);
* ``"edge"``: one learnable weight per given edge, ``softplus(theta)`` (positive);
* ``"dense"``: a fully learnable adjacency over every ordered pair of distinct heads,
  ``softplus(Theta)``, initialised from the given graph (absent edges start at
  ``absent_weight``).

Weights are recomputed from the parameters at every call. A fixed graph's GCN
propagation matrix (:meth:`HeadGraph.gcn_propagation`) is cached, as PyG's
``GCNConv(cached=True)`` caches a fixed graph's normalisation: keyed on the edge and
weight tensors themselves (held, so their storage cannot be reused) and their versions,
so an in-place update, ``load_state_dict`` or ``.to()`` recomputes it. Learnable weights
are never cached (optimisers, FSDP and ``.data`` edits change them without a trace); the
router builds their matrix once per forward for all message-passing layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import coalesce

from graphheads.gnn import gcn_norm_dense

__all__ = ["EdgeLearning", "HeadGraph"]

PRESETS = ("complete", "ring", "star", "grid", "empty")  # HeadGraph.preset names

EdgeLearning = Literal["fixed", "edge", "dense"]


def _inverse_softplus(w: Tensor) -> Tensor:
    # softplus(x) = log(1 + e^x)  =>  x = w + log(1 - e^-w), w > 0
    return w + torch.log(-torch.expm1(-w))


class HeadGraph(nn.Module):
    """A graph whose nodes are the ``num_heads`` attention heads of one layer.

    Args:
        num_heads: number of nodes H.
        edge_index: (2, E) long tensor of (source, target) head ids; repeated pairs are
            merged into one edge with the summed weight.
        edge_weight: (E,) non-negative weights; default all ones.
        learnable: "fixed", "edge" or "dense" (see the module docstring).
        num_shared: how many heads (the first ones) are always-on shared heads, or
            ``None`` when the graph does not say.
        absent_weight: initial weight of absent edges in the "dense" parametrisation.
        node_labels: optional labels for :meth:`to_networkx` (default: the head ids).

    Construct presets with :meth:`complete`, :meth:`ring`, :meth:`star`, :meth:`grid`,
    :meth:`empty`, :meth:`random`, :meth:`from_edges` and :meth:`from_networkx`.
    """

    edge_index: Tensor

    def __init__(
        self,
        num_heads: int,
        edge_index: Tensor,
        edge_weight: Tensor | None = None,
        *,
        learnable: EdgeLearning = "fixed",
        num_shared: int | None = None,
        absent_weight: float = 1e-2,
        node_labels: Sequence[Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"HeadGraph: num_heads must be a positive int, got {num_heads!r}")
        edge_index = torch.as_tensor(edge_index)
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(
                f"HeadGraph: edge_index must have shape (2, num_edges), got "
                f"{tuple(edge_index.shape)}"
            )
        if edge_index.is_floating_point():
            raise ValueError(f"HeadGraph: edge_index must hold integers, got {edge_index.dtype}")
        edge_index = edge_index.long()
        if edge_index.numel() and (edge_index.min() < 0 or edge_index.max() >= num_heads):
            bad = edge_index[(edge_index < 0) | (edge_index >= num_heads)].unique().tolist()
            raise ValueError(
                f"HeadGraph: edge_index has node ids {bad} outside [0, num_heads={num_heads})"
            )
        num_edges = edge_index.size(1)
        if edge_weight is None:
            edge_weight = torch.ones(num_edges)
        edge_weight = torch.as_tensor(edge_weight, dtype=torch.float32).detach().clone()
        if tuple(edge_weight.shape) != (num_edges,):
            raise ValueError(
                f"HeadGraph: edge_weight must have shape ({num_edges},), got "
                f"{tuple(edge_weight.shape)}"
            )
        if not torch.isfinite(edge_weight).all() or (edge_weight < 0).any():
            bad = edge_weight[~torch.isfinite(edge_weight) | (edge_weight < 0)].tolist()
            raise ValueError(f"HeadGraph: edge weights must be finite and >= 0, got {bad}")
        if learnable not in ("fixed", "edge", "dense"):
            raise ValueError(
                f"HeadGraph: learnable must be 'fixed', 'edge' or 'dense', got {learnable!r}"
            )
        if num_shared is not None and not 0 <= num_shared <= num_heads:
            raise ValueError(
                f"HeadGraph: num_shared ({num_shared}) must be in [0, num_heads={num_heads}]"
            )
        if node_labels is not None and len(node_labels) != num_heads:
            raise ValueError(
                f"HeadGraph: {len(node_labels)} node labels for num_heads={num_heads} heads"
            )
        if absent_weight <= 0:
            raise ValueError(f"HeadGraph: absent_weight must be > 0, got {absent_weight}")
        if num_edges:  # one edge per (source, target): repeated pairs add up
            edge_index, edge_weight = coalesce(edge_index, edge_weight, num_heads, reduce="sum")
        self.num_heads = num_heads
        self.learnable: EdgeLearning = learnable
        self.num_shared = num_shared
        self.node_labels = list(node_labels) if node_labels is not None else None
        self.fixed_weight: Tensor | None
        self.raw_weight: nn.Parameter | None
        if learnable == "dense":
            loops = edge_index[0] == edge_index[1]
            if loops.any():  # the dense weights cover pairs of distinct heads only
                heads = edge_index[0, loops].unique().tolist()
                raise ValueError(
                    f"HeadGraph: learnable='dense' weighs pairs of distinct heads; edge_index "
                    f"has self-loops at heads {heads}, which it would drop (remove them, or "
                    "use learnable='edge')"
                )
            dense = torch.full((num_heads, num_heads), absent_weight)
            dense.index_put_((edge_index[0], edge_index[1]), edge_weight, accumulate=False)
            src, dst = torch.meshgrid(
                torch.arange(num_heads), torch.arange(num_heads), indexing="ij"
            )
            off_diagonal = src != dst
            edge_index = torch.stack([src[off_diagonal], dst[off_diagonal]])
            edge_weight = dense[off_diagonal]
        self.register_buffer("edge_index", edge_index)
        # (key, matrix): the cached GCN propagation matrix (see gcn_propagation)
        self._propagation: tuple[tuple[Any, ...], Tensor] | None = None
        if learnable == "fixed":
            self.register_buffer("fixed_weight", edge_weight)
            self.raw_weight = None
        else:
            self.fixed_weight = None
            self.raw_weight = nn.Parameter(_inverse_softplus(edge_weight.clamp_min(1e-6)))

    # -- weights ----------------------------------------------------------------------
    @property
    def num_edges(self) -> int:
        return int(self.edge_index.size(1))

    @property
    def edge_weight(self) -> Tensor:
        """(E,) current edge weights (differentiable when learnable)."""
        if self.raw_weight is not None:
            return F.softplus(self.raw_weight)
        assert self.fixed_weight is not None
        return self.fixed_weight

    def gcn_propagation(self) -> Tensor:
        """(H, H) GCN propagation matrix of the current weights (:func:`~graphheads.gnn.
        gcn_norm_dense`: ``P[i, j]`` weighs the message from head j to head i).

        For fixed weights it is computed once and reused while the edge and weight
        tensors stay the same objects at the same version (a decoding loop builds it
        once, not at every layer and step); learnable weights, inference tensors (no
        version counter) and compiled code (where it is part of the graph) recompute."""
        weight = self.fixed_weight
        if (
            weight is None
            or torch.compiler.is_compiling()
            or torch.is_inference_mode_enabled()  # its result would be an inference tensor
            or weight.is_inference()
            or self.edge_index.is_inference()
        ):
            return gcn_norm_dense(self.edge_index, self.edge_weight, self.num_heads)
        key = (self.edge_index, self.edge_index._version, weight, weight._version)
        cached = self._propagation
        if cached is None or any(
            a is not b if isinstance(a, Tensor) else a != b
            for a, b in zip(cached[0], key, strict=True)
        ):
            cached = (key, gcn_norm_dense(self.edge_index, weight, self.num_heads))
            self._propagation = cached
        return cached[1]

    def adjacency(self) -> Tensor:
        """(H, H) dense weights, ``A[source, target]``; parallel edges add up."""
        a = self.edge_weight.new_zeros(self.num_heads, self.num_heads)
        return a.index_put((self.edge_index[0], self.edge_index[1]), self.edge_weight, True)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_edges={self.num_edges}, "
            f"learnable={self.learnable!r}, num_shared={self.num_shared}"
        )

    # -- presets ----------------------------------------------------------------------
    @staticmethod
    def _undirected(pairs: Iterable[tuple[int, int]]) -> Tensor:
        both = [(i, j) for i, j in pairs] + [(j, i) for i, j in pairs]
        if not both:
            return torch.zeros(2, 0, dtype=torch.long)
        return torch.tensor(sorted(set(both)), dtype=torch.long).t().contiguous()

    @classmethod
    def complete(cls, num_heads: int, **kwargs: Any) -> HeadGraph:
        """Every head linked to every other head (both directions)."""
        pairs = [(i, j) for i in range(num_heads) for j in range(i + 1, num_heads)]
        return cls(num_heads, cls._undirected(pairs), **kwargs)

    @classmethod
    def ring(cls, num_heads: int, **kwargs: Any) -> HeadGraph:
        """Head i linked to heads i - 1 and i + 1 (mod H)."""
        pairs = [(i, (i + 1) % num_heads) for i in range(num_heads) if (i + 1) % num_heads != i]
        return cls(num_heads, cls._undirected(pairs), **kwargs)

    @classmethod
    def star(cls, num_heads: int, center: int = 0, **kwargs: Any) -> HeadGraph:
        """Every head linked to ``center`` (default head 0)."""
        if not 0 <= center < num_heads:
            raise ValueError(f"HeadGraph.star: center ({center}) outside [0, {num_heads})")
        pairs = [(center, j) for j in range(num_heads) if j != center]
        return cls(num_heads, cls._undirected(pairs), **kwargs)

    @classmethod
    def grid(cls, rows: int, cols: int, **kwargs: Any) -> HeadGraph:
        """A rows x cols lattice (4-neighbourhood); head id = row * cols + col."""
        if rows < 1 or cols < 1:
            raise ValueError(f"HeadGraph.grid: rows ({rows}) and cols ({cols}) must be >= 1")
        pairs = []
        for r in range(rows):
            for c in range(cols):
                if c + 1 < cols:
                    pairs.append((r * cols + c, r * cols + c + 1))
                if r + 1 < rows:
                    pairs.append((r * cols + c, (r + 1) * cols + c))
        return cls(rows * cols, cls._undirected(pairs), **kwargs)

    @classmethod
    def empty(cls, num_heads: int, **kwargs: Any) -> HeadGraph:
        """No edges: every head is on its own."""
        return cls(num_heads, torch.zeros(2, 0, dtype=torch.long), **kwargs)

    @classmethod
    def random(cls, num_heads: int, p: float, seed: int = 0, **kwargs: Any) -> HeadGraph:
        """Erdős–Rényi graph: each unordered pair linked with probability ``p``."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"HeadGraph.random: p must be in [0, 1], got {p}")
        gen = torch.Generator().manual_seed(seed)
        pairs = [
            (i, j)
            for i in range(num_heads)
            for j in range(i + 1, num_heads)
            if torch.rand((), generator=gen).item() < p
        ]
        return cls(num_heads, cls._undirected(pairs), **kwargs)

    @classmethod
    def preset(cls, name: str, num_heads: int, **kwargs: Any) -> HeadGraph:
        """A preset by name: complete, ring, star, grid (near-square) or empty."""
        if name == "grid":
            rows = max(r for r in range(1, math.isqrt(num_heads) + 1) if num_heads % r == 0)
            return cls.grid(rows, num_heads // rows, **kwargs)
        makers = {"complete": cls.complete, "ring": cls.ring, "star": cls.star, "empty": cls.empty}
        if name not in makers:
            raise ValueError(
                f"HeadGraph.preset: unknown graph {name!r}; choose from {sorted(PRESETS)}"
            )
        return makers[name](num_heads, **kwargs)

    @classmethod
    def from_edges(
        cls,
        num_heads: int,
        edges: Iterable[tuple[int, int]],
        weights: Iterable[float] | None = None,
        *,
        undirected: bool = False,
        **kwargs: Any,
    ) -> HeadGraph:
        """From (source, target) pairs; ``undirected=True`` adds each reverse edge too
        (a self-loop is its own reverse: it stays one edge). Repeated pairs add up."""
        edge_list = [(int(i), int(j)) for i, j in edges]
        weight_list = [float(w) for w in weights] if weights is not None else None
        if weight_list is not None and len(weight_list) != len(edge_list):
            raise ValueError(
                f"HeadGraph.from_edges: {len(weight_list)} weights for {len(edge_list)} edges"
            )
        if undirected:
            reverse = [n for n, (i, j) in enumerate(edge_list) if i != j]
            edge_list = edge_list + [edge_list[n][::-1] for n in reverse]
            if weight_list is not None:
                weight_list = weight_list + [weight_list[n] for n in reverse]
        index = (
            torch.tensor(edge_list, dtype=torch.long).t().reshape(2, -1)
            if edge_list
            else torch.zeros(2, 0, dtype=torch.long)
        )
        weight = torch.tensor(weight_list) if weight_list is not None else None
        return cls(num_heads, index, weight, **kwargs)

    @classmethod
    def from_networkx(cls, graph: nx.Graph, **kwargs: Any) -> HeadGraph:
        """From a networkx graph (undirected edges become two directed ones).

        Nodes labelled ``0 .. H-1`` are the head ids; any other labels are mapped to head
        ids in the graph's node order and kept as ``node_labels``. The edge attribute
        ``weight`` (default 1) gives the weights; the node attribute ``shared`` (bool)
        marks shared heads, which must be the first heads.
        """
        nodes = list(graph.nodes)
        num_heads = len(nodes)
        if set(nodes) == set(range(num_heads)):
            ids = {n: n for n in nodes}
            labels = None
        else:
            ids = {n: i for i, n in enumerate(nodes)}
            labels = nodes
        by_id = sorted(nodes, key=lambda n: ids[n])
        flags = [bool(graph.nodes[n].get("shared", False)) for n in by_id]
        if any(flags) and "num_shared" not in kwargs:
            num_shared = sum(flags)
            if not all(flags[:num_shared]):
                raise ValueError(
                    "HeadGraph.from_networkx: shared heads must be the first heads; got "
                    f"shared flags {flags}"
                )
            kwargs["num_shared"] = num_shared
        edges = [(ids[u], ids[v]) for u, v in graph.edges]
        weights = [float(d.get("weight", 1.0)) for _, _, d in graph.edges(data=True)]
        kwargs.setdefault("node_labels", labels)
        return cls.from_edges(
            num_heads, edges, weights, undirected=not graph.is_directed(), **kwargs
        )

    def to_networkx(self) -> nx.DiGraph:
        """A directed networkx graph with the current (learned) weights as ``weight``
        and node attributes ``shared`` (bool) and ``role`` ("shared"/"routed")."""
        g = nx.DiGraph()
        labels = self.node_labels or list(range(self.num_heads))
        shared = self.num_shared or 0
        for i, label in enumerate(labels):
            g.add_node(label, head=i, shared=i < shared, role="shared" if i < shared else "routed")
        weights = self.edge_weight.detach().cpu().tolist()
        for (u, v), w in zip(self.edge_index.t().tolist(), weights, strict=True):
            if g.has_edge(labels[u], labels[v]):
                g[labels[u]][labels[v]]["weight"] += w
            else:
                g.add_edge(labels[u], labels[v], weight=w)
        return g

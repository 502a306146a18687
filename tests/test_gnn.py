import networkx as nx
import pytest
import torch
from torch_geometric.nn import GCNConv, GraphConv, LGConv

from graphheads import HeadGCNConv, HeadGraph, HeadMessagePassing
from graphheads.gnn import gcn_norm_dense

H, F_ = 5, 8


def weighted_directed_graph() -> HeadGraph:
    # directed edges, unequal weights, a self-loop on head 1, head 4 isolated
    return HeadGraph.from_edges(
        H, [(0, 1), (1, 2), (2, 0), (3, 0), (1, 1), (0, 2)], [0.5, 2.0, 1.0, 3.0, 0.7, 1.2]
    )


def hand_gcn(x, graph: HeadGraph, weight, bias):
    """D^-1/2 (A + I) D^-1/2 X W + b, messages flowing source -> target, written by hand."""
    a = graph.adjacency().T.clone()  # a[target, source]
    for i in range(H):
        if a[i, i] == 0:  # heads without a self-loop get weight 1 (PyG add_remaining_self_loops)
            a[i, i] = 1.0
    d = a.sum(1).rsqrt()
    prop = d[:, None] * a * d[None, :]
    return torch.einsum("ij,...jf->...if", prop, x @ weight.T) + bias


def test_gcn_norm_dense_matches_hand_formula():
    g = weighted_directed_graph()
    x = torch.eye(H)
    conv_free = hand_gcn(x, g, torch.eye(H), torch.zeros(H))
    torch.testing.assert_close(gcn_norm_dense(g.edge_index, g.edge_weight, H), conv_free)


def graph_with_repeats() -> HeadGraph:
    # repeated edges (summed when the graph is built) and a repeated self-loop
    return HeadGraph.from_edges(
        H, [(0, 1), (0, 1), (2, 2), (2, 2), (3, 4), (1, 0)], [0.5, 1.0, 0.3, 0.4, 2.0, 1.5]
    )


def networkx_graph_with_self_loop() -> HeadGraph:
    g = nx.Graph()
    g.add_nodes_from(range(H))
    g.add_weighted_edges_from([(0, 1, 2.0), (1, 1, 0.5), (2, 3, 1.0), (3, 4, 0.7)])
    return HeadGraph.from_networkx(g)


GRAPHS = {
    "weighted_directed": weighted_directed_graph,
    "repeats": graph_with_repeats,
    "networkx_self_loop": networkx_graph_with_self_loop,
    "empty": lambda: HeadGraph.empty(H),
    "complete": lambda: HeadGraph.complete(H),
}


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_dense_edges_pyg_and_hand_written_gcn_agree(graph):
    g = GRAPHS[graph]()
    conv = HeadGCNConv(F_, F_)
    with torch.no_grad():
        conv.bias.normal_()
    pyg = GCNConv(F_, F_, node_dim=-2)
    pyg.load_state_dict(conv.state_dict())  # the same parameter names
    x = torch.randn(2, 3, H, F_)
    seed = torch.ones(2, 3, H, F_) * torch.arange(H)[:, None].float()
    outs, grads = [], []
    for path in ("pyg", "dense", "edges", "hand"):
        xi = x.clone().requires_grad_(True)
        conv.propagation = "edges" if path == "edges" else "dense"
        if path == "hand":
            out = hand_gcn(xi, g, conv.lin.weight, conv.bias)
            weight = conv.lin.weight
        elif path == "pyg":
            out = pyg(xi, g.edge_index, g.edge_weight)
            weight = pyg.lin.weight
        else:
            out = conv(xi, g.edge_index, g.edge_weight)
            weight = conv.lin.weight
        (gx, gw) = torch.autograd.grad(out, (xi, weight), seed)
        outs.append(out.detach())
        grads.append((gx, gw))
    for out, (gx, gw) in zip(outs[1:], grads[1:], strict=True):
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, grads[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, grads[0][1], atol=1e-5, rtol=1e-5)


def test_dense_gcn_is_layout_free_and_keeps_head_major_memory():
    # the same numbers (and gradients) for token-major and head-major memory; head-major
    # input stays head-major through the layer (no copies: the router's fast path)
    g = weighted_directed_graph()
    conv = HeadGCNConv(F_, F_)
    x = torch.randn(2, 3, H, F_)
    x_hm = x.movedim(-2, 0).contiguous().movedim(0, -2)  # same values, head-major memory
    assert not x_hm.is_contiguous() and x_hm.movedim(-2, 0).is_contiguous()
    outs = []
    for xi in (x.clone().requires_grad_(True), x_hm.detach().requires_grad_(True)):
        out = conv(xi, g.edge_index, g.edge_weight)
        (grad,) = torch.autograd.grad(out.square().sum(), xi)
        outs.append((out, grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    assert outs[1][0].movedim(-2, 0).is_contiguous()


def test_a_stack_normalises_once_and_equals_per_layer_normalisation(count_calls):
    import graphheads.gnn as gnn

    g = HeadGraph.ring(H, learnable="edge")
    mp = HeadMessagePassing(F_, 3)
    z = torch.randn(2, H, F_)
    per_layer = z
    for layer in mp.layers:  # each layer normalising on its own
        per_layer = per_layer + mp.activation(layer(per_layer, g.edge_index, g.edge_weight))
    calls = count_calls(gnn, "gcn_norm_dense")
    torch.testing.assert_close(mp(z, g.edge_index, g.edge_weight), per_layer)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="adj_t is taken by dense propagation only"):
        HeadGCNConv(F_, F_, propagation="edges")(z, g.edge_index, adj_t=torch.eye(H))


def test_graphs_are_coalesced_when_built():
    g = graph_with_repeats()
    pairs = [tuple(p) for p in g.edge_index.t().tolist()]
    assert pairs == sorted(set(map(tuple, pairs)))  # one edge per (source, target)
    weights = dict(zip(pairs, g.edge_weight.tolist(), strict=True))
    assert weights[(0, 1)] == pytest.approx(1.5) and weights[(2, 2)] == pytest.approx(0.7)
    loops = networkx_graph_with_self_loop()
    assert loops.edge_index.t().tolist().count([1, 1]) == 1  # a self-loop is its own reverse
    assert loops.adjacency()[1, 1].item() == pytest.approx(0.5)


def test_dense_propagation_passes_gradients_to_learnable_edges_like_pyg():
    grads = []
    for make in (lambda f: GCNConv(f, f, node_dim=-2), lambda f: HeadGCNConv(f, f)):
        torch.manual_seed(0)
        g = HeadGraph.ring(H, learnable="edge")
        mp = HeadMessagePassing(F_, 2, conv=make)
        mp(torch.randn(4, H, F_), g.edge_index, g.edge_weight).square().sum().backward()
        grads.append(g.raw_weight.grad)
    assert grads[0].abs().min() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    assert isinstance(HeadMessagePassing(F_, 2).layers[0], HeadGCNConv)
    assert repr(HeadGCNConv(F_, 4)) == "HeadGCNConv(8, 4, propagation='dense')"
    with pytest.raises(ValueError, match=r"propagation must be 'dense' or 'edges', got 'csr'"):
        HeadGCNConv(F_, F_, propagation="csr")


def test_lightgcn_layer_matches_formula():
    g = weighted_directed_graph()
    mp = HeadMessagePassing(F_, 1, conv="lightgcn", activation=lambda t: t)
    assert isinstance(mp.layers[0], LGConv)
    x = torch.randn(3, H, F_)
    a = g.adjacency().T  # no added self-loops in LightGCN
    deg = a.sum(1)
    d = deg.pow(-0.5).masked_fill(deg == 0, 0)
    expected = x + torch.einsum("ij,...jf->...if", d[:, None] * a * d[None, :], x)
    torch.testing.assert_close(mp(x, g.edge_index, g.edge_weight), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aggr", ["add", "max"])
def test_graphconv_layer_matches_formula(aggr):
    g = weighted_directed_graph()
    mp = HeadMessagePassing(
        F_, 1, conv=lambda f: GraphConv(f, f, aggr=aggr, node_dim=-2), activation=lambda t: t
    )
    conv = mp.layers[0]
    x = torch.randn(3, H, F_)
    src, dst = g.edge_index
    w = g.edge_weight
    agg = torch.zeros_like(x) if aggr == "add" else torch.full_like(x, float("-inf"))
    for e in range(g.num_edges):
        msg = w[e] * x[..., src[e], :]
        if aggr == "add":
            agg[..., dst[e], :] += msg
        else:
            agg[..., dst[e], :] = torch.maximum(agg[..., dst[e], :], msg)
    agg = agg.masked_fill(torch.isinf(agg), 0.0)  # heads with no incoming edge aggregate to 0
    expected = x + conv.lin_rel(agg) + conv.lin_root(x)
    torch.testing.assert_close(mp(x, g.edge_index, w), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.scatter
def test_max_aggregation_uses_torch_scatter_when_installed():
    torch_scatter = pytest.importorskip("torch_scatter")
    import torch_geometric.typing

    assert torch_geometric.typing.WITH_TORCH_SCATTER
    g = weighted_directed_graph()
    x = torch.randn(H, F_)
    src, dst = g.edge_index
    out, _ = torch_scatter.scatter_max(x[src], dst, dim=0, dim_size=H)
    conv = GraphConv(F_, F_, aggr="max", node_dim=-2)
    with torch.no_grad():
        conv.lin_rel.weight.copy_(torch.eye(F_))
        conv.lin_rel.bias.zero_()
        conv.lin_root.weight.zero_()
    torch.testing.assert_close(conv(x, g.edge_index), out)


def test_bad_layers_raise():
    with pytest.raises(
        ValueError, match=r"must propagate over the head axis \(node_dim=-2\), got node_dim=-3"
    ):
        HeadMessagePassing(F_, 1, conv=lambda f: GCNConv(f, f, node_dim=-3))
    with pytest.raises(ValueError, match=r"cached=True"):
        HeadMessagePassing(F_, 1, conv=lambda f: GCNConv(f, f, node_dim=-2, cached=True))
    with pytest.raises(ValueError, match=r"unknown conv 'gat'"):
        HeadMessagePassing(F_, 1, conv="gat")

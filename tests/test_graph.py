import math

import networkx as nx
import pytest
import torch

import graphheads.graph
from graphheads import DecoderOnlyLM, GoHAttention, HeadGraph, ModelConfig
from graphheads.gnn import gcn_norm_dense


def edges(g: HeadGraph) -> set[tuple[int, int]]:
    return set(map(tuple, g.edge_index.t().tolist()))


def test_presets():
    assert edges(HeadGraph.complete(3)) == {(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)}
    assert edges(HeadGraph.ring(4)) == {
        (0, 1),
        (1, 0),
        (1, 2),
        (2, 1),
        (2, 3),
        (3, 2),
        (3, 0),
        (0, 3),
    }
    assert edges(HeadGraph.star(3, center=1)) == {(1, 0), (0, 1), (1, 2), (2, 1)}
    grid = HeadGraph.grid(2, 3)
    assert grid.num_heads == 6 and grid.num_edges == 2 * 7  # 7 undirected lattice edges
    assert (0, 3) in edges(grid) and (2, 3) not in edges(grid)
    assert HeadGraph.empty(5).num_edges == 0
    assert HeadGraph.preset("grid", 8).num_edges == 2 * 10  # 2 x 4 lattice
    r1, r2 = HeadGraph.random(8, 0.5, seed=3), HeadGraph.random(8, 0.5, seed=3)
    assert edges(r1) == edges(r2)  # seeded
    assert edges(HeadGraph.random(8, 1.0)) == edges(HeadGraph.complete(8))


def test_adjacency_is_source_by_target():
    g = HeadGraph.from_edges(3, [(0, 2), (1, 2)], [0.5, 2.0])
    expected = torch.zeros(3, 3)
    expected[0, 2], expected[1, 2] = 0.5, 2.0
    torch.testing.assert_close(g.adjacency(), expected)


@pytest.mark.parametrize("learnable", ["fixed", "edge", "dense"])
def test_networkx_round_trip_keeps_edges_weights_and_roles(learnable):
    g = HeadGraph.from_edges(
        4, [(0, 1), (1, 2), (3, 0)], [0.5, 1.5, 2.0], learnable=learnable, num_shared=1
    )
    if learnable != "fixed":
        with torch.no_grad():
            g.raw_weight.add_(0.3)  # "learned" weights must travel too
    nxg = g.to_networkx()
    assert nxg.nodes[0]["shared"] and nxg.nodes[0]["role"] == "shared"
    assert nxg.nodes[2]["role"] == "routed"
    back = HeadGraph.from_networkx(nxg)
    assert back.num_shared == 1
    torch.testing.assert_close(back.adjacency(), g.adjacency().detach())


def test_from_networkx_with_labels_and_undirected_edges():
    G = nx.Graph()
    G.add_edge("syntax", "position", weight=2.0)
    G.add_node("copy")
    g = HeadGraph.from_networkx(G)
    assert g.num_heads == 3 and g.node_labels == ["syntax", "position", "copy"]
    assert edges(g) == {(0, 1), (1, 0)}
    assert g.edge_weight.tolist() == [2.0, 2.0]
    assert set(g.to_networkx().nodes) == {"syntax", "position", "copy"}


def test_learnable_weights_start_at_given_values_and_get_gradients():
    g = HeadGraph.from_edges(3, [(0, 1), (1, 2)], [0.5, 2.0], learnable="edge")
    torch.testing.assert_close(g.edge_weight, torch.tensor([0.5, 2.0]))
    g.adjacency().sum().backward()
    assert g.raw_weight.grad is not None and g.raw_weight.grad.abs().min() > 0
    dense = HeadGraph.ring(4, learnable="dense", absent_weight=0.01)
    assert dense.num_edges == 12  # every ordered pair of distinct heads
    a = dense.adjacency()
    assert math.isclose(a[0, 1].item(), 1.0, rel_tol=1e-5) and math.isclose(
        a[0, 2].item(), 0.01, rel_tol=1e-4
    )
    fixed = HeadGraph.ring(4)
    assert not list(fixed.parameters())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: HeadGraph(3, torch.tensor([[0, 1], [1, 3]])),
            r"node ids \[3\] outside \[0, num_heads=3\)",
        ),
        (
            lambda: HeadGraph(3, torch.tensor([[0, 1, 2]])),
            r"edge_index must have shape \(2, num_edges\), got \(1, 3\)",
        ),
        (
            lambda: HeadGraph(3, torch.tensor([[0], [1]]), torch.tensor([-1.0])),
            r"finite and >= 0, got \[-1.0\]",
        ),
        (
            lambda: HeadGraph(3, torch.tensor([[0], [1]]), torch.tensor([float("nan")])),
            r"finite and >= 0, got \[nan\]",
        ),
        (
            lambda: HeadGraph(3, torch.tensor([[0], [1]]), torch.ones(2)),
            r"edge_weight must have shape \(1,\), got \(2,\)",
        ),
        (
            lambda: HeadGraph(3, torch.zeros(2, 0, dtype=torch.long), learnable="full"),
            r"learnable must be .* got 'full'",
        ),
        (lambda: HeadGraph.preset("tree", 4), r"unknown graph 'tree'"),
        (
            lambda: HeadGraph.ring(4, num_shared=5),
            r"num_shared \(5\) must be in \[0, num_heads=4\]",
        ),
    ],
)
def test_bad_graphs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_dense_graph_refuses_self_loops_it_would_drop():
    """learnable='dense' holds a weight per pair of distinct heads: a self-loop given in
    edge_index (weight 5.0 here) came back as 0.0 without a word."""
    edge_index = torch.tensor([[0, 1, 2], [0, 2, 1]])
    with pytest.raises(ValueError, match=r"self-loops at heads \[0\], which it would drop"):
        HeadGraph(3, edge_index, torch.tensor([5.0, 1.0, 1.0]), learnable="dense")
    kept = HeadGraph(3, edge_index, torch.tensor([5.0, 1.0, 1.0]), learnable="edge")
    assert kept.adjacency()[0, 0].item() == pytest.approx(5.0)


def test_the_gcn_propagation_is_built_once_while_a_fixed_graph_stays_the_same(count_calls):
    """A fixed graph's normalised matrix is built once for a whole decoding run (not per
    layer and step), as GCNConv(cached=True) does, and rebuilt when the weights change
    in place or move; a learnable graph's is rebuilt at every call (optimisers and FSDP
    change weights without a trace); inference tensors (no version counter) work."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=20, d_model=32, num_heads=4, num_layers=2, d_ff=32, attention="goh",
        num_shared=1, top_k=2, graph_learnable="fixed",
    )  # fmt: skip
    model = DecoderOnlyLM(config).eval()
    calls = count_calls(graphheads.graph, "gcn_norm_dense")
    model.generate(torch.randint(0, 20, (2, 3)), 6)
    assert len(calls) == 2  # once per layer's graph (before: 6 forwards x 2 layers)

    graph = HeadGraph.ring(4)  # fixed weights
    fresh = lambda: gcn_norm_dense(graph.edge_index, graph.edge_weight, 4)  # noqa: E731
    first = graph.gcn_propagation()
    assert graph.gcn_propagation() is first
    graph.fixed_weight[0] += 2.0  # in place
    changed = graph.gcn_propagation()
    torch.testing.assert_close(changed, fresh())
    assert not torch.equal(changed, first)
    graph.load_state_dict({k: v.clone() for k, v in HeadGraph.ring(4).state_dict().items()})
    torch.testing.assert_close(graph.gcn_propagation(), first)  # loaded back: rebuilt
    graph.to(torch.float64)
    assert graph.gcn_propagation().dtype == torch.float64  # .to() rebuilds it
    learnable = HeadGraph.complete(4, learnable="edge")
    with torch.no_grad():
        assert learnable.gcn_propagation() is not learnable.gcn_propagation()
    with torch.inference_mode():  # a model built and run under inference_mode
        served = DecoderOnlyLM(config).eval()
        assert served.generate(torch.randint(0, 20, (1, 3)), 2).shape == (1, 5)


def test_an_inference_mode_evaluation_leaves_nothing_cached_that_training_cannot_use():
    """A matrix built under inference_mode is an inference tensor: cached, the next
    training step's backward failed ("Inference tensors cannot be saved for backward")."""
    torch.manual_seed(0)
    attention = GoHAttention(16, 4, 1, 2, HeadGraph.ring(4, num_shared=1), graph_scale_init=1.0)
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        attention(x)
    out = attention(x)
    (out.output.sum() + out.routing.load_balance_loss).backward()
    assert attention.router.head_embedding.grad is not None

import pytest
import torch
from test_moh import train_copy

from graphheads import (
    DecoderOnlyLM,
    GoHAttention,
    GraphRouter,
    HeadGraph,
    ModelConfig,
    MoHRouter,
    Transformer,
)

D, H, FEAT = 24, 6, 8


@pytest.mark.parametrize("num_shared", [0, 1, 2])
@pytest.mark.parametrize("graph_layers", [0, 2])
def test_starts_as_the_linear_moh_router(num_shared, graph_layers):
    moh = MoHRouter(D, H, num_shared, 2)
    goh = GraphRouter(D, H, num_shared, 2, HeadGraph.complete(H, learnable="edge"),
                      feature_dim=FEAT, graph_layers=graph_layers)  # fmt: skip
    goh.copy_from_moh(moh)
    x = torch.randn(2, 7, D)
    a, b = moh(x), goh(x)
    # equal up to float rounding (the logits come from differently stacked GEMMs)
    torch.testing.assert_close(b.gates, a.gates, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.router_probs, a.router_probs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.load_balance_loss, a.load_balance_loss)
    assert torch.equal(b.routed_mask, a.routed_mask)
    with torch.no_grad():
        goh.graph_scale.fill_(1.0)  # once the graph has weight, it changes the routing
    assert not torch.allclose(goh(x).router_probs, a.router_probs)


def test_the_graph_branch_learns_through_its_scale_from_zero():
    """At init the graph branch has weight 0, so it is a no-op; its scale gets a gradient
    at once, and the message-passing and edge weights as soon as the scale has moved (a
    branch that is exactly zero through a product cannot pass a gradient to the other
    factors of that product in the same step)."""
    torch.manual_seed(0)
    attn = GoHAttention(D, H, 2, 2, HeadGraph.complete(H, learnable="edge"), feature_dim=FEAT)
    router = attn.router
    optimizer = torch.optim.SGD(attn.parameters(), lr=0.5)
    x = torch.randn(2, 9, D)
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        out = attn(x)
        (out.output.square().mean() + out.routing.load_balance_loss).backward()
        conv = router.message_passing.layers[0]
        grads.append(
            {
                "scale": router.graph_scale.grad.abs().sum(),
                "conv": conv.lin.weight.grad.abs().sum(),
                "edges": router.graph.raw_weight.grad.abs().sum(),
                "linear": router.linear_gate.weight.grad.abs().sum(),
            }
        )
        optimizer.step()
    assert grads[0]["scale"] > 0 and grads[0]["linear"] > 0
    assert grads[0]["conv"] == 0 and grads[0]["edges"] == 0
    assert grads[1]["conv"] > 0 and grads[1]["edges"] > 0 and router.graph_scale.abs().sum() > 0


def test_copy_from_moh_checks_the_routers_match():
    with pytest.raises(
        ValueError, match=r"MoHRouter has \(d_model, num_heads, num_shared, top_k\)"
    ):
        GraphRouter(D, H, 1, 2).copy_from_moh(MoHRouter(D, H, 2, 2))
    with pytest.raises(ValueError, match="parameter-free MoHRouter has no weights"):
        GraphRouter(D, H, 1, 2).copy_from_moh(MoHRouter(D, H, 1, 2, parameter_free=True))


@pytest.mark.parametrize("propagation", ["dense", "edges"])
def test_permuting_head_labels_permutes_routing(propagation):
    num_shared = 0  # a permutation must map routed heads to routed heads
    graph = HeadGraph.from_edges(
        H, [(0, 1), (1, 2), (2, 3), (4, 0), (5, 2)], [1.0, 2.0, 0.5, 1.5, 3.0]
    )
    router = GraphRouter(D, H, num_shared, 3, graph, feature_dim=FEAT, graph_scale_init=1.0)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])  # new head i is old head perm[i]
    inverse = torch.argsort(perm)
    new_graph = HeadGraph(H, inverse[graph.edge_index], graph.edge_weight)
    permuted = GraphRouter(D, H, num_shared, 3, new_graph, feature_dim=FEAT, graph_scale_init=1.0)
    for layer in (*router.message_passing.layers, *permuted.message_passing.layers):
        layer.propagation = propagation
    permuted.load_state_dict(
        {k: v for k, v in router.state_dict().items() if not k.startswith("graph.")}, strict=False
    )
    with torch.no_grad():  # every per-head parameter follows the permutation
        w = router.head_proj.weight.reshape(H, FEAT, FEAT)[perm]
        permuted.head_proj.weight.copy_(w.reshape(H * FEAT, FEAT))
        permuted.head_embedding.copy_(router.head_embedding[perm])
        permuted.linear_gate.weight.copy_(router.linear_gate.weight[perm])
        permuted.graph_scale.copy_(router.graph_scale[perm])
    x = torch.randn(2, 5, D)
    a, b = router(x), permuted(x)
    torch.testing.assert_close(b.gates, a.gates[..., perm], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.head_states, a.head_states[..., perm, :], atol=1e-6, rtol=1e-5)


def score_jacobian(router: GraphRouter) -> torch.Tensor:
    """d score_i / d z0_j summed over features: (h, h)."""
    z0 = torch.randn(1, H, FEAT)
    jac = torch.autograd.functional.jacobian(
        lambda z: router.score(
            router.message_passing(z, router.graph.edge_index, router.graph.edge_weight)
        ).squeeze(-1),
        z0,
    )  # (1, h, 1, h, F)
    return jac[0, :, 0].abs().sum(-1)


def test_empty_graph_isolates_heads_connected_graph_mixes_them():
    empty = GraphRouter(D, H, 1, 2, HeadGraph.empty(H), feature_dim=FEAT)
    jac = score_jacobian(empty)
    assert torch.count_nonzero(jac - torch.diag(torch.diag(jac))) == 0
    ring = GraphRouter(D, H, 1, 2, HeadGraph.ring(H), feature_dim=FEAT, graph_layers=1)
    jac = score_jacobian(ring)
    assert jac[0, 1] > 0 and jac[0, H - 1] > 0  # neighbours speak to head 0
    assert jac[0, 3] == 0  # one hop does not reach the opposite head


@pytest.mark.parametrize("learnable", ["edge", "dense"])
def test_gradients_reach_edge_weights_and_head_embeddings(learnable):
    graph = HeadGraph.ring(H, learnable=learnable)
    attn = GoHAttention(D, H, 2, 2, graph, feature_dim=FEAT, graph_scale_init=1.0)
    out = attn(torch.randn(2, 5, D))
    (out.output.square().sum() + out.routing.load_balance_loss).backward()
    r = attn.router
    assert r.graph.raw_weight.grad is not None and r.graph.raw_weight.grad.abs().sum() > 0
    assert r.head_embedding.grad is not None and r.head_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("conv", ["gcn", "lightgcn", "graphconv"])
def test_routing_with_each_pyg_layer(conv):
    router = GraphRouter(D, H, 1, 2, HeadGraph.complete(H), feature_dim=FEAT, conv=conv)
    out = router(torch.randn(2, 4, D))
    assert out.gates.shape == (2, 4, H)
    assert out.active_heads.sum(-1).eq(3).all()
    assert out.head_states.shape == (2, 4, H, FEAT)
    if conv == "gcn":  # node features stay head-major: HeadGCNConv's GEMMs copy nothing
        assert out.head_states.movedim(-2, 0).is_contiguous()


def test_goh_models_route_every_layer_and_expose_graphs():
    cfg = dict(
        vocab_size=20, d_model=D, num_heads=H, num_layers=3, attention="goh", num_shared=1, top_k=2
    )
    lm = DecoderOnlyLM(ModelConfig(**cfg, graph="ring"))
    out = lm(torch.randint(0, 20, (2, 6)))
    assert len(out.routing) == 3 and all(r.head_states is not None for r in out.routing)
    graphs = lm.head_graphs()
    assert len(graphs) == 3 and len({id(g) for g in graphs}) == 3
    shared = DecoderOnlyLM(ModelConfig(**cfg, share_graph=True))
    assert len({id(g) for g in shared.head_graphs()}) == 1
    seq2seq = Transformer(ModelConfig(**cfg, num_decoder_layers=2))
    out = seq2seq(torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (2, 4)))
    assert len(out.routing) == 3 + 2 * 2  # encoder self, decoder self + cross
    assert len(seq2seq.head_graphs()) == 7


def test_head_states_travel_through_depth():
    cfg = ModelConfig(
        vocab_size=20,
        d_model=D,
        num_heads=H,
        num_layers=2,
        attention="goh",
        num_shared=1,
        top_k=2,
        carry_head_states=True,
        graph_scale_init=1.0,  # the graph branch (which reads the carried states) is on
    )
    lm = DecoderOnlyLM(cfg)
    first, second = (layer.self_attn.router for layer in lm.decoder.layers)
    assert first.carry_proj is None and second.carry_proj is not None
    tokens = torch.randint(0, 20, (2, 6))
    before = lm(tokens).routing[1].gates
    with torch.no_grad():
        second.carry_proj.weight.normal_()
    after = lm(tokens)
    assert not torch.allclose(before, after.routing[1].gates)  # layer 1 reads layer 0's states
    after.aux_loss.backward()
    assert second.carry_proj.weight.grad.abs().sum() > 0


def test_goh_lm_cache_matches_full_forward():
    lm = DecoderOnlyLM(
        ModelConfig(
            vocab_size=20,
            d_model=D,
            num_heads=H,
            num_layers=2,
            attention="goh",
            num_shared=1,
            top_k=2,
            carry_head_states=True,
        )
    ).eval()
    tokens = torch.randint(0, 20, (2, 8))
    full = lm(tokens).logits
    first = lm(tokens[:, :5], use_cache=True)
    rest = lm(tokens[:, 5:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(
        torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=1e-5
    )


def test_goh_lm_learns_copy_task():
    loss, acc = train_copy("goh", num_shared=1, top_k=2)
    assert loss < 0.3 and acc > 0.9, (loss, acc)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: GraphRouter(D, H, 1, 2, HeadGraph.ring(4)),
            r"graph has 4 heads, attention has num_heads=6",
        ),
        (
            lambda: GraphRouter(D, H, 1, 2, HeadGraph.ring(H, num_shared=2)),
            r"graph marks 2 shared heads, router has num_shared=1",
        ),
        (lambda: GraphRouter(D, H, 1, 6), r"top_k \(6\) must be in \[1, routed heads \(5\)"),
        (lambda: GraphRouter(D, H, 1, 2, feature_dim=0), r"feature_dim must be >= 1, got 0"),
    ],
)
def test_bad_router_config_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_head_states_without_carry_raise():
    router = GraphRouter(D, H, 1, 2)
    with pytest.raises(ValueError, match="carry_head_states=False"):
        router(torch.randn(1, 2, D), head_states=torch.randn(1, 2, H, 16))


def test_models_take_a_custom_graph_template():
    template = HeadGraph.from_edges(H, [(0, 1), (2, 3)], [0.5, 2.0], learnable="edge", num_shared=1)
    cfg = dict(
        vocab_size=20, d_model=D, num_heads=H, num_layers=2, attention="goh", num_shared=1, top_k=2
    )
    lm = DecoderOnlyLM(ModelConfig(**cfg), graph=template)
    a, b = lm.head_graphs()
    assert a is not template and a is not b  # one copy per block
    torch.testing.assert_close(a.adjacency(), template.adjacency())
    shared = DecoderOnlyLM(ModelConfig(**cfg, share_graph=True), graph=template)
    assert all(g is template for g in shared.head_graphs())
    with pytest.raises(ValueError, match=r"graph has 4 heads, config has num_heads=6"):
        DecoderOnlyLM(ModelConfig(**cfg), graph=HeadGraph.ring(4))
    with pytest.raises(ValueError, match=r"graph is only used with attention='goh', not 'mha'"):
        DecoderOnlyLM(ModelConfig(vocab_size=20, d_model=D, num_heads=H), graph=template)


@pytest.mark.parametrize("num_shared", [0, 2])
def test_reset_to_uniform_with_all_heads_is_dense_attention(num_shared):
    from torch import nn

    ref = nn.MultiheadAttention(D, H, batch_first=True)
    goh = GoHAttention(D, H, num_shared, H - num_shared, HeadGraph.ring(H), feature_dim=FEAT)
    goh.copy_from_torch(ref)
    goh.router.reset_to_uniform()
    x = torch.randn(2, 5, D)
    out = goh(x)
    torch.testing.assert_close(out.routing.gates, torch.ones(2, 5, H))
    torch.testing.assert_close(
        out.output, ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5
    )
    out.output.sum().backward()
    assert goh.router.linear_gate.weight.grad.abs().sum() > 0  # routing can learn from here
    assert goh.router.graph_scale.grad.abs().sum() > 0


def test_copy_from_torch_checks_sizes():
    from torch import nn

    with pytest.raises(
        ValueError, match=r"module has embed_dim=32, num_heads=4; this has d_model=24"
    ):
        GoHAttention(D, H, 1, 2).copy_from_torch(nn.MultiheadAttention(32, 4))

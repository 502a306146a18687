"""The token-conditional head graph (issue 33): HeadGATv2Conv equals PyG's GATv2Conv run
on one graph per token, outputs and gradients, and the graph-router built on it routes
with attention over heads that differs from token to token."""

import pytest
import torch
from torch_geometric.nn import GATv2Conv

from graphheads import DecoderOnlyLM, GraphRouter, HeadGraph, ModelConfig
from graphheads.gat import HeadGATv2Conv

H, F = 5, 6


def graph():  # a directed graph with a self-loop (replaced) and a head with no edges
    edges = [(0, 1), (1, 0), (1, 2), (2, 2), (3, 1), (0, 3)]
    return HeadGraph.from_edges(H, edges, [0.5, 1.5, 2.0, 3.0, 0.7, 1.1], learnable="edge")


def test_equals_pyg_gatv2_on_one_graph_per_token():
    torch.manual_seed(0)
    ours = HeadGATv2Conv(F)
    with torch.no_grad():  # biases away from their zero init, so they are checked too
        for p in (ours.bias, ours.lin_l.bias, ours.lin_r.bias):
            p.normal_()
    ref = GATv2Conv(F, F, edge_dim=1)
    ref.load_state_dict(ours.state_dict())
    g = graph()
    z = torch.randn(3, 4, H, F)
    z_ours, z_ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = ours(z_ours, g.edge_index, g.edge_weight)
    n = 3 * 4  # tokens: PyG's batch of graphs, one per token
    edge_index = torch.cat([g.edge_index + k * H for k in range(n)], dim=1)
    out_ref = ref(z_ref.reshape(n * H, F), edge_index, g.edge_weight.repeat(n)).view(3, 4, H, F)
    torch.testing.assert_close(out, out_ref)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    torch.testing.assert_close(z_ours.grad, z_ref.grad)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, msg=name)
    # the learnable edge weights get gradients through the attention logits
    assert g.raw_weight.grad is not None and g.raw_weight.grad.abs().sum() > 0


def test_attention_is_per_token_and_follows_the_graph():
    torch.manual_seed(0)
    conv, g = HeadGATv2Conv(F), graph()
    alpha = conv.attention(torch.randn(2, 3, H, F), g.edge_index, g.edge_weight)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 3, H))  # a softmax per head
    allowed = torch.eye(H, dtype=torch.bool)
    allowed[g.edge_index[1], g.edge_index[0]] = True  # edge j -> i: row i, column j
    assert (alpha[..., ~allowed] == 0).all() and (alpha[..., allowed] > 0).all()
    assert not torch.allclose(alpha[0, 0], alpha[1, 2])  # differs from token to token
    torch.testing.assert_close(alpha[..., 4, 4], torch.ones(2, 3))  # no edges: itself only


def test_graph_router_and_models_take_gatv2():
    router = GraphRouter(16, H, 1, 2, HeadGraph.complete(H), feature_dim=F, conv="gatv2")
    out = router(torch.randn(2, 4, 16))
    assert out.head_states.shape == (2, 4, H, F) and out.active_heads.sum(-1).eq(3).all()
    config = ModelConfig(vocab_size=20, d_model=16, num_heads=4, num_layers=1, attention="goh",
                         num_shared=1, top_k=2, graph_conv="gatv2",
                         graph_scale_init=1.0)  # fmt: skip
    model = DecoderOnlyLM(config)
    conv = model.decoder.layers[0].self_attn.router.message_passing.layers[0]
    assert isinstance(conv, HeadGATv2Conv)
    model(torch.randint(0, 20, (2, 5))).logits.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (
            "graph",
            "circle",
            r"graph must be one of \['complete', 'ring', 'star', 'grid', 'empty'\]",
        ),
        ("graph_learnable", "full", r"graph_learnable must be one of \['fixed', 'edge', 'dense'\]"),
        ("graph_conv", "gat", r"graph_conv must be one of \['gcn', 'gatv2', 'lightgcn', "),
    ],
)
def test_model_config_refuses_unknown_graph_settings_when_built(key, value, match):
    """They were accepted and failed only when the model was built."""
    with pytest.raises(ValueError, match=match):
        ModelConfig(vocab_size=10, attention="goh", num_shared=1, **{key: value})


def test_gatv2_with_a_dense_graph_is_refused_and_autocast_keeps_the_dtype():
    """A dense learnable graph makes every pair an edge, and a weight cannot switch an
    edge off in GATv2: it would silently be the complete graph. Under autocast the
    layer's output kept fp32 (an fp32 edge term and bias promoted the bf16 features)."""
    with pytest.raises(ValueError, match=r"graph_learnable='dense' .* would be the complete graph"):
        ModelConfig(vocab_size=10, attention="goh", num_shared=1, graph_conv="gatv2",
                    graph_learnable="dense")  # fmt: skip
    conv, g = HeadGATv2Conv(F), graph()
    z = torch.randn(2, 3, H, F)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(z, g.edge_index, g.edge_weight)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), conv(z, g.edge_index, g.edge_weight),
                               atol=0.1, rtol=0.05)  # fmt: skip

"""route_heads: graph-routed heads in plain PyTorch models, checked against the originals."""

import copy

import pytest
import torch
from torch import nn

from graphheads import HeadGraph, record_routing, set_top_k
from graphheads.integrations.pytorch import RoutedMultiheadAttention, route_heads

D, H = 32, 4


def encoder(batch_first: bool) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        D, H, dim_feedforward=64, dropout=0.0, batch_first=batch_first
    )
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


@pytest.mark.parametrize("router", ["goh", "moh"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_routed_encoder_with_all_heads_on_equals_the_original(batch_first, train, router):
    original = encoder(batch_first).train(train)
    routed = route_heads(encoder(batch_first), num_shared=1, top_k=H - 1, router=router)
    routed.train(train)
    assert sum(isinstance(m, RoutedMultiheadAttention) for m in routed.modules()) == 2
    x = torch.randn(3, 7, D) if batch_first else torch.randn(7, 3, D)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.set_grad_enabled(train):  # eval + no grad: torch's own fast path runs
        for kwargs in ({}, {"src_key_padding_mask": padding}, {"mask": causal, "is_causal": True}):
            want, got = original(x, **kwargs), routed(x, **kwargs)
            keep = ~padding if batch_first else ~padding.T  # padded rows: undefined
            torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)


def test_routed_attention_is_a_drop_in_for_multihead_attention():
    torch.manual_seed(0)
    original = nn.MultiheadAttention(D, H, batch_first=True)
    routed = RoutedMultiheadAttention.from_torch(original, num_shared=0, top_k=H)
    q, kv = torch.randn(2, 5, D), torch.randn(2, 6, D)
    mask = torch.rand(2 * H, 5, 6) > 0.8
    for kwargs in ({}, {"attn_mask": mask}, {"average_attn_weights": False}):
        want, want_w = original(q, kv, kv, **kwargs)
        got, got_w = routed(q, kv, kv, **kwargs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
    unbatched = routed(q[0], kv[0], kv[0], need_weights=False)
    assert unbatched[1] is None
    torch.testing.assert_close(unbatched[0], original(q[0], kv[0], kv[0])[0], atol=1e-5, rtol=1e-5)
    # the original state_dict keys load; only the router is new
    fresh = RoutedMultiheadAttention.from_torch(nn.MultiheadAttention(D, H), num_shared=0, top_k=H)
    missing, unexpected = fresh.load_state_dict(original.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("router.") for k in missing)
    assert isinstance(routed, nn.MultiheadAttention)


def test_fewer_heads_gate_outputs_and_top_k_can_change():
    model = route_heads(encoder(True), num_shared=1, top_k=1, graph=HeadGraph.ring(H))
    x = torch.randn(2, 6, D)
    with record_routing(model) as routing:
        model(x)
    assert len(routing) == 2
    assert all(r.active_heads.sum(-1).eq(2).all() for r in routing)  # 1 shared + top-1
    original = encoder(True).eval()
    model.eval()
    with torch.no_grad():  # torch's fused inference path must not skip the routing
        fast, want = model(x), original(x)
    assert (fast - want).abs().max() > 1e-3
    torch.testing.assert_close(fast, model.train()(x), atol=1e-5, rtol=1e-5)
    assert set_top_k(model, H - 1) == 2
    with record_routing(model) as routing:
        model(x)
    assert all(r.active_heads.all() for r in routing)
    with pytest.raises(ValueError, match=r"set_top_k: top_k \(4\) must be in \[1, routed heads"):
        set_top_k(model, H)
    assert all(m.router.top_k == H - 1 for m in model.modules() if hasattr(m, "router"))


def test_route_heads_refuses_what_it_cannot_route_and_changes_nothing():
    with pytest.raises(ValueError, match=r"Linear holds no nn\.MultiheadAttention"):
        route_heads(nn.Linear(3, 3), num_shared=0, top_k=1)
    model = encoder(True)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"top_k \(9\) must be in \[1, routed heads \(3\)"):
        route_heads(model, num_shared=1, top_k=9)
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(ValueError, match="router must be 'goh' or 'moh', got 'mha'"):
        route_heads(model, num_shared=1, top_k=1, router="mha")
    with pytest.raises(ValueError, match="add_bias_kv and add_zero_attn are not supported"):
        route_heads(nn.MultiheadAttention(D, H, add_bias_kv=True), num_shared=0, top_k=H)


def test_set_top_k_keeps_a_graphheads_config_in_step():
    from graphheads import DecoderOnlyLM, ModelConfig

    config = ModelConfig(
        vocab_size=11, d_model=16, num_heads=4, attention="goh", num_shared=1, top_k=1
    )
    model = DecoderOnlyLM(config)
    set_top_k(model, 3)
    assert model.config.top_k == 3
    assert DecoderOnlyLM(model.config).load_state_dict(model.state_dict())  # rebuilds


class TorchvisionStyleViT(nn.Module):
    """The structure of torchvision's VisionTransformer (which cannot be installed here:
    its PyPI wheel needs the CUDA build of PyTorch): patch projection, class token,
    pre-norm blocks whose self-attention is nn.MultiheadAttention(batch_first=True)
    called as attention(x, x, x, need_weights=False)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.self_attention = nn.MultiheadAttention(D, H, dropout=0.0, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(D, 64), nn.GELU(), nn.Linear(64, D))

        def forward(self, x):
            y = self.ln_1(x)
            x = x + self.self_attention(y, y, y, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    def __init__(self):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, D, kernel_size=4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, D))
        self.blocks = nn.Sequential(self.Block(), self.Block())
        self.heads = nn.Linear(D, 10)

    def forward(self, images):
        x = self.conv_proj(images).flatten(2).transpose(1, 2)  # (b, patches, D)
        x = torch.cat([self.class_token.expand(x.size(0), -1, -1), x], dim=1)
        return self.heads(self.blocks(x)[:, 0])


@pytest.mark.parametrize("router", ["goh", "moh"])
def test_routed_vision_transformer_equals_the_original(router):
    torch.manual_seed(0)
    original = TorchvisionStyleViT().eval()
    routed = TorchvisionStyleViT()
    routed.load_state_dict(original.state_dict())
    route_heads(routed, num_shared=2, top_k=H - 2, router=router).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(routed(images), original(images), atol=1e-5, rtol=1e-5)
        with record_routing(routed) as routing:
            routed(images)
    assert [tuple(r.gates.shape) for r in routing] == [(3, 17, H)] * 2  # class token + 16


def test_a_default_encoder_in_eval_with_padding_runs_the_routed_heads():
    """Defect 6: nn.TransformerEncoder's defaults (enable_nested_tensor=True) packed the
    padded batch into a nested tensor in eval/no-grad, which the routed forward cannot
    take ("NestedTensorImpl doesn't support sizes"); and the routed copies of an eval
    model's modules were in training mode (dropout on)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)  # dropout 0.1
    original = nn.TransformerEncoder(layer, 2).eval()
    model = route_heads(copy.deepcopy(original), num_shared=1, top_k=3)  # every head on
    assert not any(m.training for m in model.modules())
    x = torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    with torch.no_grad():
        got = model(x, src_key_padding_mask=padding)
        want = original(x, src_key_padding_mask=padding)  # PyTorch's nested fast path
    torch.testing.assert_close(got[~padding], want[~padding], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("average", [True, False])
def test_attention_weights_come_from_one_attention_computation(monkeypatch, average):
    """Defect 6: need_weights=True ran SDPA for the output and the scores again for the
    weights. Now the weights give the output; both equal nn.MultiheadAttention's."""
    import graphheads.integrations.pytorch as routed_module

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    routed = RoutedMultiheadAttention.from_torch(mha, num_shared=1, top_k=3)
    x = torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA ran although the weights were computed")

    monkeypatch.setattr(routed_module.F, "scaled_dot_product_attention", no_sdpa)
    out, weights = routed(x, x, x, key_padding_mask=padding, average_attn_weights=average)
    monkeypatch.undo()
    want_out, want_weights = mha(x, x, x, key_padding_mask=padding, average_attn_weights=average)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-5)

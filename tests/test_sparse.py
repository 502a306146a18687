"""The sparse execution path equals the dense masked path: outputs and gradients."""

import copy

import pytest
import torch

from graphheads import DecoderOnlyLM, GoHAttention, HeadGraph, ModelConfig, MoHAttention
from graphheads.rotary import RotaryEmbedding

D, H = 32, 8


def make(kind: str, num_shared: int, top_k: int, **kw):
    torch.manual_seed(0)
    if kind == "moh":
        attn = MoHAttention(D, H, num_shared, top_k, **kw)
        with torch.no_grad():
            for p in attn.router.parameters():
                p.normal_()  # distinct routing per token
    else:
        attn = GoHAttention(
            D, H, num_shared, top_k, HeadGraph.ring(H, learnable="edge"), feature_dim=8, **kw
        )
        with torch.no_grad():
            attn.router.score.weight.normal_()
    return attn


def both_paths(attn, *inputs, **kwargs):
    """Outputs and gradients (inputs and parameters) of the dense and sparse paths."""
    results = []
    for execution in ("dense", "sparse"):
        module = copy.deepcopy(attn)
        module.execution = execution
        xs = [x.clone().requires_grad_(True) for x in inputs]
        out = module(*xs, **kwargs)
        (
            out.output * torch.linspace(-1, 1, out.output.numel()).view_as(out.output)
        ).sum().backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        results.append((out, [x.grad for x in xs], grads))
    return results


def assert_same(results):
    (dense, dgrad_x, dgrad_p), (sparse, sgrad_x, sgrad_p) = results
    torch.testing.assert_close(sparse.output, dense.output, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sparse.routing.gates, dense.routing.gates)
    for a, b in zip(sgrad_x, dgrad_x, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert set(sgrad_p) == set(dgrad_p)
    for name in dgrad_p:
        torch.testing.assert_close(sgrad_p[name], dgrad_p[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["moh", "goh"])
@pytest.mark.parametrize(("num_shared", "top_k"), [(0, 4), (2, 3), (2, 1), (3, 5)])
def test_causal_self_attention(kind, num_shared, top_k):
    attn = make(kind, num_shared, top_k)
    assert_same(both_paths(attn, torch.randn(3, 11, D), is_causal=True))


@pytest.mark.parametrize("kind", ["moh", "goh"])
def test_key_padding_float_and_per_head_masks(kind):
    attn = make(kind, 2, 3)
    x = torch.randn(2, 9, D)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 7:] = True
    assert_same(both_paths(attn, x, is_causal=True, key_padding_mask=pad))
    assert_same(both_paths(attn, x, attn_mask=torch.randn(9, 9)))
    per_head = torch.rand(2 * H, 9, 9) > 0.6
    per_head[..., 0] = False  # every row sees key 0
    assert_same(both_paths(attn, x, attn_mask=per_head))


@pytest.mark.parametrize("chunk_rows", [1, 3])
def test_chunked_rows_with_causal_key_limits(chunk_rows):
    attn = make("goh", 1, 3)
    attn.sparse_chunk_rows = chunk_rows  # many chunks, each reading only its visible keys
    x = torch.randn(2, 17, D)
    assert_same(both_paths(attn, x, is_causal=True))
    pad = torch.zeros(2, 17, dtype=torch.bool)
    pad[0, 15:] = True
    assert_same(both_paths(attn, x, is_causal=True, key_padding_mask=pad))


def test_padding_keeps_the_causal_key_limit_and_is_never_expanded(monkeypatch):
    """With a padding mask the chunks still read only the keys up to their last row, also
    inside a model (the stack hands the sparse path its masks unmerged)."""
    import graphheads.sparse

    seen = []
    kernel = graphheads.sparse.scaled_dot_product_attention
    monkeypatch.setattr(
        graphheads.sparse,
        "scaled_dot_product_attention",
        lambda q, k, v, **kw: seen.append((k.size(-2), kw["attn_mask"])) or kernel(q, k, v, **kw),
    )
    attn = make("goh", 1, 3)
    attn.execution = "sparse"
    attn.sparse_chunk_rows = 4
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        attn(x, is_causal=True)
        plain = [s for s, _ in seen]
        seen.clear()
        attn(x, is_causal=True, key_padding_mask=torch.zeros(2, 17, dtype=torch.bool))
    assert [s for s, _ in seen] == plain and min(plain[1:]) < 17
    config = ModelConfig(
        vocab_size=30,
        d_model=D,
        num_heads=H,
        num_layers=1,
        attention="goh",
        num_shared=1,
        top_k=3,
        execution="sparse",
    )
    model = DecoderOnlyLM(config).eval()
    model.decoder.layers[0].self_attn.sparse_chunk_rows = 4
    tokens = torch.randint(0, 30, (2, 17))
    pad = torch.zeros(2, 17, dtype=torch.bool)
    pad[0, :3] = True
    lengths = []
    for mask in (None, pad):
        seen.clear()
        with torch.no_grad():
            model(tokens, key_padding_mask=mask)
        lengths.append([s for s, _ in seen])
    assert lengths[1] == lengths[0] and min(lengths[0]) < 17


def test_cross_attention():
    attn = make("goh", 1, 2)
    q, memory = torch.randn(2, 5, D), torch.randn(2, 13, D)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[0, 10:] = True
    assert_same(both_paths(attn, q, memory, memory, key_padding_mask=pad))


def test_parameter_free_router():
    attn = make("moh", 2, 3, parameter_free=True)
    assert_same(both_paths(attn, torch.randn(2, 7, D), is_causal=True))


def test_sparse_decoding_with_cache_matches_full_pass():
    config = ModelConfig(
        vocab_size=30, d_model=D, num_heads=H, num_layers=2, attention="goh", num_shared=2, top_k=2
    )
    dense = DecoderOnlyLM(config).eval()
    sparse = DecoderOnlyLM(ModelConfig(**{**config.__dict__, "execution": "sparse"})).eval()
    sparse.load_state_dict(dense.state_dict())
    assert all(layer.self_attn.execution == "sparse" for layer in sparse.decoder.layers)
    tokens = torch.randint(0, 30, (2, 12))
    torch.testing.assert_close(sparse(tokens).logits, dense(tokens).logits, atol=1e-5, rtol=1e-4)
    prompt = tokens[:, :4]
    torch.testing.assert_close(sparse.generate(prompt, 8), dense.generate(prompt, 8))


@pytest.mark.parametrize("kind", ["moh", "goh"])
def test_rotary_positions_on_the_sparse_path(kind):
    """Issue 32: the sparse path refused rotary positions at forward, after the router ran;
    it now gathers the active heads' rotated queries. With a cache of earlier tokens the
    new queries rotate to the positions that follow it."""
    attn = make(kind, 2, 3, rotary=RotaryEmbedding(D // H, 64))
    x = torch.randn(2, 11, D)
    assert_same(both_paths(attn, x, is_causal=True))
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, :3] = True
    assert_same(both_paths(attn, x, is_causal=True, key_padding_mask=pad))
    with torch.no_grad():
        prefix = attn(x[:, :6], is_causal=True, use_cache=True).cache
    assert_same(both_paths(attn, x[:, 6:], is_causal=True, kv_cache=prefix))


def test_llama_block_runs_sparse_and_generates_as_dense():
    """``ModelConfig(block="llama", execution="sparse")`` was refused; now it trains and
    decodes (ragged prompts too) as the dense path does."""
    config = ModelConfig(
        vocab_size=30,
        d_model=D,
        num_heads=H,
        num_layers=2,
        block="llama",
        attention="goh",
        num_shared=2,
        top_k=2,
    )
    torch.manual_seed(0)
    dense = DecoderOnlyLM(config)
    sparse = DecoderOnlyLM(config.with_overrides(execution="sparse"))
    sparse.load_state_dict(dense.state_dict())
    tokens = torch.randint(0, 30, (2, 12))
    out = [m(tokens) for m in (dense, sparse)]
    torch.testing.assert_close(out[1].logits, out[0].logits, atol=1e-5, rtol=1e-4)
    weights = torch.randn_like(out[0].logits)
    losses = [(o.logits * weights).sum() + o.aux_loss for o in out]
    torch.testing.assert_close(losses[1], losses[0])
    grads = [torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
             for loss, m in zip(losses, (dense, sparse), strict=True)]  # fmt: skip
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    prompt = tokens[:, :5].clone()
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, :2] = True
    dense.eval(), sparse.eval()
    torch.testing.assert_close(
        sparse.generate(prompt, 6, key_padding_mask=pad),
        dense.generate(prompt, 6, key_padding_mask=pad),
    )


def test_bad_execution_raises():
    with pytest.raises(
        ValueError, match=r"execution must be 'auto', 'dense' or 'sparse', got 'fast'"
    ):
        MoHAttention(D, H, 2, 2, execution="fast")
    with pytest.raises(
        ValueError, match=r"execution must be 'auto', 'dense' or 'sparse', got 'fast'"
    ):
        ModelConfig(vocab_size=10, execution="fast")

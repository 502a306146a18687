import pytest
import torch
from torch import nn
from torch_reference import load_torch_mha

from graphheads import MultiHeadAttention, scaled_dot_product_attention

D, H = 32, 4


def _pair(dropout: float = 0.0) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    ref = nn.MultiheadAttention(D, H, batch_first=True, dropout=dropout)
    mine = MultiHeadAttention(D, H, dropout=dropout)
    load_torch_mha(mine, ref)
    return mine, ref


def _compare(mine, ref, query, key, value, **masks):
    inputs_m = [t.clone().requires_grad_(True) for t in (query, key, value)]
    inputs_r = [t.clone().requires_grad_(True) for t in (query, key, value)]
    out_m = mine(*inputs_m, **masks).output
    out_r, _ = ref(*inputs_r, need_weights=False, **masks)
    torch.testing.assert_close(out_m, out_r, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out_m)
    out_m.backward(grad)
    out_r.backward(grad)
    for a, b in zip(inputs_m, inputs_r, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_self_attention_matches_torch(fused):
    mine, ref = _pair()
    mine.fused_attention = fused
    x = torch.randn(2, 7, D)
    _compare(mine, ref, x, x, x)


def test_cross_attention_with_key_padding_matches_torch():
    mine, ref = _pair()
    q, kv = torch.randn(3, 5, D), torch.randn(3, 9, D)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, 6:] = True
    pad[2, 1:3] = True
    _compare(mine, ref, q, kv, kv, key_padding_mask=pad)


@pytest.mark.parametrize("float_mask", [False, True])
def test_causal_mask_matches_torch(float_mask):
    mine, ref = _pair()
    x = torch.randn(2, 6, D)
    mask = nn.Transformer.generate_square_subsequent_mask(6)  # float, -inf above diagonal
    if not float_mask:
        mask = torch.isinf(mask)  # bool, True = forbidden
    _compare(mine, ref, x, x, x, attn_mask=mask)
    # is_causal gives the same as the explicit mask
    torch.testing.assert_close(mine(x, is_causal=True).output, mine(x, attn_mask=mask).output)


def test_per_head_3d_mask_and_padding_matches_torch():
    mine, ref = _pair()
    x = torch.randn(2, 5, D)
    mask = torch.rand(2 * H, 5, 5) > 0.7
    mask[..., 0] = False  # every query sees at least one key
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    pad[1, 0] = False
    _compare(mine, ref, x, x, x, attn_mask=mask, key_padding_mask=pad)


def test_fused_and_plain_kernels_agree():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    bias = torch.randn(1, 1, 5, 7)
    allowed = torch.rand(5, 7) > 0.3
    allowed[:, 0] = True
    for mask in (None, bias, allowed):
        torch.testing.assert_close(
            scaled_dot_product_attention(q, k, v, attn_mask=mask, fused_attention=True),
            scaled_dot_product_attention(q, k, v, attn_mask=mask, fused_attention=False),
        )
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k[..., :5, :], v[..., :5, :], is_causal=True),
        scaled_dot_product_attention(
            q, k[..., :5, :], v[..., :5, :], is_causal=True, fused_attention=False
        ),
    )


def test_cached_attention_equals_full_causal():
    mine, _ = _pair()
    x = torch.randn(2, 6, D)
    full = mine(x, is_causal=True).output
    first = mine(x[:, :4], is_causal=True, use_cache=True)
    assert first.cache is not None and first.cache.length == 4
    rest = mine(x[:, 4:], is_causal=True, kv_cache=first.cache, use_cache=True)
    assert rest.cache.length == 6
    torch.testing.assert_close(torch.cat([first.output, rest.output], 1), full)


def test_repr_names_the_sizes():
    assert "d_model=32, num_heads=4" in repr(MultiHeadAttention(D, H))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 30, "num_heads": 4}, r"d_model \(30\) must be divisible by num_heads \(4\)"),
        ({"d_model": 32, "num_heads": 0}, r"num_heads \(0\) must be positive"),
        ({"d_model": 32, "num_heads": 4, "dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)


def test_bad_shapes_raise():
    mha = MultiHeadAttention(D, H)
    with pytest.raises(
        ValueError, match=r"query must have shape \(batch, tokens, 32\), got \(2, 5, 16\)"
    ):
        mha(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"attn_mask has shape \(4, 4\); expected \(5, 5\)"):
        mha(torch.randn(2, 5, D), attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 4\); expected"):
        mha(torch.randn(2, 5, D), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"batch/length mismatch"):
        mha(torch.randn(2, 5, D), torch.randn(2, 6, D), torch.randn(2, 7, D))


def test_merged_bias_can_be_passed_back_in_and_bad_shapes_are_named():
    from graphheads.attention import build_attention_bias

    def bias(**kw):
        args = dict(batch_size=2, num_heads=4, query_len=3, key_len=5, attn_mask=None,
                    key_padding_mask=None, is_causal=False, dtype=torch.float32,
                    device=torch.device("cpu"))  # fmt: skip
        return build_attention_bias(**{**args, **kw})

    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    merged = bias(key_padding_mask=padding, is_causal=True)  # (2, 1, 3, 5)
    assert merged.shape == (2, 1, 3, 5)
    torch.testing.assert_close(bias(attn_mask=merged), merged)  # passes through unchanged
    assert bias(attn_mask=merged[:, :, :1]).shape == (2, 1, 1, 5)  # one row for all queries
    with pytest.raises(ValueError, match=r"attn_mask has shape \(2, 3, 3, 5\); expected"):
        bias(attn_mask=torch.zeros(2, 3, 3, 5))
    assert bias(is_causal=True, query_len=1) is None  # one query at the end sees every key


@pytest.mark.parametrize("attention", ["mha", "moh", "goh"])
def test_the_plain_math_path_equals_the_fused_one_with_left_padding(attention):
    """A left-padded query sees no key at all: the fused kernel gives 0 there, the plain
    softmax over -inf alone gave NaN, which the next layer spread to every real token."""
    from graphheads import DecoderOnlyLM, ModelConfig

    routed = {"num_shared": 1, "top_k": 2} if attention != "mha" else {}
    config = ModelConfig(vocab_size=20, d_model=D, num_heads=H, num_layers=2,
                         attention=attention, **routed)  # fmt: skip
    model = DecoderOnlyLM(config).eval()
    tokens = torch.randint(0, 20, (2, 6))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, :2] = True  # row 0 starts with two padding tokens
    fused = model(tokens, key_padding_mask=padding).logits
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.fused_attention = False
    plain = model(tokens, key_padding_mask=padding).logits
    assert plain.isfinite().all()
    torch.testing.assert_close(plain[~padding], fused[~padding], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, fused, atol=1e-5, rtol=1e-5)  # padding rows too

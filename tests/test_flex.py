"""The FlexAttention backend of the sparse path equals the dense path where it runs, and
the automatic choice picks it only there."""

import pytest
import torch

import graphheads.sparse
from graphheads import GoHAttention, HeadGraph, MoHAttention
from graphheads.flex import BLOCK_SIZE, choose_sparse_backend, flex_supported, routed_block_mask

CPU = torch.device("cpu")
NO_FLEX = flex_supported(CPU, grad=False, dropout_p=0.0)


def make(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "moh":
        attn = MoHAttention(32, 8, 2, 3, **kw)
        with torch.no_grad():
            for p in attn.router.parameters():
                p.normal_()  # distinct routing per token
        return attn.eval()
    attn = GoHAttention(32, 8, 2, 3, HeadGraph.ring(8, learnable="edge"), feature_dim=8, **kw)
    with torch.no_grad():
        attn.router.score.weight.normal_()
    return attn.eval()


@pytest.mark.slow
@pytest.mark.skipif(NO_FLEX is not None, reason=f"FlexAttention cannot run: {NO_FLEX}")
@pytest.mark.parametrize(
    ("kind", "masks", "t"),
    [
        ("goh", "causal", 600),  # several row chunks of the projections
        ("goh", "causal+left-padding", 200),  # padding tokens whose rows see no real key
        ("moh", "per-row float mask", 200),
    ],
)
def test_flex_backend_equals_the_dense_path(kind, masks, t):
    """CPU inference (compiled FlexAttention); lengths not a multiple of the block."""
    dense = make(kind, execution="dense")
    flex = make(kind, execution="sparse", sparse_backend="flex")
    flex.load_state_dict(dense.state_dict())
    x = torch.randn(2, t, 32)
    padding = torch.zeros(2, t, dtype=torch.bool)
    padding[1, :13] = True
    kwargs = {
        "causal": {"is_causal": True},
        "causal+left-padding": {"is_causal": True, "key_padding_mask": padding},
        "per-row float mask": {"attn_mask": torch.randn(t, t)},
    }[masks]
    calls = []
    real = graphheads.sparse.flex_routed_heads

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(graphheads.sparse, "flex_routed_heads", spy)
        out = flex(x, **kwargs).output
        expected = dense(x, **kwargs).output
    assert calls == [1]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


class _Chosen(Exception):
    pass


def _which_backend(monkeypatch, attn, x, grad: bool) -> str:
    def flex(*args, **kwargs):
        raise _Chosen("flex")

    def chunked(*args, **kwargs):
        raise _Chosen("chunked")

    monkeypatch.setattr(graphheads.sparse, "flex_routed_heads", flex)
    monkeypatch.setattr(graphheads.sparse, "_add_routed_heads", chunked)
    with torch.set_grad_enabled(grad), pytest.raises(_Chosen) as chosen:
        attn(x, is_causal=True)
    return str(chosen.value)


def test_auto_picks_flex_on_cuda_only_and_is_overridable(monkeypatch):
    cuda = torch.device("cuda")
    assert choose_sparse_backend("auto", CPU, grad=False, dropout_p=0.0) == "chunked"
    assert choose_sparse_backend("auto", CPU, grad=True, dropout_p=0.0) == "chunked"
    if flex_supported(cuda, grad=True, dropout_p=0.0) is None:  # a PyTorch with FlexAttention
        assert choose_sparse_backend("auto", cuda, grad=True, dropout_p=0.0) == "flex"
    assert choose_sparse_backend("auto", cuda, grad=True, dropout_p=0.1) == "chunked"
    # Inductor's CUDA FlexAttention refuses heads under 16 wide (seen on an H200)
    assert choose_sparse_backend("auto", cuda, grad=True, dropout_p=0.0, head_dim=8) == "chunked"
    narrow = flex_supported(cuda, grad=False, dropout_p=0.0, head_dim=8)
    assert narrow is not None and "at least 16 wide, got 8" in narrow
    assert choose_sparse_backend("flex", CPU, grad=False, dropout_p=0.0) == "flex"
    attn = make("goh", execution="sparse")  # the module asks the same function
    x = torch.randn(1, 16, 32)
    assert _which_backend(monkeypatch, attn, x, grad=False) == "chunked"
    attn.sparse_backend = "flex"
    assert _which_backend(monkeypatch, attn, x, grad=False) == "flex"


def test_forced_flex_where_it_cannot_run_names_the_reason():
    attn = make("moh", execution="sparse", sparse_backend="flex")
    with pytest.raises(ValueError, match="autograd"):
        attn(torch.randn(1, 8, 32), is_causal=True)  # CPU with autograd
    with pytest.raises(ValueError, match="sparse_backend"):
        make("moh", sparse_backend="triton")


def test_refused_backends_are_refused_before_any_attention(count_calls):
    """A bad backend name, or FlexAttention where it cannot run, raises before the shared
    heads attend (no work thrown away)."""
    calls = count_calls(graphheads.sparse, "scaled_dot_product_attention")
    b, t, h, e = 1, 8, 4, 8
    d = h * e
    x = torch.randn(b, t, d, requires_grad=True)  # autograd on CPU: flex cannot run
    kv = torch.randn(b, h, t, e)
    routed = torch.zeros(b, t, h - 1)
    routed[..., 0] = 1.0
    args = (x, kv, kv, torch.ones(b, t, h), routed)
    weights = dict(q_weight=torch.randn(d, d), q_bias=None, out_weight=torch.randn(d, d))
    for backend, match in (("bogus", "'bogus'"), ("flex", "autograd")):
        with pytest.raises(ValueError, match=match):
            graphheads.sparse.sparse_routed_attention(
                *args, **weights, out_bias=None, backend=backend
            )
    assert calls == []
    graphheads.sparse.sparse_routed_attention(*args, **weights, out_bias=None)
    assert len(calls) == 2  # the counter sees a run that goes ahead: shared + routed heads


def test_block_mask_visits_only_the_key_blocks_its_rows_reach():
    """Rows at positions 0..127 of one (sequence, head) need one key block; rows up to
    position 300 need three, of which the first is seen in full by every row."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    early = torch.arange(BLOCK_SIZE)  # positions 0..127
    late = torch.linspace(130, 300, BLOCK_SIZE).long()
    last = torch.stack([early, late]).view(1, 2, BLOCK_SIZE)  # (b, heads, rows)
    mask = routed_block_mask(last, key_len=512)
    partial = mask.kv_num_blocks.view(2).tolist()
    full = mask.full_kv_num_blocks.view(2).tolist()
    assert [p + f for p, f in zip(partial, full, strict=True)] == [1, 3]  # of 4 key blocks
    assert full == [0, 1]  # row 0 of head 0 sees only key 0; head 1's rows all see block 0
    assert mask.full_kv_indices[0, 1, 0, 0].item() == 0
    assert mask.kv_indices[0, 1, 0, :2].tolist() == [1, 2]

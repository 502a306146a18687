"""Whole models compile with torch.compile(fullgraph=True): a forward pass never syncs
with the host (no token-id check, no data-dependent Python branch) and equals eager."""

import pytest
import torch

from graphheads import DecoderOnlyLM, ModelConfig, Transformer
from graphheads.sparse import DECODE_MIN_SKIPPED_BYTES

KINDS = ["mha", "moh", "goh"]


def _config(attention: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=30,
        d_model=32,
        num_heads=4,
        num_layers=2,
        d_ff=64,
        max_seq_len=16,
        attention=attention,
        num_shared=1 if attention != "mha" else 0,
        norm_first=True,
    )


@pytest.mark.parametrize("attention", KINDS)
def test_decoder_only_lm_compiles_whole_and_equals_eager(attention):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DecoderOnlyLM(_config(attention)).eval()
    tokens = torch.randint(0, 30, (2, 9))
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # raises on a break
    for kwargs in ({}, {"key_padding_mask": padding}):
        got, expected = compiled(tokens, **kwargs), model(tokens, **kwargs)
        torch.testing.assert_close(got.logits, expected.logits)
        torch.testing.assert_close(got.aux_loss, expected.aux_loss)


@pytest.mark.parametrize("attention", KINDS)
def test_encoder_decoder_compiles_whole_and_equals_eager(attention):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(_config(attention)).eval()
    src, tgt = torch.randint(0, 30, (2, 7)), torch.randint(0, 30, (2, 5))
    src_padding = torch.zeros(2, 7, dtype=torch.bool)
    src_padding[0, 5:] = True
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(src, tgt, src_key_padding_mask=src_padding)
    expected = model(src, tgt, src_key_padding_mask=src_padding)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss)


@pytest.mark.slow
def test_goh_lm_compiles_with_inductor_and_trains_like_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DecoderOnlyLM(_config("goh"))
    tokens = torch.randint(0, 30, (2, 9))
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(tokens).logits.logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(tokens).logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["moh", "goh"])
def test_a_decoding_step_of_the_lm_compiles_whole_and_equals_the_full_forward(
    attention, monkeypatch
):
    """A one-token step with a preallocated cache, the routed decoding kernel included
    (threshold 0: every compiled step decodes routed), compiles with fullgraph=True and
    dynamic shapes, for two cache lengths, and gives the full forward's last logits."""
    monkeypatch.setitem(DECODE_MIN_SKIPPED_BYTES, "cpu", 0)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DecoderOnlyLM(_config(attention)).eval()
    tokens = torch.randint(0, 30, (2, 9))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        cache = model(tokens[:, :7], cache=model.decoder.empty_cache(2, 9), use_cache=True).cache
        for t in (7, 8):
            out = compiled(tokens[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            full = model(tokens[:, : t + 1]).logits[:, -1]
            torch.testing.assert_close(out.logits[:, 0], full, atol=1e-5, rtol=1e-4)

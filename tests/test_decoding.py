"""Decoding: the preallocated key/value cache, cross-attention keys of the memory computed
once, and routed decoding that reads only the active heads' caches."""

import copy

import pytest
import torch

import graphheads.routed
from graphheads import DecoderOnlyLM, GoHAttention, ModelConfig, MoHAttention, Transformer
from graphheads.types import KVCache

D, H, V = 32, 8, 40


def lm(attention: str, **kw) -> DecoderOnlyLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=V,
        d_model=D,
        num_heads=H,
        num_layers=2,
        d_ff=64,
        attention=attention,
        num_shared=2,
        top_k=2,
        **kw,
    )
    model = DecoderOnlyLM(config).eval()
    with torch.no_grad():  # distinct routing per token
        for name, p in model.named_parameters():
            if "router" in name and p.dim() > 1:
                p.normal_()
            if name.endswith("graph_scale"):
                p.fill_(1.0)
    return model


def test_preallocated_cache_writes_in_place_and_copies_when_branched():
    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    empty = KVCache.empty(2, 3, 6, 5)
    first = empty.append(k[:, :, :3], v[:, :, :3])
    second = first.append(k[:, :, 3:], v[:, :, 3:])
    assert second.key.data_ptr() == first.key.data_ptr() == empty.buffer.key.data_ptr()
    torch.testing.assert_close(second.key, k, rtol=0, atol=0)
    torch.testing.assert_close(second.value, v, rtol=0, atol=0)
    assert first.length == 3 and second.length == 4
    # appending to `first` again (a branch) must not overwrite `second`'s token 3
    other = torch.randn(2, 3, 1, 5)
    branch = first.append(other, other)
    assert branch.buffer is None and branch.key.data_ptr() != second.key.data_ptr()
    torch.testing.assert_close(branch.key[:, :, 3:], other, rtol=0, atol=0)
    torch.testing.assert_close(second.key, k, rtol=0, atol=0)
    # beyond the capacity, and under autograd, it concatenates
    full = second.append(torch.randn(2, 3, 3, 5), torch.randn(2, 3, 3, 5))
    assert full.length == 7 and full.buffer is None
    grad_k = torch.randn(2, 3, 1, 5, requires_grad=True)
    assert KVCache.empty(2, 3, 4, 5).append(grad_k, grad_k).key.requires_grad
    with pytest.raises(ValueError, match="capacity"):
        KVCache.empty(2, 3, 0, 5)


@pytest.mark.parametrize("attention", ["mha", "goh"])
@pytest.mark.parametrize("block", ["vaswani", "llama"])
def test_bf16_generate_writes_every_token_in_place(attention, block, monkeypatch):
    """Under bf16 autocast the keys are bf16 while the weights that sized the buffer are
    fp32: the buffer takes the keys' dtype, so no append copies the cache (before: every
    one did, through torch.cat, and the cache was promoted to fp32)."""
    model = lm(attention, block=block)
    appends: list[tuple[bool, torch.dtype]] = []
    real = KVCache.append

    def append(self, key, value):
        out = real(self, key, value)
        appends.append((out.buffer is not None, out.key.dtype))
        return out

    monkeypatch.setattr(KVCache, "append", append)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.generate(torch.randint(0, V, (2, 3)), 8)
    assert len(appends) == 2 * 8  # two layers, a prefill and seven one-token steps
    assert appends == [(True, torch.bfloat16)] * 16


def test_storage_without_a_dtype_takes_the_dtype_of_the_first_keys():
    cache = KVCache.empty(1, 2, 6, 4)  # no dtype asked for
    k = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    first = cache.append(k, k)
    assert first.buffer is cache.buffer and first.key.dtype == torch.bfloat16
    second = first.append(k[:, :, :1], k[:, :, :1])
    assert second.key.data_ptr() == first.key.data_ptr()  # the same storage, in place
    torch.testing.assert_close(second.key[:, :, :3], k)
    asked = KVCache.empty(1, 2, 6, 4, dtype=torch.float32).append(k, k)  # a dtype asked
    assert asked.buffer is None and asked.key.dtype == torch.float32  # for stays (a copy)


@pytest.mark.parametrize("attention", ["mha", "moh", "goh"])
def test_generate_with_preallocated_cache_equals_full_recompute(attention):
    model = lm(attention)
    prompt = torch.randint(0, V, (3, 5))
    torch.testing.assert_close(
        model.generate(prompt, 9), model.generate(prompt, 9, use_cache=False), rtol=0, atol=0
    )


@pytest.mark.parametrize("attention", ["moh", "goh"])
@pytest.mark.parametrize("execution", ["auto", "sparse"])
def test_routed_decoding_equals_full_forward_with_padding(attention, execution, count_calls):
    """Step-by-step decoding through the routed decoding kernel gives the logits of one
    full forward, with left padding and batch > 1."""
    model = lm(attention, execution=execution)
    calls = count_calls(graphheads.routed, "routed_decode_attention")
    tokens = torch.randint(0, V, (3, 12))
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[1, :3] = True  # left padding
    pad[2, :1] = True
    with torch.no_grad():
        full = model(tokens, key_padding_mask=pad).logits
        out = model(tokens[:, :4], key_padding_mask=pad[:, :4], use_cache=True)
        assert not calls  # the prompt runs dense (auto) or chunked (sparse)
        steps = [out.logits]
        cache = out.cache
        for t in range(4, 12):
            out = model(
                tokens[:, t : t + 1], key_padding_mask=pad[:, : t + 1], cache=cache, use_cache=True
            )
            steps.append(out.logits)
            cache = out.cache
    assert len(calls) == 8 * 2  # every decoding step, both layers
    real = ~pad
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["moh", "goh"])
def test_decoding_never_reads_inactive_heads(kind):
    """Poisoning the cache of every head a token does not use changes nothing: the
    kernel reads only the active heads' keys and values (the dense path reads all)."""
    torch.manual_seed(0)
    cls = MoHAttention if kind == "moh" else GoHAttention
    attn = cls(D, H, 2, 2).eval()
    with torch.no_grad():
        for p in attn.router.parameters():
            p.normal_()
    past, x = torch.randn(4, 10, D), torch.randn(4, 1, D)
    with torch.no_grad():
        cache = attn(past, is_causal=True, use_cache=True).cache
        out = attn(x, kv_cache=cache, is_causal=True)
        active = out.routing.active_heads[:, 0]  # (b, h)
        assert not active.all()
        poisoned = KVCache(cache.key.clone(), cache.value.clone())
        poisoned.key[~active] = float("nan")
        poisoned.value[~active] = float("nan")
        again = attn(x, kv_cache=poisoned, is_causal=True)
        attn.execution = "dense"
        dense = attn(x, kv_cache=cache, is_causal=True)
        dense_poisoned = attn(x, kv_cache=poisoned, is_causal=True)
    torch.testing.assert_close(again.output, out.output, rtol=0, atol=0)
    torch.testing.assert_close(out.output, dense.output, atol=1e-5, rtol=1e-4)
    assert dense_poisoned.output.isnan().any()


@pytest.mark.parametrize("num_kv_heads", [2, 4])  # shared heads per pair / batched
def test_decoding_with_grouped_query_attention_and_rotary(num_kv_heads):
    model = lm("goh", block="llama", num_kv_heads=num_kv_heads, norm_first=True)
    tokens = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens[:, :8], use_cache=True)
        last = model(tokens[:, 8:], cache=out.cache).logits
    torch.testing.assert_close(last[:, 0], full[:, 8], atol=1e-5, rtol=1e-4)


def test_seq2seq_generate_projects_the_memory_once(count_calls):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=V, d_model=D, num_heads=H, num_layers=2, d_ff=64, attention="goh", num_shared=2
    )
    model = Transformer(config).eval()
    src, start = torch.randint(0, V, (2, 7)), torch.randint(0, V, (2, 1))
    src_pad = torch.zeros(2, 7, dtype=torch.bool)
    src_pad[0, 5:] = True
    reference = copy.deepcopy(model)
    projections = [count_calls(layer.cross_attn, "project_kv") for layer in model.decoder.layers]
    generated = model.generate(src, start, 6, src_key_padding_mask=src_pad)
    assert [len(p) for p in projections] == [1, 1]  # once per decoder layer, not per step
    # the same tokens as greedy decoding by full forward passes
    tokens = start
    with torch.no_grad():
        for _ in range(6):
            logits = reference(src, tokens, src_key_padding_mask=src_pad).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(generated, tokens, rtol=0, atol=0)


def test_memory_kv_is_refused_with_a_cache_or_the_wrong_batch():
    attn = MoHAttention(D, H, 2, 2)
    memory = torch.randn(2, 5, D)
    kv = attn.project_kv(memory, memory, None)
    with pytest.raises(ValueError, match="either kv_cache or memory_kv"):
        attn(torch.randn(2, 1, D), kv_cache=kv, memory_kv=kv)
    with pytest.raises(ValueError, match="memory_kv has keys"):
        attn(torch.randn(3, 1, D), memory_kv=kv)

"""Decoding: the preallocated key/value cache, cross-attention keys of the memory computed
once, and routed decoding that reads only the active heads' caches."""

import copy
import dataclasses

import pytest
import torch

import graphheads.routed
from graphheads import DecoderOnlyLM, GoHAttention, ModelConfig, MoHAttention, Transformer
from graphheads.sparse import DECODE_MIN_SKIPPED_BYTES, decode_pays
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
        **({} if attention == "mha" else {"num_shared": 2, "top_k": 2}),
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
    # every decoding step, both layers; eager "auto" decodes dense (gathering the active
    # heads' caches would copy them: see decode_pays)
    assert len(calls) == (8 * 2 if execution == "sparse" else 0)
    real = ~pad
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["moh", "goh"])
def test_decoding_never_reads_inactive_heads(kind):
    """Poisoning the cache of every head a token does not use changes nothing: the
    kernel reads only the active heads' keys and values (the dense path reads all)."""
    torch.manual_seed(0)
    cls = MoHAttention if kind == "moh" else GoHAttention
    attn = cls(D, H, 2, 2, execution="sparse").eval()
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


def poisoned_step(execution: str = "auto", num_kv_heads: int | None = None):
    """A GoH layer, a 10-token cache and one new token per sequence, with the cache of
    every (sequence, head) pair the new token does not use set to NaN: only a kernel that
    reads the active heads alone returns a finite output."""
    torch.manual_seed(0)
    attn = GoHAttention(D, H, 2, 2, execution=execution, num_kv_heads=num_kv_heads).eval()
    with torch.no_grad():
        for p in attn.router.parameters():
            p.normal_()
        past, x = torch.randn(4, 10, D), torch.randn(4, 1, D)
        cache = attn(past, is_causal=True, use_cache=True).cache
        attn.execution = "dense"
        out = attn(x, kv_cache=cache)
        attn.execution = execution
    groups = H // (num_kv_heads or H)
    active = out.routing.active_heads[:, 0].view(4, H // groups, groups).any(-1)  # kv heads
    poisoned = KVCache(cache.key.clone(), cache.value.clone())
    poisoned.key[~active] = float("nan")
    poisoned.value[~active] = float("nan")
    return attn, x, poisoned, out.output


@pytest.mark.parametrize("num_kv_heads", [None, 4])
def test_a_decode_step_compiles_fullgraph_reads_only_active_heads_and_equals_eager(
    num_kv_heads, monkeypatch
):
    """Compiled, ``auto`` decodes through the routed kernel once the cache is large
    enough; here the threshold is 0, so every one-token step does. The step compiles with
    ``fullgraph=True`` (no host sync, no data-dependent branch) and equals the dense
    eager step, with NaN in every cache row it must not read."""
    monkeypatch.setitem(DECODE_MIN_SKIPPED_BYTES, "cpu", 0)
    attn, x, poisoned, dense = poisoned_step(num_kv_heads=num_kv_heads)
    torch._dynamo.reset()
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x, kv_cache=poisoned).output
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_inductor_compiles_the_routed_decode_step_and_it_equals_eager(monkeypatch):
    """Inductor's own kernel (the fused indexed reductions the speed comes from), with
    the cache length dynamic (two lengths)."""
    monkeypatch.setitem(DECODE_MIN_SKIPPED_BYTES, "cpu", 0)
    attn, x, poisoned, dense = poisoned_step()
    torch._dynamo.reset()
    compiled = torch.compile(attn, fullgraph=True, dynamic=True)
    with torch.no_grad():
        got = compiled(x, kv_cache=poisoned).output
        shorter = KVCache(poisoned.key[:, :, :7], poisoned.value[:, :, :7])
        attn.execution = "sparse"  # the eager kernel, on the shorter cache
        expected = attn(x, kv_cache=shorter).output
        attn.execution = "auto"
        got_shorter = compiled(x, kv_cache=shorter).output
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_shorter, expected, atol=1e-5, rtol=1e-4)


def test_auto_decodes_routed_only_compiled_and_where_the_skipped_bytes_pay(monkeypatch):
    key = torch.empty(8, 8, 1024, 64)  # fp32: 16 MiB of keys, as many of values
    assert not decode_pays(key, 4)  # eager: never (the gathers would copy the caches)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert decode_pays(key, 4)  # skips 4 of 8 heads: 16 MiB >= 12 MiB
    assert not decode_pays(key[:, :, :256], 4)  # 4 MiB: slower than dense here
    assert not decode_pays(key, 8)  # nothing to skip
    assert not decode_pays(key[:, :2], 4)  # grouped keys: 4 queries read 2 kv heads
    assert not decode_pays(key.to("meta"), 4)  # no measured crossover: dense


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


@pytest.mark.parametrize("attention", ["mha", "moh", "goh"])
@pytest.mark.parametrize("block", ["vaswani", "llama"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_ragged_prompts_in_one_batch_continue_as_each_would_alone(attention, block, use_cache):
    """Left-padded prompts of lengths 5, 2 and 7 with a padding mask: every sequence gets
    the tokens it gets alone, through prefill and decoding (sinusoidal and
    rotary positions count from its first real token)."""
    model = lm(attention, block=block)
    lengths = [5, 2, 7]
    prompts = [torch.randint(0, V, (1, n)) for n in lengths]
    batch = torch.zeros(3, 7, dtype=torch.long)
    pad = torch.ones(3, 7, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, 7 - p.size(1) :] = p[0]
        pad[i, 7 - p.size(1) :] = False
    out = model.generate(batch, 6, key_padding_mask=pad, use_cache=use_cache)
    for i, p in enumerate(prompts):
        alone = model.generate(p, 6, use_cache=use_cache)
        torch.testing.assert_close(out[i, 7:], alone[0, p.size(1) :], rtol=0, atol=0)


def test_a_padding_mask_that_is_not_left_padding_is_refused():
    model = lm("goh")
    prompt = torch.randint(0, V, (3, 4))
    right = torch.zeros(3, 4, dtype=torch.bool)
    right[1, 3:] = True  # right padding
    right[2, :] = True  # nothing left
    with pytest.raises(ValueError, match=r"pad prompts on the left .* rows \[1, 2\] do not"):
        model.generate(prompt, 2, key_padding_mask=right)
    with pytest.raises(ValueError, match=r"bool tensor of the prompt's shape \(3, 4\)"):
        model.generate(prompt, 2, key_padding_mask=right[:, :3])


@pytest.mark.parametrize("attention", ["mha", "goh"])
def test_a_sliding_window_generates_past_the_context_like_recomputing_the_window(attention):
    """A one-layer rotary model (its keys depend on the token and its position only, so a
    streaming cache and recomputing the window agree exactly), max_seq_len 8, a prompt
    of 5 continued by 12 (17 tokens), left padding in one row: the cached window and the
    window recomputed at every step give the same tokens."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=V, d_model=D, num_heads=H, num_layers=1, d_ff=64, max_seq_len=8,
        attention=attention, block="llama",
        **({} if attention == "mha" else {"num_shared": 2, "top_k": 2}),
    )  # fmt: skip
    model = DecoderOnlyLM(config).eval()
    prompt = torch.randint(0, V, (2, 5))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, :2] = True
    kwargs = {"key_padding_mask": pad, "sliding_window": True, "temperature": 1.0}
    cached = model.generate(prompt, 12, generator=torch.Generator().manual_seed(1), **kwargs)
    recomputed = model.generate(
        prompt, 12, use_cache=False, generator=torch.Generator().manual_seed(1), **kwargs
    )
    assert cached.shape == (2, 17)
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"exceed max_seq_len \(8\); rotary models go past"):
        model.generate(prompt, 12)  # without the window: refused, naming the way past it
    deep = DecoderOnlyLM(dataclasses.replace(config, num_layers=2)).eval()
    assert deep.generate(prompt, 12, sliding_window=True).shape == (2, 17)
    sinusoidal = DecoderOnlyLM(dataclasses.replace(config, block="vaswani"))
    with pytest.raises(ValueError, match="sliding_window needs rotary positions"):
        sinusoidal.generate(prompt, 12, sliding_window=True)


@pytest.mark.slow
def test_compiled_generate_of_a_llama_gqa_model_with_ragged_prompts_equals_eager(
    monkeypatch, count_calls
):
    """What a Llama-style model decodes through, together: rotary positions shifted by
    left padding, grouped key/value heads, the routed kernel compiled (threshold 0) via
    ``model.compile``: the tokens of eager generation (which decodes dense)."""
    monkeypatch.setitem(DECODE_MIN_SKIPPED_BYTES, "cpu", 0)
    model = lm("goh", block="llama", num_kv_heads=4, norm_first=True)
    prompt = torch.randint(0, V, (3, 6))
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, :4] = True
    pad[2, :1] = True
    expected = model.generate(prompt, 6, key_padding_mask=pad)
    calls = count_calls(graphheads.routed, "routed_decode_attention")
    torch._dynamo.reset()
    model.compile(dynamic=True, fullgraph=True, backend="aot_eager")
    got = model.generate(prompt, 6, key_padding_mask=pad)
    assert calls  # traced through the routed kernel
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_decode_pays_answers_for_a_compiled_step_when_asked():
    key = torch.empty(8, 8, 1024, 64)
    assert not decode_pays(key, 4)  # eager, now
    assert decode_pays(key, 4, compiled=True)
    assert not decode_pays(key, 4, compiled=False)

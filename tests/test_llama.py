"""The Llama-style block (RMSNorm, SwiGLU, RoPE, grouped-query attention, pre-norm, no
biases) against transformers' LlamaForCausalLM with copied weights."""

import pytest
import torch

from graphheads import DecoderOnlyLM, ModelConfig
from graphheads.config import LLAMA_PRESETS

transformers = pytest.importorskip("transformers")
from graphheads.integrations.hf.llama import from_llama  # noqa: E402


def hf_llama(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = {
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    config = transformers.LlamaConfig(**{**settings, **extra})
    return transformers.LlamaForCausalLM(config).eval()


TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("extra", [{}, {"rope_theta": 500000.0}, {"num_key_value_heads": 4}])
def test_llama_block_gives_the_logits_of_transformers_llama(extra):
    original = hf_llama(**extra)
    ours = from_llama(original)
    assert ours.config.block == "llama" and ours.embed.position is None
    with torch.no_grad():
        torch.testing.assert_close(
            ours(TOKENS).logits, original(TOKENS).logits, atol=1e-5, rtol=1e-5
        )


def test_cached_decoding_gives_the_logits_and_tokens_of_transformers_llama():
    original = hf_llama()
    ours = from_llama(original)
    with torch.no_grad():
        prefix = ours(TOKENS[:, :7], use_cache=True)
        step = ours(TOKENS[:, 7:9], cache=prefix.cache, use_cache=True)  # positions 7, 8
        torch.testing.assert_close(
            step.logits, original(TOKENS[:, :9]).logits[:, 7:], atol=1e-5, rtol=1e-5
        )
    prompt = TOKENS[:1, :5]
    want = original.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(ours.generate(prompt, 8), want)


@pytest.mark.parametrize("attention", ["moh", "goh"])
def test_routed_llama_with_every_head_on_equals_the_original(attention):
    original = hf_llama()
    routed = from_llama(original, attention=attention, num_shared=1, top_k=3)
    with torch.no_grad():
        out = routed(TOKENS)
        torch.testing.assert_close(out.logits, original(TOKENS).logits, atol=1e-5, rtol=1e-5)
    assert len(out.routing) == 2 and out.routing[0].gates.shape == (2, 12, 4)  # query heads


def test_llama_configs_are_checked_and_presets_build():
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        ModelConfig(vocab_size=10, d_model=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rotary positions need an even head width"):
        ModelConfig(vocab_size=10, d_model=12, num_heads=4, block="llama")
    with pytest.raises(ValueError, match="unknown preset 'llama-7b'"):
        ModelConfig.llama("llama-7b", vocab_size=10)
    config = ModelConfig.llama("llama-10m", vocab_size=256, attention="goh", num_shared=2)
    assert (
        config.block == "llama"
        and config.num_kv_heads == LLAMA_PRESETS["llama-10m"]["num_kv_heads"]
    )
    model = DecoderOnlyLM(config)
    assert all(not n.endswith("bias") or "router" in n for n, _ in model.named_parameters())


def test_a_run_config_can_start_from_a_preset():
    from graphheads.train import RunConfig

    config = RunConfig.load(None, ["model.preset=llama-10m", "model.attention=goh"])
    model = config.model_config(vocab_size=256, max_seq_len=128)
    assert (model.block, model.d_model, model.max_seq_len, model.attention) == (
        "llama",
        320,
        128,
        "goh",
    )
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        RunConfig.load(None, ["model.preset=big"]).model_config(256, 128)


def test_grouped_query_attention_reads_shared_heads_in_both_kernels():
    from graphheads import MultiHeadAttention
    from graphheads.attention import scaled_dot_product_attention

    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, num_kv_heads=2)
    x = torch.randn(2, 5, 32)
    fused = attn(x, is_causal=True).output
    attn.fused_attention = False  # the plain math path repeats the key/value heads
    torch.testing.assert_close(attn(x, is_causal=True).output, fused, atol=1e-5, rtol=1e-5)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    by_hand = scaled_dot_product_attention(  # query head i reads key/value head i // 2
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    )
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), by_hand)

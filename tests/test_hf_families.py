"""Every tested transformers family: conversion with all heads on reproduces the original
model, the gates reach the attention kernel, and decoders generate the original tokens."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from graphheads.integrations.hf import convert_to_goh, converted_modules  # noqa: E402

V, D, H, LAYERS = 100, 32, 4, 2
GEN = torch.Generator().manual_seed(0)
TOKENS = torch.randint(3, V, (2, 9), generator=GEN)
MASK = torch.ones_like(TOKENS)
MASK[1, 7:] = 0  # a padded row
DECODER_TOKENS = torch.randint(3, V, (2, 5), generator=GEN)


def decoder_only(config_class, **extra):
    def make():
        cfg = config_class(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=H,
            num_key_value_heads=2,  # grouped-query attention
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
        return transformers.AutoModelForCausalLM.from_config(cfg)

    return make


def encoder(config_class, model_class):
    def make():
        cfg = config_class(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=LAYERS,
            num_attention_heads=H,
            intermediate_size=64,
        )
        return model_class(cfg)

    return make


def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=V, n_embd=D, n_layer=LAYERS, n_head=H, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(cfg)


def vit():
    cfg = transformers.ViTConfig(
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=H,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
    )
    return transformers.ViTModel(cfg, add_pooling_layer=False)


def whisper():
    cfg = transformers.WhisperConfig(
        vocab_size=V,
        d_model=D,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=H,
        decoder_attention_heads=H,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=8,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    return transformers.WhisperForConditionalGeneration(cfg)


def t5():
    cfg = transformers.T5Config(
        vocab_size=V,
        d_model=D,
        d_kv=D // H,
        d_ff=64,
        num_layers=LAYERS,
        num_heads=H,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg)


FAMILIES = {
    "llama": decoder_only(transformers.LlamaConfig),
    "mistral": decoder_only(transformers.MistralConfig),
    "qwen2": decoder_only(transformers.Qwen2Config),
    "qwen3": decoder_only(transformers.Qwen3Config, head_dim=D // H),
    "gemma": decoder_only(transformers.GemmaConfig, head_dim=D // H),
    "phi3": decoder_only(transformers.Phi3Config),
    "gpt2": gpt2,
    "bert": encoder(transformers.BertConfig, transformers.BertModel),
    "roberta": encoder(transformers.RobertaConfig, transformers.RobertaModel),
    "vit": vit,
    "whisper": whisper,
    "t5": t5,
}
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "whisper", "t5")


def inputs(family: str) -> dict:
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=GEN)}
    if family == "whisper":
        return {
            "input_features": torch.randn(2, 8, 16, generator=GEN),
            "decoder_input_ids": DECODER_TOKENS,
        }
    if family == "t5":
        return {"input_ids": TOKENS, "attention_mask": MASK, "decoder_input_ids": DECODER_TOKENS}
    return {"input_ids": TOKENS, "attention_mask": MASK}


def output(model, batch) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def pair(family: str):
    torch.manual_seed(0)
    original = FAMILIES[family]().eval()
    return original, copy.deepcopy(original)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_heads_on_reproduces_the_original_and_gates_reach_the_kernel(family):
    original, model = pair(family)
    batch = inputs(family)
    convert_to_goh(model, num_shared=1, top_k=H - 1)
    modules = converted_modules(model)
    assert len(modules) == LAYERS * (3 if family in ("whisper", "t5") else 1)  # + cross
    with torch.no_grad():
        want, got = output(original, batch), output(model, batch)
    keep = batch["attention_mask"].bool() if "attention_mask" in batch and family != "t5" else ...
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    fewer = copy.deepcopy(original)
    convert_to_goh(fewer, num_shared=1, top_k=1)  # half the heads: the output must move
    with torch.no_grad():
        assert (output(fewer, batch) - want).abs().max() > 1e-4


@pytest.mark.parametrize("family", DECODERS)
def test_cached_greedy_generation_gives_the_original_tokens(family):
    original, model = pair(family)
    convert_to_goh(model, num_shared=1, top_k=H - 1)
    batch = {k: v[:1] for k, v in inputs(family).items() if k != "decoder_input_ids"}
    if "attention_mask" in batch:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    settings = {"max_new_tokens": 6, "do_sample": False, "use_cache": True}
    want = original.generate(**batch, **settings)
    got = model.generate(**batch, **settings)
    assert torch.equal(got, want)


def test_an_attention_module_outside_the_registry_is_named():
    class HandMadeAttention(torch.nn.Module):
        def forward(self, x):
            return x

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = HandMadeAttention()

    with pytest.raises(ValueError, match=r"cannot route inner \(HandMadeAttention\): only"):
        convert_to_goh(Model(), num_shared=0, top_k=1)

"""A transformers Llama model as a graphheads Llama-style ``DecoderOnlyLM``.

:func:`from_llama` builds a ``DecoderOnlyLM(block="llama")`` with the same shapes and
copies every weight; with ``attention="mha"`` it computes the logits of the original
(tested to 1e-5, full forward and cached decoding). With ``attention="moh"``/``"goh"``
the routers are new (uniform: with every head on the model still equals the original).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphheads.config import ModelConfig
from graphheads.goh import routers_of
from graphheads.transformer import DecoderOnlyLM

__all__ = ["from_llama", "llama_config"]


def llama_config(hf_config: Any, **overrides: Any) -> ModelConfig:
    """The :class:`~graphheads.config.ModelConfig` of a transformers ``LlamaConfig``."""
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError("from_llama: head_dim x heads != hidden_size is not supported")
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    rope = rope or {}
    if rope.get("rope_type", "default") != "default" or getattr(hf_config, "attention_bias", False):
        raise ValueError(
            f"from_llama: rope type {rope.get('rope_type')!r} and attention biases are not "
            "supported (plain RoPE, no biases)"
        )
    values: dict[str, Any] = {
        "vocab_size": hf_config.vocab_size,
        "d_model": hf_config.hidden_size,
        "num_heads": hf_config.num_attention_heads,
        "num_kv_heads": hf_config.num_key_value_heads,
        "num_layers": hf_config.num_hidden_layers,
        "d_ff": hf_config.intermediate_size,
        "max_seq_len": hf_config.max_position_embeddings,
        "layer_norm_eps": hf_config.rms_norm_eps,
        "rope_theta": float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        "tie_embeddings": bool(hf_config.tie_word_embeddings),
        "block": "llama",
        **overrides,
    }
    return ModelConfig.from_dict(values)


@torch.no_grad()
def from_llama(hf_model: nn.Module, **overrides: Any) -> DecoderOnlyLM:
    """A ``DecoderOnlyLM`` with ``hf_model``'s (a ``LlamaForCausalLM``) weights;
    ``overrides`` change config fields (e.g. ``attention="goh", num_shared=2``)."""
    config = llama_config(hf_model.config, **overrides)
    model = DecoderOnlyLM(config)
    for router in routers_of(model):
        router.reset_to_uniform()
    source: Any = hf_model.model
    head: Any = hf_model.lm_head
    model.embed.token.weight.copy_(source.embed_tokens.weight)
    layer: Any
    for layer, theirs in zip(model.decoder.layers, source.layers, strict=True):
        attn = layer.self_attn
        for mine, name in (
            (attn.q_proj, "q_proj"),
            (attn.k_proj, "k_proj"),
            (attn.v_proj, "v_proj"),
            (attn.out_proj, "o_proj"),
        ):
            mine.weight.copy_(getattr(theirs.self_attn, name).weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.feed_forward, name).weight.copy_(getattr(theirs.mlp, name).weight)
        layer.self_attn_norm.weight.copy_(theirs.input_layernorm.weight)
        layer.ff_norm.weight.copy_(theirs.post_attention_layernorm.weight)
    final: Any = model.decoder.norm
    final.weight.copy_(source.norm.weight)
    if not config.tie_embeddings:
        model.lm_head.weight.copy_(head.weight)
    return model.eval()

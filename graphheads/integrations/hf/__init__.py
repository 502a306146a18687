"""Graph-routed heads in Hugging Face ``transformers`` models (the ``hf`` extra).

:func:`convert_to_goh` turns each attention module of a transformers model into a
routed one **in place** (any family whose attention dispatches through transformers'
attention registry: Llama, Mistral, Qwen, Gemma, Phi-3, GPT-2, BERT, RoBERTa, ViT,
Whisper, T5, ...; the docs list those tested): the module keeps its class's code and its pretrained
projections under their original names (``q_proj``/``k_proj``/``v_proj``/``o_proj``,
``c_attn``/``c_proj``, ``query``/``key``/``value``), gains a
:class:`~graphheads.goh.GraphRouter` as ``router``, and scales each query head's output
by its gate before the output projection. Grouped-query attention routes the query
heads.

How: transformers picks its attention kernel from a registry
(``AttentionInterface``). We register one kernel, ``"graphheads"``: PyTorch SDPA
followed by the per-head gates, which the converted module passes down as the
``head_gates`` keyword. Nothing is stored on modules between calls; to read the
routing (for the load-balance loss or plots) wrap the forward in :func:`record_routing`.

With ``top_k`` equal to all routed heads the routers start with every gate exactly 1:
the converted model computes what the original did. With fewer heads they start from
the heads a per-head prior prefers: the most important ones when ``head_importance``
(:func:`head_importance`, Michel et al. 2019) is given, where the most important heads
also become the shared heads (MoH-LLaMA3's recipe).

Shape legend: b batch, t tokens, h heads, e head width.
"""

from graphheads.integrations import require_extra

require_extra("graphheads.integrations.hf", "hf", "safetensors", "transformers")

from graphheads.integrations.hf.convert import (
    ATTENTION_NAME,
    RoutedHFAttention,
    conversion_settings,
    convert_to_goh,
    converted_modules,
    dispatches_through_registry,
    head_layout,
    record_routing,
)
from graphheads.integrations.hf.io import load_converted, load_pretrained, save_converted
from graphheads.integrations.hf.llama import from_llama, llama_config
from graphheads.integrations.hf.tuning import head_importance, mean_pool, tune

__all__ = [
    "ATTENTION_NAME",
    "RoutedHFAttention",
    "conversion_settings",
    "convert_to_goh",
    "converted_modules",
    "dispatches_through_registry",
    "from_llama",
    "head_importance",
    "head_layout",
    "llama_config",
    "load_converted",
    "load_pretrained",
    "mean_pool",
    "record_routing",
    "save_converted",
    "tune",
]

"""graphheads' routed attention inside Megatron-core (the ``megatron`` extra:
``pip install "graphheads[megatron]"``, megatron-core 0.16.1 on Python 3.11).

- :func:`moh_layer_spec`, :func:`goh_layer_spec`: Megatron GPT layer specs whose
  self-attention is :class:`RoutedSelfAttention` (MoH or Graph-of-Heads routing exactly
  as graphheads computes it);
- :class:`TorchCoreAttention`: Megatron's core-attention interface on PyTorch SDPA (CPU
  and CUDA);
- :func:`build_gpt`: the Megatron GPT equal to a Llama-style graphheads
  :class:`~graphheads.transformer.DecoderOnlyLM`; :func:`load_from_graphheads`,
  :func:`load_into_graphheads` and :func:`copy_attention` move weights between them.

See ``docs/megatron.md`` for running it, and what is supported and refused.
"""

from graphheads.integrations.megatron.attention import (
    AUX_LOSS_NAME,
    HeadLossAutoScaler,
    RoutedSelfAttention,
    TorchCoreAttention,
    check_megatron_config,
    head_loss_scale,
    local_head_gates,
)
from graphheads.integrations.megatron.gpt import (
    build_gpt,
    copy_attention,
    load_from_graphheads,
    load_into_graphheads,
    pack_qkv,
    rotary_on_cpu,
    unpack_qkv,
)
from graphheads.integrations.megatron.specs import goh_layer_spec, moh_layer_spec

__all__ = [
    "AUX_LOSS_NAME",
    "HeadLossAutoScaler",
    "RoutedSelfAttention",
    "TorchCoreAttention",
    "build_gpt",
    "check_megatron_config",
    "copy_attention",
    "goh_layer_spec",
    "head_loss_scale",
    "load_from_graphheads",
    "load_into_graphheads",
    "local_head_gates",
    "moh_layer_spec",
    "pack_qkv",
    "rotary_on_cpu",
    "unpack_qkv",
]

r"""Megatron GPT models from graphheads configs, and weight transfer both ways.

:func:`build_gpt` builds the Megatron-core ``GPTModel`` that computes what graphheads'
Llama-style :class:`~graphheads.transformer.DecoderOnlyLM` computes (``block="llama"``:
RMSNorm, SwiGLU, rotary positions, pre-norm, no biases, grouped-query attention), with
dense, MoH or Graph-of-Heads self-attention. :func:`load_from_graphheads` and
:func:`load_into_graphheads` copy the weights between the two (whole models), and
:func:`copy_attention` one attention block either way, at tensor-parallel size 1 (reshard
bigger runs with Megatron's distributed checkpointing).

Megatron's fused ``linear_qkv`` weight is laid out by query group: for each key/value
group g, the rows of its ``H / G`` query heads, then its key head, then its value head.
``linear_fc1`` of the gated MLP is ``[gate; up]`` (the first half goes through SiLU).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from graphheads.attention import MultiHeadAttention
from graphheads.builders import make_head_graph
from graphheads.config import ModelConfig
from graphheads.integrations.megatron.attention import (
    RoutedSelfAttention,
    TorchCoreAttention,
    refuse,
)
from graphheads.integrations.megatron.specs import goh_layer_spec, moh_layer_spec
from graphheads.routed import RoutedAttention
from graphheads.transformer import DecoderOnlyLM

__all__ = [
    "build_gpt",
    "copy_attention",
    "load_from_graphheads",
    "load_into_graphheads",
    "pack_qkv",
    "rotary_on_cpu",
    "unpack_qkv",
]


def _check_convertible(config: ModelConfig) -> None:
    refused = {
        "block": (config.block != "llama", "only the Llama-style block maps onto Megatron's GPT"),
        "share_graph": (config.share_graph, "Megatron builds every layer's router itself"),
        "carry_head_states": (
            config.carry_head_states,
            "Megatron's layers pass only hidden states",
        ),
        "balance": (
            config.balance != "aux_loss",
            "the selection-bias update lives in graphheads' trainer",
        ),
    }
    refuse(config, refused, prefix="ModelConfig.")


def build_gpt(
    config: ModelConfig,
    *,
    core_attention: type | None = None,
    load_balance_coeff: float = 0.01,
    **transformer_config: Any,
) -> GPTModel:
    """The Megatron ``GPTModel`` equal to ``DecoderOnlyLM(config)`` for a Llama-style
    config (``block="llama"``), with ``config.attention`` as its self-attention ("mha":
    Megatron's own ``SelfAttention``; "moh"/"goh": :class:`RoutedSelfAttention`). Megatron's
    parallel state must be initialised (``parallel_state.initialize_model_parallel``).

    Args:
        config: a graphheads model config with ``block="llama"``.
        core_attention: the core-attention class (default
            :class:`~graphheads.integrations.megatron.TorchCoreAttention`; on CUDA e.g.
            Transformer Engine's ``TEDotProductAttention``).
        load_balance_coeff: beta of the routers' load-balance loss.
        transformer_config: fields of Megatron's ``TransformerConfig`` that replace the
            derived ones (``bf16``, ``params_dtype``, ``use_cpu_initialization``, ...).
    """
    _check_convertible(config)
    # the parameters' dtype follows bf16/fp16 unless given, and pipeline stages send that
    # dtype to each other, as Megatron-LM sets both
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}
    params_dtype = transformer_config.get("params_dtype") or next(
        (dtype for key, dtype in half.items() if transformer_config.get(key)), torch.float32
    )
    derived: dict[str, Any] = {
        # the parallel layout Megatron's parallel state was initialised with
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "params_dtype": params_dtype,
        "pipeline_dtype": params_dtype,
        "num_layers": config.num_layers,
        "hidden_size": config.d_model,
        "num_attention_heads": config.num_heads,
        "num_query_groups": config.num_kv_heads or config.num_heads,
        "kv_channels": config.d_model // config.num_heads,
        "ffn_hidden_size": config.d_ff,
        "normalization": "RMSNorm",
        "layernorm_epsilon": config.layer_norm_eps,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "hidden_dropout": config.dropout,
        "attention_dropout": config.dropout,
        "use_cpu_initialization": not torch.cuda.is_available(),
        # the fused kernels are CUDA-only
        "bias_dropout_fusion": False,
        "apply_rope_fusion": False,
        "masked_softmax_fusion": False,
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
    }
    tconfig = TransformerConfig(**{**derived, **transformer_config})
    tp = tconfig.tensor_model_parallel_size
    if config.vocab_size % tp:
        raise ValueError(
            f"build_gpt: vocab_size ({config.vocab_size}) must be divisible by the "
            f"tensor-parallel size ({tp}); pad the vocabulary (Megatron-LM pads to a "
            "multiple of 128 x tensor-parallel size)"
        )
    top_k = config.routed_top_k
    routing: dict[str, Any] = {
        "gate_convention": config.gate_convention,
        "hard_gates": config.hard_gates,
    }
    shape: dict[str, Any] = {
        "normalization": "RMSNorm",
        "core_attention": core_attention,
        "load_balance_coeff": load_balance_coeff,
    }
    if config.attention == "mha":
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.self_attention.submodules.core_attention = (
            core_attention or TorchCoreAttention
        )
    elif config.attention == "moh":
        spec = moh_layer_spec(config.num_shared, top_k, **shape, **routing)
    else:
        spec = goh_layer_spec(
            config.num_shared,
            top_k,
            make_head_graph(config),
            **shape,
            **routing,
            feature_dim=config.graph_feature_dim,
            graph_layers=config.graph_layers,
            conv=config.graph_conv,
            graph_scale_init=config.graph_scale_init,
        )
    model = GPTModel(
        tconfig,
        spec,
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_seq_len,
        position_embedding_type="rope",
        rotary_base=int(config.rope_theta),
        share_embeddings_and_output_weights=config.tie_embeddings,
        # with pipeline parallelism this rank builds its stage's layers only
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if not torch.cuda.is_available():
        rotary_on_cpu(model)
    return model


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """Separate q (H e, ...), k and v (G e, ...) weights or biases -> Megatron's fused
    ``linear_qkv`` layout ((H + 2 G) e, ...), grouped by key/value group."""
    e = q.size(0) // num_heads
    per_group = num_heads // num_groups
    rest = q.shape[1:]
    parts = (
        q.reshape(num_groups, per_group * e, *rest),
        k.reshape(num_groups, e, *rest),
        v.reshape(num_groups, e, *rest),
    )
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def unpack_qkv(qkv: Tensor, num_heads: int, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of :func:`pack_qkv`: Megatron's fused weight -> (q, k, v)."""
    per_group = num_heads // num_groups
    e = qkv.size(0) // (num_heads + 2 * num_groups)
    grouped = qkv.reshape(num_groups, (per_group + 2) * e, *qkv.shape[1:])
    q, k, v = grouped.split([per_group * e, e, e], dim=1)
    return (x.reshape(-1, *qkv.shape[1:]) for x in (q, k, v))  # type: ignore[return-value]


def _tp1(module: nn.Module, what: str) -> None:
    size = getattr(getattr(module, "config", None), "tensor_model_parallel_size", 1)
    heads = getattr(module, "num_attention_heads_per_partition", None)
    total = getattr(getattr(module, "config", None), "num_attention_heads", heads)
    if heads is not None and heads != total:
        size = total // heads
    if size != 1:
        raise ValueError(
            f"{what}: weights are copied at tensor-parallel size 1, got {size} "
            "(reshard with Megatron's distributed checkpointing)"
        )


@torch.no_grad()
def copy_attention(src: nn.Module, dst: nn.Module) -> None:
    """Copy one attention block's weights between graphheads
    (:class:`~graphheads.attention.MultiHeadAttention`, MoH or GoH attention) and Megatron
    (``SelfAttention`` or :class:`RoutedSelfAttention`), in either direction. Shapes,
    head counts, biases and router kinds must match (ValueError naming what differs)."""
    if isinstance(src, MultiHeadAttention) and isinstance(dst, SelfAttention):
        ours, theirs, to_megatron = src, dst, True
    elif isinstance(src, SelfAttention) and isinstance(dst, MultiHeadAttention):
        ours, theirs, to_megatron = dst, src, False
    else:
        raise ValueError(
            "copy_attention: copies between a graphheads MultiHeadAttention (or MoH/GoH "
            f"attention) and a Megatron SelfAttention, got {type(src).__name__} -> "
            f"{type(dst).__name__}"
        )
    _tp1(theirs, "copy_attention")
    heads, groups = ours.num_heads, ours.num_kv_heads
    mc = theirs.config
    if (mc.hidden_size, mc.num_attention_heads, mc.num_query_groups) != (
        ours.d_model,
        heads,
        groups,
    ):
        raise ValueError(
            f"copy_attention: Megatron (hidden_size, heads, query groups) = "
            f"{(mc.hidden_size, mc.num_attention_heads, mc.num_query_groups)}, graphheads "
            f"(d_model, num_heads, num_kv_heads) = {(ours.d_model, heads, groups)}"
        )
    routed = isinstance(ours, RoutedAttention)
    if routed != isinstance(theirs, RoutedSelfAttention) or (
        routed and type(ours.router) is not type(theirs.router)
    ):
        raise ValueError(
            "copy_attention: both blocks must be dense, or routed by the same router kind; "
            f"got {type(ours).__name__} and {type(theirs).__name__}"
        )
    projections = (ours.q_proj, ours.k_proj, ours.v_proj, ours.out_proj)
    has_bias = ours.q_proj.bias is not None
    if has_bias != (theirs.linear_qkv.bias is not None):
        raise ValueError("copy_attention: one side has projection biases, the other not")
    names = ["weight", "bias"] if has_bias else ["weight"]
    for name in names:
        fused = getattr(theirs.linear_qkv, name)
        proj = getattr(theirs.linear_proj, name)
        q, k, v, out = (getattr(p, name) for p in projections)
        if to_megatron:
            fused.copy_(pack_qkv(q, k, v, heads, groups))
            proj.copy_(out)
        else:
            for mine, new in zip((q, k, v), unpack_qkv(fused, heads, groups), strict=True):
                mine.copy_(new)
            out.copy_(proj)
    if routed:
        graphheads_router = cast(nn.Module, ours.router)
        megatron_router = cast(nn.Module, theirs.router)
        a, b = (
            (graphheads_router, megatron_router)
            if to_megatron
            else (megatron_router, graphheads_router)
        )
        b.load_state_dict(a.state_dict())


_NORMS = (("self_attn_norm", "input_layernorm"), ("ff_norm", "pre_mlp_layernorm"))


def _pairs(lm: DecoderOnlyLM, gpt: GPTModel, what: str) -> list[tuple[Any, Any]]:
    """Matching (graphheads, Megatron) layers; checks the two models fit each other."""
    _tp1(gpt, what)
    if lm.config.block != "llama":
        raise ValueError(f"{what}: only block='llama' models map onto Megatron's GPT")
    if len(lm.decoder.layers) != len(gpt.decoder.layers):
        raise ValueError(
            f"{what}: graphheads has {len(lm.decoder.layers)} layers, Megatron "
            f"{len(gpt.decoder.layers)}"
        )
    if lm.config.tie_embeddings != gpt.share_embeddings_and_output_weights:
        raise ValueError(f"{what}: tied embeddings differ between the two models")
    return list(zip(lm.decoder.layers, gpt.decoder.layers, strict=True))


def _copy_model(lm: DecoderOnlyLM, gpt: GPTModel, *, to_megatron: bool) -> None:
    what = "load_from_graphheads" if to_megatron else "load_into_graphheads"
    pairs = _pairs(lm, gpt, what)

    def copy(ours: Tensor, theirs: Tensor) -> None:
        if ours.shape != theirs.shape:
            raise ValueError(f"{what}: shapes differ: {tuple(ours.shape)} vs {tuple(theirs.shape)}")
        if to_megatron:
            theirs.copy_(ours)
        else:
            ours.copy_(theirs)

    copy(lm.embed.token.weight, gpt.embedding.word_embeddings.weight)
    for block, layer in pairs:
        for mine, theirs in _NORMS:
            copy(getattr(block, mine).weight, getattr(layer, theirs).weight)
        ff = block.feed_forward
        fc1 = layer.mlp.linear_fc1.weight
        if to_megatron:
            copy(torch.cat([ff.gate_proj.weight, ff.up_proj.weight]), fc1)
        else:
            gate, up = fc1.chunk(2)
            copy(ff.gate_proj.weight, gate)
            copy(ff.up_proj.weight, up)
        copy(ff.down_proj.weight, layer.mlp.linear_fc2.weight)
        src, dst = (
            (block.self_attn, layer.self_attention)
            if to_megatron
            else (layer.self_attention, block.self_attn)
        )
        copy_attention(src, dst)
    final_norm = lm.decoder.norm
    assert final_norm is not None  # the Llama block is pre-norm: the stack ends with a norm
    copy(cast(Tensor, final_norm.weight), gpt.decoder.final_layernorm.weight)
    if not lm.config.tie_embeddings:
        head = lm.lm_head
        assert isinstance(head, nn.Linear)  # untied embeddings have an output projection
        copy(head.weight, gpt.output_layer.weight)


@torch.no_grad()
def load_from_graphheads(gpt: GPTModel, lm: DecoderOnlyLM) -> None:
    """Copy a Llama-style graphheads :class:`~graphheads.transformer.DecoderOnlyLM` into a
    Megatron ``GPTModel`` built for it (:func:`build_gpt`), at tensor-parallel size 1."""
    _copy_model(lm, gpt, to_megatron=True)


@torch.no_grad()
def load_into_graphheads(lm: DecoderOnlyLM, gpt: GPTModel) -> None:
    """Copy a Megatron ``GPTModel`` built by :func:`build_gpt` into the graphheads
    :class:`~graphheads.transformer.DecoderOnlyLM` of the same config, at
    tensor-parallel size 1."""
    _copy_model(lm, gpt, to_megatron=False)


def rotary_on_cpu(model: nn.Module) -> int:
    """Let Megatron's rotary embeddings run on CPU: megatron-core 0.16's
    ``RotaryEmbedding.get_emb`` moves its frequencies to ``torch.cuda.current_device()``
    whatever the model's device. This replaces that method, on the instances inside
    ``model`` only, by the same computation on the frequencies' own device (rotate-half or
    interleaved as configured). Returns how many embeddings it changed (0 when the model
    has no rotary embedding). Not needed on CUDA."""
    changed = 0
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.get_emb = _emb_on_own_device.__get__(module)
            module.forward.cache_clear()
            changed += 1
    return changed


def _emb_on_own_device(self: Any, max_seq_len: int, offset: int = 0) -> Tensor:
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if self.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, None, None, :]

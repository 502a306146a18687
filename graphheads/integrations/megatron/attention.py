r"""Routed self-attention for Megatron-core: graphheads' MoH and Graph-of-Heads routers
inside Megatron's :class:`~megatron.core.transformer.attention.SelfAttention`.

Data flow per layer (hidden states are ``[s, b, d]``, Megatron's layout)::

    x -> router(x) -> gates (b, s, H)              replicated on every tensor-parallel rank
    x -> linear_qkv -> core_attention -> heads [s, b, H_local * e]      this rank's heads
    heads * gates[..., r * H_local : (r + 1) * H_local] -> linear_proj  (RowParallelLinear)

The router is the module graphheads uses (:class:`~graphheads.moh.MoHRouter`,
:class:`~graphheads.goh.GraphRouter`), so the routing is exactly graphheads': shared heads,
top-k, two-stage weights, hard gates, the head graph and its message passing. Its input
(the layer's normalised hidden states) is replicated on every tensor-parallel rank without
sequence parallelism, so every rank computes the full (b, s, H) gates and applies the
columns of its own heads: local head j on rank r is global head ``r * H_local + j``.

Gradients: the gates pass through ``copy_to_tensor_model_parallel_region`` (identity
forward, all-reduce over the tensor-parallel group backward), so each rank's router
receives the gradient of *every* head's gate, not only its own: router and head-graph
parameters stay replicated with identical gradients, the treatment Megatron's own
replicated parameters (layer norms) get from its column-parallel input mapping. They carry
no ``tensor_model_parallel`` attribute, so Megatron's gradient-norm and data-parallel
reductions count them once, as replicas.

The load-balance loss (:func:`~graphheads.gates.load_balance_loss`) is attached the way
Megatron's MoE router attaches its auxiliary loss: an autoscaler on the layer's output
(its gradient enters backward at the main loss's scale: :func:`head_loss_scale`, since
megatron-core 0.16.1's schedules set ``MoEAuxLossAutoScaler``'s scale only for models
with experts) and ``save_to_aux_losses_tracker`` under the name
``"head_load_balancing_loss"`` for logging (Megatron's ``track_moe_metrics`` with
``track_names=[AUX_LOSS_NAME]`` logs and clears it). The coefficient is divided by the
number of layers, as graphheads' trainer adds ``beta * mean over layers``.

Supported: tensor parallelism, pipeline parallelism (the router is layer-local; nothing
crosses layers), data parallelism (DDP, distributed optimizer), grouped-query attention,
also with fewer key/value groups than tensor-parallel ranks, rotary (with YaRN's
``mscale`` and ``no_rope_freq``'s layers without it) or learned positions, selective
recomputation of the core attention (Megatron's own path, CUDA only). Refused with a
ValueError: sequence parallelism (the router would need the full sequence on every
rank), context parallelism, the attention output gate, ``fused_single_qkv_rope``,
fine-grained activation offloading of the attention's own inputs, and, at forward,
Megatron's inference contexts (KV cache) and packed sequences. The forward follows
megatron-core 0.16's ``Attention.forward`` (the extra pins ``<0.17``); Megatron's own
``SelfAttention`` is its oracle in the tests (every head on).
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core import num_microbatches_calculator as microbatches_calculator
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from graphheads.goh import GraphRouter
from graphheads.graph import HeadGraph
from graphheads.moh import MoHRouter
from graphheads.types import RoutingOutput

__all__ = [
    "AUX_LOSS_NAME",
    "HeadLossAutoScaler",
    "RoutedSelfAttention",
    "TorchCoreAttention",
    "check_megatron_config",
    "head_loss_scale",
    "local_head_gates",
]

RouterKind = Literal["moh", "goh"]
AUX_LOSS_NAME = "head_load_balancing_loss"


def local_head_gates(gates: Tensor, rank: int, heads_local: int) -> Tensor:
    """The gate columns of tensor-parallel rank ``rank``'s heads: local head j is global
    head ``rank * heads_local + j`` (gates (..., H) -> (..., heads_local))."""
    start = rank * heads_local
    if start + heads_local > gates.size(-1):
        raise ValueError(
            f"local_head_gates: rank {rank} with {heads_local} heads per rank needs "
            f"{start + heads_local} heads, the gates have {gates.size(-1)}"
        )
    return gates[..., start : start + heads_local]


class TorchCoreAttention(MegatronModule):
    """Megatron's core-attention interface on PyTorch's scaled-dot-product attention: runs
    on CPU and CUDA (Megatron's own ``DotProductAttention`` needs a CUDA memory buffer and
    the CUDA RNG tracker). On CUDA, Transformer Engine's ``TEDotProductAttention`` may
    replace it (``core_attention=`` of the layer specs).

    Shapes: query ``[sq, b, heads_local, e]``, key/value ``[sk, b, groups_local, e]`` ->
    ``[sq, b, heads_local * e]``. ``attention_mask`` is Megatron's boolean mask (True =
    masked), broadcastable to ``[b, heads, sq, sk]``; with ``AttnMaskType.causal`` the
    causal limit applies too.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(
                f"TorchCoreAttention: context_parallel_size must be 1, "
                f"got {config.context_parallel_size}"
            )
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise ValueError("TorchCoreAttention: packed sequences are not supported")
        if attention_bias is not None:
            raise ValueError("TorchCoreAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, heads, e = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # (b, h, s, e)
        causal = mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask  # SDPA: True = attend
            if causal:
                sk = k.size(-2)
                limit = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
                mask = mask & limit
                causal = False
        dropout = self.dropout_p if self.training else 0.0
        # Megatron's dropout RNG for tensor-parallel regions is the CUDA tracker's
        with get_cuda_rng_tracker().fork() if dropout > 0 and q.is_cuda else nullcontext():
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=k.size(1) != heads,
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * e)


def head_loss_scale(config: TransformerConfig, device: torch.device, num_tokens: int) -> Tensor:
    """The factor Megatron's schedules give the main loss's gradient, for the head
    load-balance loss of a layer that saw ``num_tokens`` tokens (s x b), by the rules
    megatron-core applies to MoE's auxiliary loss: the loss scale
    (``config.grad_scale_func``, fp16's) divided by the number of micro-batches
    (``forward_step_calc_loss``); with ``calculate_per_token_loss`` times the tokens
    instead (``finalize_model_grads`` then divides every gradient by the global token
    count; Megatron's MoE router multiplies its loss by its tokens likewise).
    megatron-core 0.16.1 sets ``MoEAuxLossAutoScaler``'s scale only for models with
    experts: without this, each micro-batch's head loss entered with weight 1 (beta times
    the number of micro-batches), unscaled under fp16 (beta close to 0).

    The number of micro-batches is megatron-core's micro-batch calculator's
    (``get_num_microbatches``: Megatron-LM's training loop sets it up; a loop of one's own
    calls ``init_num_microbatches_calculator``). Without one, a forward counts as a whole
    step (one micro-batch) and a warning says so."""
    one = torch.ones((), device=device)
    loss_scale = one if config.grad_scale_func is None else config.grad_scale_func(one)
    loss_scale = loss_scale.reshape(())
    if config.calculate_per_token_loss:
        return loss_scale * num_tokens
    if microbatches_calculator._GLOBAL_NUM_MICROBATCHES_CALCULATOR is None:
        warnings.warn(
            "graphheads.integrations.megatron: megatron-core's micro-batch calculator is not "
            "initialised, so each forward's head load-balance loss counts as one whole "
            "step; with several micro-batches per step call megatron.core."
            "num_microbatches_calculator.init_num_microbatches_calculator (Megatron-LM's "
            "training loop does)",
            stacklevel=2,
        )
        return loss_scale
    return loss_scale / microbatches_calculator.get_num_microbatches()


class HeadLossAutoScaler(torch.autograd.Function):
    """Megatron's ``MoEAuxLossAutoScaler`` trick with its scale passed in: forward
    returns ``output`` as it is; backward gives ``aux_loss`` the gradient ``scale``
    (:func:`head_loss_scale`), so the loss enters the backward pass of the main loss at
    the main loss's scale, without being added to it."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, aux_loss: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(aux_loss, scale)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, Tensor, None]:
        aux_loss, scale = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * scale.to(aux_loss.dtype), None


class RoutedSelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` whose head outputs are scaled by a graphheads router's
    gates before ``linear_proj`` (see the module docstring for the data flow, the
    gradient treatment and what is refused).

    Args:
        config: Megatron's transformer config.
        submodules: Megatron's self-attention submodules (``linear_qkv``,
            ``core_attention``, ``linear_proj``, ``q_layernorm``, ``k_layernorm``).
        layer_number: Megatron's 1-based layer number.
        attn_mask_type: mask type handed to the core attention.
        router: ``"moh"`` (:class:`~graphheads.moh.MoHRouter`) or ``"goh"``
            (:class:`~graphheads.goh.GraphRouter`).
        num_shared: always-on heads (the first ``num_shared`` global heads).
        top_k: routed heads per token.
        load_balance_coeff: beta of the load-balance loss (0 turns it off).
        graph: the head graph (GoH only; default: complete with learnable edge weights).
        router_kwargs: further keyword arguments of the router (e.g. ``feature_dim``,
            ``graph_layers``, ``hard_gates``, ``gate_convention``).
        cp_comm_type: Megatron's context-parallel communication type (refused unless
            context parallelism is off).
        pg_collection: Megatron's process groups.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        *,
        router: RouterKind = "goh",
        num_shared: int = 0,
        top_k: int = 1,
        load_balance_coeff: float = 0.01,
        graph: HeadGraph | None = None,
        router_kwargs: dict[str, Any] | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        check_megatron_config(config)
        if router not in ("moh", "goh"):
            raise ValueError(f"RoutedSelfAttention: router must be 'moh' or 'goh', got {router!r}")
        if load_balance_coeff < 0:
            raise ValueError(
                f"RoutedSelfAttention: load_balance_coeff must be >= 0, got {load_balance_coeff}"
            )
        kwargs = dict(router_kwargs or {})
        if kwargs.get("carry_head_states"):
            raise ValueError(
                "RoutedSelfAttention: carry_head_states is not supported (Megatron's layers "
                "pass only hidden states between layers)"
            )
        super().__init__(
            config,
            submodules,
            layer_number,
            attn_mask_type=attn_mask_type,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        heads = config.num_attention_heads
        self.router: nn.Module
        if router == "moh":
            if graph is not None:
                raise ValueError("RoutedSelfAttention: graph is only used by router='goh'")
            self.router = MoHRouter(config.hidden_size, heads, num_shared, top_k, **kwargs)
        else:
            graph = None if graph is None else copy.deepcopy(graph)  # one graph per layer
            self.router = GraphRouter(config.hidden_size, heads, num_shared, top_k, graph, **kwargs)
        self.load_balance_coeff = float(load_balance_coeff)

    @property
    def tp_rank(self) -> int:
        group = self.pg_collection.tp
        return 0 if group is None else torch.distributed.get_rank(group)

    def route(self, hidden_states: Tensor) -> RoutingOutput:
        """The router's output for hidden states ``[s, b, d]`` (gates (b, s, H))."""
        return self.router(hidden_states.transpose(0, 1))

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        key_value_states: Tensor | None = None,
        inference_context: Any = None,
        rotary_pos_emb: Tensor | tuple[Tensor, Tensor] | None = None,
        rotary_pos_cos: Tensor | None = None,
        rotary_pos_sin: Tensor | None = None,
        rotary_pos_cos_sin: Tensor | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
        sequence_len_offset: int | None = None,
        *,
        inference_params: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """Megatron's attention forward for training and full-sequence evaluation:
        hidden states ``[s, b, d]`` -> (output ``[s, b, d]``, bias)."""
        name = type(self).__name__
        if inference_context is not None or inference_params is not None:
            raise ValueError(
                f"{name}: Megatron inference contexts (KV caches) are not supported; "
                "evaluate full sequences, or generate with graphheads' own models"
            )
        if packed_seq_params is not None:
            raise ValueError(f"{name}: packed sequences (packed_seq_params) are not supported")
        if rotary_pos_cos is not None or rotary_pos_sin is not None:
            raise ValueError(f"{name}: precomputed rotary cos/sin are not supported")
        query, key, value = self.get_query_key_value_tensors(hidden_states, key_value_states)
        no_rope = self.config.no_rope_freq  # layers without rotary positions, as Megatron's
        if no_rope and no_rope[self.layer_number - 1]:
            rotary_pos_emb = None
        if rotary_pos_emb is not None:
            pos_q, pos_k = (
                rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            )
            rope = {"config": self.config, "cp_group": self.pg_collection.cp}
            rope["mscale"] = _yarn_get_concentration_factor_from_config(self.config)  # YaRN's
            query = apply_rotary_pos_emb(query, pos_q, **rope)
            key = apply_rotary_pos_emb(key, pos_k, **rope)
        routing = self.route(hidden_states)
        attend = self.core_attention
        if self.checkpoint_core_attention and self.training:  # Megatron's selective recompute
            attend = self._checkpointed_attention_forward
        heads_out = attend(
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=self.attn_mask_type,
            attention_bias=attention_bias,
        )
        # every rank's router gets every head's gate gradient (all-reduce in backward)
        gates = copy_to_tensor_model_parallel_region(routing.gates, group=self.pg_collection.tp)
        # the query heads this rank attends with and linear_proj reads: H / TP of them,
        # also when there are fewer key/value groups than ranks (then Megatron's
        # num_attention_heads_per_partition counts the heads of one group, H / G)
        heads_local = self.config.num_attention_heads // self.world_size
        gates = local_head_gates(gates, self.tp_rank, heads_local).transpose(0, 1)  # (s, b, hl)
        s, b, _ = heads_out.shape
        heads_out = heads_out.view(s, b, heads_local, -1) * gates.unsqueeze(-1).to(heads_out.dtype)
        output, bias = self.linear_proj(heads_out.view(s, b, -1))
        # not in a forward without autograd (full recomputation runs the layer once under
        # no_grad, then again in backward): the loss would be tracked twice
        if self.training and torch.is_grad_enabled() and self.load_balance_coeff > 0:
            loss = routing.load_balance_loss
            save_to_aux_losses_tracker(
                AUX_LOSS_NAME, loss, self.layer_number, self.config.num_layers
            )
            coeff = self.load_balance_coeff / self.config.num_layers
            if self.config.num_moe_experts is not None:  # Megatron's schedules scale it
                tokens = s * b if self.config.calculate_per_token_loss else 1
                output = MoEAuxLossAutoScaler.apply(output, coeff * loss * tokens)
            else:
                scale = head_loss_scale(self.config, output.device, s * b)
                output = HeadLossAutoScaler.apply(output, coeff * loss, scale)
        return output, bias


def check_megatron_config(config: TransformerConfig) -> None:
    """Raise a ValueError naming the first setting routed attention does not support."""
    refused = {
        "sequence_parallel": (
            config.sequence_parallel,
            "the router reads every token's hidden state on every tensor-parallel rank",
        ),
        "context_parallel_size": (
            config.context_parallel_size > 1,
            "attention over a sequence split across ranks is not implemented",
        ),
        "attention_output_gate": (
            config.attention_output_gate,
            "the heads already have graphheads' gates",
        ),
        "fused_single_qkv_rope": (
            config.fused_single_qkv_rope,
            "routed attention applies rotary positions to the split queries and keys",
        ),
        "fine_grained_activation_offloading": (
            config.fine_grained_activation_offloading
            and bool({"qkv_linear", "core_attn", "attn_proj"} & set(config.offload_modules or [])),
            "routed attention does not offload its inputs (offload other modules only)",
        ),
    }
    refuse(config, refused)


def refuse(config: Any, refused: dict[str, tuple[bool, str]], prefix: str = "") -> None:
    """Raise a ValueError naming the first ``key`` whose ``(on, why)`` is on."""
    for key, (on, why) in refused.items():
        if on:
            raise ValueError(
                f"graphheads.integrations.megatron: {prefix}{key}={getattr(config, key)!r} "
                f"is not supported ({why})"
            )

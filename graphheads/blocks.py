r"""The pieces of a Transformer stack (Vaswani et al. 2017): positions, the position-wise
FFN, one block and one stack loop.

Shape legend: b batch, t query tokens, s memory (source) tokens, d model width.

:class:`TransformerBlock` is every layer: self-attention, an optional cross-attention
over an encoder's memory, and the FFN, each in a residual branch with LayerNorm
(post-LN as in the paper, or pre-LN). :class:`TransformerStack` runs the blocks in one
loop for encoders, decoders and decoder-only models; it merges the masks into one
attention bias once per forward and hands it to every block. Blocks receive their
attention and feed-forward submodules: they never read a config
(:mod:`graphheads.builders` wires them from a :class:`~graphheads.config.ModelConfig`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from graphheads.attention import MultiHeadAttention
from graphheads.compat import FORWARD_STACKLEVEL, padding_from_token_mask
from graphheads.masks import build_attention_bias, self_attention_mask
from graphheads.types import AttentionOutput, KVCache

__all__ = [
    "FeedForward",
    "LayerOutput",
    "SinusoidalPositionalEncoding",
    "StackOutput",
    "SwiGLUFeedForward",
    "TransformerBlock",
    "TransformerStack",
    "make_norm",
]


class SinusoidalPositionalEncoding(nn.Module):
    r"""PE(pos, 2i) = sin(pos / 10000^{2i/d}), PE(pos, 2i+1) = cos(pos / 10000^{2i/d}).

    Args:
        d_model: model width (even or odd).
        max_len: longest sequence covered; longer inputs raise ValueError.

    Shapes: (b, t, d) -> (b, t, d), adds the encodings of positions ``offset .. offset+t-1``.
    """

    pe: Tensor

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (t, 1)
        div = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)  # a constant, not a parameter

    def forward(self, x: Tensor, offset: int = 0, shift: Tensor | None = None) -> Tensor:
        """``shift`` (b,): subtracted from each sequence's positions (left padding; the
        positions of padding, below 0, become 0)."""
        t = x.size(1)
        if offset + t > self.max_len:
            raise ValueError(
                f"SinusoidalPositionalEncoding: positions {offset}..{offset + t - 1} exceed "
                f"max_seq_len ({self.max_len})"
            )
        if shift is not None:
            positions = torch.arange(offset, offset + t, device=x.device) - shift.view(-1, 1)
            return x + self.pe[positions.clamp_min(0)].to(x.dtype)  # (b, t, d)
        return x + self.pe[offset : offset + t].to(x.dtype)  # (b, t, d)


class FeedForward(nn.Module):
    """Position-wise FFN: ``linear2(dropout(act(linear1(x))))``.

    Submodule names match :class:`torch.nn.TransformerEncoderLayer`.
    """

    def __init__(
        self, d_model: int, d_ff: int, *, dropout: float = 0.0, activation: str = "relu"
    ) -> None:
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(
                f"FeedForward: activation must be 'relu' or 'gelu', got {activation!r}"
            )
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(self.linear1(x)) if self.activation == "relu" else F.gelu(self.linear1(x))
        return self.linear2(self.dropout(hidden))


class SwiGLUFeedForward(nn.Module):
    """Llama's FFN (Shazeer 2020, "GLU Variants Improve Transformer"):
    ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases; names as in transformers'
    ``LlamaMLP``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_norm(kind: str, d_model: int, eps: float) -> nn.Module:
    """``"layer"``: LayerNorm; ``"rms"``: RMSNorm (Zhang & Sennrich 2019, Llama's)."""
    if kind == "layer":
        return nn.LayerNorm(d_model, eps=eps)
    if kind == "rms":
        return nn.RMSNorm(d_model, eps=eps)
    raise ValueError(f"make_norm: kind must be 'layer' or 'rms', got {kind!r}")


@dataclass
class LayerOutput:
    """One block's hidden states and what its attention modules returned."""

    hidden: Tensor  # (b, t, d)
    self_attn: AttentionOutput
    cross_attn: AttentionOutput | None = None


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention over a memory, FFN; each in a residual
    branch with LayerNorm.

    Post-LN (paper): ``x = norm(x + sublayer(x))``; pre-LN: ``x = x + sublayer(norm(x))``.
    Without ``cross_attn`` this is an encoder layer (or, with causal masks, the layer of
    a decoder-only LM); with it, a decoder layer.

    Args:
        self_attn: the self-attention module (any of graphheads' attention modules).
        feed_forward: the position-wise FFN.
        d_model: model width (for the LayerNorms).
        cross_attn: attention over the memory, or ``None``.
        dropout: dropout on each residual branch.
        norm_first: pre-LN instead of the paper's post-LN.
        layer_norm_eps: the norms' epsilon.
        norm: ``"layer"`` (LayerNorm, the paper's) or ``"rms"`` (RMSNorm, Llama's).

    Submodules: ``self_attn``, ``self_attn_norm``, ``cross_attn`` and
    ``cross_attn_norm`` (with cross-attention), ``feed_forward``, ``ff_norm``.
    """

    def __init__(
        self,
        *,
        self_attn: nn.Module,
        feed_forward: nn.Module,
        d_model: int,
        cross_attn: nn.Module | None = None,
        dropout: float = 0.0,
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        norm: str = "layer",
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.self_attn_norm = make_norm(norm, d_model, layer_norm_eps)
        self.cross_attn = cross_attn
        self.cross_attn_norm = (
            make_norm(norm, d_model, layer_norm_eps) if cross_attn is not None else None
        )
        self.feed_forward = feed_forward
        self.ff_norm = make_norm(norm, d_model, layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def _input(self, x: Tensor, norm: nn.Module) -> Tensor:
        return norm(x) if self.norm_first else x

    def _residual(self, x: Tensor, branch: Tensor, norm: nn.Module) -> Tensor:
        x = x + self.dropout(branch)
        return x if self.norm_first else norm(x)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        memory_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        memory_kv: KVCache | None = None,
        head_states: Tensor | None = None,
        padding_mask: Tensor | None = None,
        router_context: Tensor | None = None,
        token_mask: Tensor | None = None,  # deprecated: padding_mask
    ) -> LayerOutput:
        """x (b, t, d), memory (b, s, d) -> :class:`LayerOutput`. Masks as in
        :class:`~graphheads.attention.MultiHeadAttention`; ``memory_mask`` and
        ``memory_key_padding_mask`` are the cross-attention's, ``memory_kv`` its keys and
        values of ``memory`` projected once (decoding). ``padding_mask`` (b, t) is True at
        padding tokens (routed attention balances only the others; ``token_mask``, True at
        real tokens, is deprecated); ``router_context`` (b, d) is added to the
        self-attention router's input (routed attention only)."""
        padding_mask = padding_from_token_mask(
            "TransformerBlock", token_mask, padding_mask, stacklevel=FORWARD_STACKLEVEL
        )
        if (memory is None) != (self.cross_attn is None):
            raise ValueError(
                "TransformerBlock: memory must be given exactly when the block has "
                f"cross-attention (cross_attn is {'set' if self.cross_attn else 'None'})"
            )
        context = {} if router_context is None else {"router_context": router_context}
        sa = self.self_attn(
            self._input(x, self.self_attn_norm),
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            kv_cache=kv_cache,
            use_cache=use_cache,
            head_states=head_states,
            padding_mask=padding_mask,
            **context,
        )
        x = self._residual(x, sa.output, self.self_attn_norm)
        ca = None
        if self.cross_attn is not None and self.cross_attn_norm is not None:
            ca = self.cross_attn(
                self._input(x, self.cross_attn_norm),
                None if memory_kv is not None else memory,
                attn_mask=memory_mask,
                key_padding_mask=memory_key_padding_mask,
                memory_kv=memory_kv,
                padding_mask=padding_mask,
            )
            x = self._residual(x, ca.output, self.cross_attn_norm)
        x = self._residual(x, self.feed_forward(self._input(x, self.ff_norm)), self.ff_norm)
        return LayerOutput(x, sa, ca)


@dataclass
class StackOutput:
    """A stack's final hidden states and each block's :class:`LayerOutput`."""

    hidden: Tensor  # (b, t, d)
    layers: list[LayerOutput]

    @property
    def cache(self) -> tuple[KVCache, ...]:
        caches = tuple(layer.self_attn.cache for layer in self.layers)
        return tuple(c for c in caches if c is not None)


class TransformerStack(nn.Module):
    """:class:`TransformerBlock` s applied in order, with an optional final LayerNorm.

    One loop for every stack: an encoder, a decoder (blocks with cross-attention, called
    with ``memory``) and a decoder-only LM (causal, with a key/value cache).

    Args:
        layers: the blocks.
        norm: final normalisation (pre-LN stacks need one; the paper's post-LN has none).
        carry_head_states: pass each block's graph-router head states to the next block's
            router.

    Set ``activation_checkpointing = True`` to recompute each block in the backward pass
    (less memory, about one more forward of compute; the gradients are the same).
    """

    def __init__(
        self,
        layers: list[TransformerBlock],
        *,
        norm: nn.Module | None = None,
        carry_head_states: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.carry_head_states = carry_head_states
        # recompute each block's activations in the backward pass instead of keeping them
        # (torch.utils.checkpoint, non-reentrant; training only): memory for compute
        self.activation_checkpointing = False

    def empty_cache(
        self,
        batch_size: int,
        capacity: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        left_padding: Tensor | None = None,
    ) -> tuple[KVCache, ...]:
        """One empty :class:`~graphheads.types.KVCache` per block with room for
        ``capacity`` tokens (decoding writes into it instead of concatenating);
        ``left_padding`` (b,) as in :meth:`~graphheads.types.KVCache.empty`."""
        caches = []
        for layer in self.layers:
            attn = layer.self_attn
            if not isinstance(attn, MultiHeadAttention):
                raise ValueError(
                    f"TransformerStack.empty_cache: {type(attn).__name__} keeps no KVCache"
                )
            caches.append(
                KVCache.empty(
                    batch_size,
                    attn.num_kv_heads,
                    capacity,
                    attn.head_dim,
                    dtype=dtype,
                    device=device,
                    left_padding=left_padding,
                )
            )
        return tuple(caches)

    def memory_kv(self, memory: Tensor) -> tuple[KVCache, ...]:
        """Every block's cross-attention keys and values of ``memory`` (b, s, d): pass
        them as ``memory_kv`` to decode without projecting the memory at every step."""
        caches = []
        for layer in self.layers:
            if not isinstance(layer.cross_attn, MultiHeadAttention):
                raise ValueError(
                    "TransformerStack.memory_kv: the blocks have no graphheads cross-attention"
                )
            caches.append(layer.cross_attn.project_kv(memory, memory, None))
        return tuple(caches)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        memory_key_padding_mask: Tensor | None = None,
        cache: tuple[KVCache, ...] | None = None,
        use_cache: bool = False,
        memory_kv: tuple[KVCache, ...] | None = None,
        padding_mask: Tensor | None = None,
        router_context: Tensor | None = None,
        token_mask: Tensor | None = None,  # deprecated: padding_mask
    ) -> StackOutput:
        """x (b, t, d) -> :class:`StackOutput`. ``cache`` holds one
        :class:`~graphheads.types.KVCache` per block (the tokens before x);
        ``key_padding_mask`` (b, past + t) then covers the cached keys too.
        ``memory_kv`` holds every block's cross-attention keys and values of ``memory``
        (:meth:`memory_kv`), computed once per generation. ``router_context`` (b, d) goes
        to every block's self-attention router input. The masks are merged once
        here and every block gets the same bias (blocks whose self-attention takes the
        masks as they are, the sparse path, get them unmerged). ``padding_mask`` (b, t):
        True at the padding among these tokens (``token_mask``, True at the real ones, is
        deprecated)."""
        padding_mask = padding_from_token_mask(
            "TransformerStack", token_mask, padding_mask, stacklevel=FORWARD_STACKLEVEL
        )
        for label, per_layer in (("cache", cache), ("memory_kv", memory_kv)):
            if per_layer is not None and len(per_layer) != len(self.layers):
                raise ValueError(
                    f"TransformerStack: {label} has {len(per_layer)} layers, stack has "
                    f"{len(self.layers)}"
                )
        b, t = x.shape[:2]
        past = cache[0].length if cache else 0
        num_heads = int(getattr(self.layers[0].self_attn, "num_heads", 1)) if self.layers else 1
        self_mask, padding, causal = attn_mask, key_padding_mask, is_causal
        if all(getattr(layer.self_attn, "merged_masks", True) for layer in self.layers):
            padding = None
            self_mask, causal = self_attention_mask(
                batch_size=b,
                num_heads=num_heads,
                query_len=t,
                key_len=past + t,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                is_causal=is_causal,
                dtype=x.dtype,
                device=x.device,
            )
        memory_mask = None
        if memory is not None and memory_key_padding_mask is not None:
            memory_mask = build_attention_bias(
                batch_size=b,
                num_heads=1,
                query_len=1,  # (b, 1, 1, s): the same keys are hidden from every query
                key_len=memory.size(1),
                attn_mask=None,
                key_padding_mask=memory_key_padding_mask,
                is_causal=False,
                dtype=x.dtype,
                device=x.device,
                owner="TransformerStack",
            )
        outputs: list[LayerOutput] = []
        for i, layer in enumerate(self.layers):
            previous = outputs[-1].self_attn.routing if outputs else None
            run: Callable[..., LayerOutput] = layer
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                run = functools.partial(checkpoint, layer, use_reentrant=False)
            out = run(
                x,
                memory,
                attn_mask=self_mask,
                key_padding_mask=padding,
                is_causal=causal,
                memory_mask=memory_mask,
                kv_cache=None if cache is None else cache[i],
                use_cache=use_cache,
                memory_kv=None if memory_kv is None else memory_kv[i],
                head_states=(
                    previous.head_states
                    if self.carry_head_states and previous is not None
                    else None
                ),
                padding_mask=padding_mask,
                router_context=router_context,
            )
            outputs.append(out)
            x = out.hidden
        if self.norm is not None:
            x = self.norm(x)
        return StackOutput(x, outputs)

r"""The Transformer of Vaswani et al. 2017, built from small modules.

Shape legend: b batch, t target/query tokens, s source tokens, d model width, v vocabulary.

Layers receive their attention and feed-forward submodules (they never read a config);
:func:`build_attention` is the one seam that turns ``ModelConfig.attention`` ("mha",
"moh", "goh") into an attention module, so the stack swaps its attention at every layer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphheads.attention import AttentionOutput, KVCache, MultiHeadAttention
from graphheads.goh import build_goh_attention, collect_head_graphs, make_head_graph
from graphheads.graph import HeadGraph
from graphheads.moh import MoHAttention, RoutingOutput

__all__ = [
    "Decoder",
    "DecoderLayer",
    "DecoderOnlyLM",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "LayerOutput",
    "ModelConfig",
    "ModelOutput",
    "SinusoidalPositionalEncoding",
    "StackOutput",
    "Transformer",
    "build_attention",
    "sample_next_token",
]

AttentionKind = Literal["mha", "moh", "goh"]
_ATTENTION_KINDS = ("mha", "moh", "goh")


@dataclass(frozen=True)
class ModelConfig:
    """Configuration of :class:`DecoderOnlyLM` and :class:`Transformer`."""

    vocab_size: int  # number of token ids
    d_model: int = 64  # model width d
    num_heads: int = 4  # attention heads per layer h
    num_layers: int = 2  # layers (the encoder's, for the encoder-decoder model)
    d_ff: int = 256  # hidden width of the position-wise feed-forward network
    max_seq_len: int = 256  # longest sequence the positional encoding covers
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    attention: AttentionKind = "mha"  # "mha" dense, "moh" Mixture-of-Head, "goh" Graph-of-Heads
    num_decoder_layers: int | None = None  # encoder-decoder only; None = num_layers
    activation: Literal["relu", "gelu"] = "relu"  # FFN non-linearity (ReLU in the paper)
    norm_first: bool = False  # pre-LN; False = post-LN as in the paper
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True  # share the token embedding with the output projection
    # --- Mixture-of-Head (attention="moh" or "goh") ---
    num_shared: int = 0  # always-on heads (the first num_shared heads)
    top_k: int = 0  # routed heads each token uses; 0 = half of the routed heads
    gate_convention: Literal["reference", "paper"] = "reference"  # see graphheads.moh
    hard_gates: bool = False  # 0/1 gates with a straight-through estimator
    execution: Literal["dense", "sparse"] = "dense"  # sparse: compute active heads only
    # --- Graph-of-Heads (attention="goh") ---
    graph: str = "complete"  # head-graph preset: complete, ring, star, grid, empty
    graph_learnable: Literal["fixed", "edge", "dense"] = "edge"  # edge-weight parametrisation
    graph_feature_dim: int = 16  # node feature width F of the router
    graph_layers: int = 2  # message-passing layers L (0 = linear MoH router)
    share_graph: bool = False  # one head graph for all layers instead of one per layer
    carry_head_states: bool = False  # feed each layer's head states into the next router

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig: {name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"ModelConfig: d_model ({self.d_model}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in _ATTENTION_KINDS:
            raise ValueError(
                f"ModelConfig: attention must be one of {_ATTENTION_KINDS}, got {self.attention!r}"
            )
        if self.activation not in ("relu", "gelu"):
            raise ValueError(
                f"ModelConfig: activation must be 'relu' or 'gelu', got {self.activation!r}"
            )
        if self.execution not in ("dense", "sparse"):
            raise ValueError(
                f"ModelConfig: execution must be 'dense' or 'sparse', got {self.execution!r}"
            )
        if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
            raise ValueError(
                f"ModelConfig: num_decoder_layers must be positive, got {self.num_decoder_layers}"
            )

    @property
    def routed_top_k(self) -> int:
        """``top_k`` with the default (0 = half of the routed heads, at least 1) resolved."""
        routed = self.num_heads - self.num_shared
        if self.top_k == 0:
            return max(1, routed // 2) if routed > 0 else 0
        return self.top_k

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> ModelConfig:
        """Build a config from a plain dict; an unknown key raises ValueError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)  # type: ignore[arg-type]


def build_attention(
    config: ModelConfig, *, graph: HeadGraph | None = None, carry: bool = False
) -> nn.Module:
    """The attention module for one attention block of the stack.

    This is the seam between the model and its attention: "mha" gives
    :class:`~graphheads.attention.MultiHeadAttention`, "moh" gives
    :class:`~graphheads.moh.MoHAttention` and "goh" :class:`~graphheads.goh.GoHAttention`
    (over ``graph`` when given, so that blocks can share one head graph; ``carry`` makes
    its router read the previous layer's head states).
    """
    if config.attention == "mha":
        return MultiHeadAttention(config.d_model, config.num_heads, dropout=config.dropout)
    if config.attention == "moh":
        return MoHAttention(
            config.d_model,
            config.num_heads,
            config.num_shared,
            config.routed_top_k,
            dropout=config.dropout,
            gate_convention=config.gate_convention,
            hard_gates=config.hard_gates,
            execution=config.execution,
        )
    return build_goh_attention(config, graph=graph, carry=carry)


def _graph_factory(config: ModelConfig, graph: HeadGraph | None) -> Callable[[], HeadGraph | None]:
    """Where each GoH block's head graph comes from: ``graph`` (a template: copied per
    block, or the one object for all blocks with ``share_graph``), else the preset
    ``config.graph``; ``None`` lets a block build its own preset graph."""
    if config.attention != "goh":
        if graph is not None:
            raise ValueError(f"graph is only used with attention='goh', not {config.attention!r}")
        return lambda: None
    if graph is not None and graph.num_heads != config.num_heads:
        raise ValueError(
            f"graph has {graph.num_heads} heads, config has num_heads={config.num_heads}"
        )
    if config.share_graph:
        shared = graph if graph is not None else make_head_graph(config)
        return lambda: shared
    if graph is not None:
        return lambda: copy.deepcopy(graph)
    return lambda: None


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

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        t = x.size(1)
        if offset + t > self.max_len:
            raise ValueError(
                f"SinusoidalPositionalEncoding: positions {offset}..{offset + t - 1} exceed "
                f"max_seq_len ({self.max_len})"
            )
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


@dataclass
class LayerOutput:
    """One layer's hidden states and what its attention blocks returned."""

    hidden: Tensor  # (b, t, d)
    self_attn: AttentionOutput
    cross_attn: AttentionOutput | None = None


class EncoderLayer(nn.Module):
    """Self-attention + FFN, each in a residual branch with LayerNorm.

    Post-LN (paper): ``x = norm(x + sublayer(x))``; pre-LN: ``x = x + sublayer(norm(x))``.
    With ``is_causal=True`` this is also the layer of a decoder-only LM.
    Submodule names match :class:`torch.nn.TransformerEncoderLayer`.
    """

    def __init__(
        self,
        *,
        self_attn: nn.Module,
        feed_forward: FeedForward,
        d_model: int,
        dropout: float = 0.0,
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(
        self,
        x: Tensor,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        head_states: Tensor | None = None,
    ) -> LayerOutput:
        def attend(h: Tensor) -> AttentionOutput:
            return self.self_attn(
                h,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                is_causal=is_causal,
                kv_cache=kv_cache,
                use_cache=use_cache,
                head_states=head_states,
            )

        if self.norm_first:
            attn = attend(self.norm1(x))
            x = x + self.dropout1(attn.output)
            x = x + self.dropout2(self.feed_forward(self.norm2(x)))
        else:
            attn = attend(x)
            x = self.norm1(x + self.dropout1(attn.output))
            x = self.norm2(x + self.dropout2(self.feed_forward(x)))
        return LayerOutput(x, attn)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder memory, FFN.

    Submodule names match :class:`torch.nn.TransformerDecoderLayer` (``cross_attn`` is
    its ``multihead_attn``).
    """

    def __init__(
        self,
        *,
        self_attn: nn.Module,
        cross_attn: nn.Module,
        feed_forward: FeedForward,
        d_model: int,
        dropout: float = 0.0,
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.cross_attn = cross_attn
        self.feed_forward = feed_forward
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        tgt_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        is_causal: bool = True,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        head_states: Tensor | None = None,
    ) -> LayerOutput:
        def self_block(h: Tensor) -> AttentionOutput:
            return self.self_attn(
                h,
                attn_mask=tgt_mask,
                key_padding_mask=tgt_key_padding_mask,
                is_causal=is_causal,
                kv_cache=kv_cache,
                use_cache=use_cache,
                head_states=head_states,
            )

        def cross_block(h: Tensor) -> AttentionOutput:
            return self.cross_attn(h, memory, memory, key_padding_mask=memory_key_padding_mask)

        if self.norm_first:
            sa = self_block(self.norm1(x))
            x = x + self.dropout1(sa.output)
            ca = cross_block(self.norm2(x))
            x = x + self.dropout2(ca.output)
            x = x + self.dropout3(self.feed_forward(self.norm3(x)))
        else:
            sa = self_block(x)
            x = self.norm1(x + self.dropout1(sa.output))
            ca = cross_block(x)
            x = self.norm2(x + self.dropout2(ca.output))
            x = self.norm3(x + self.dropout3(self.feed_forward(x)))
        return LayerOutput(x, sa, ca)


@dataclass
class StackOutput:
    """A stack's final hidden states and each layer's :class:`LayerOutput`."""

    hidden: Tensor  # (b, t, d)
    layers: list[LayerOutput]

    @property
    def cache(self) -> tuple[KVCache, ...]:
        caches = tuple(layer.self_attn.cache for layer in self.layers)
        return tuple(c for c in caches if c is not None)


def _previous_head_states(carry: bool, layers: list[LayerOutput]) -> Tensor | None:
    if not carry or not layers or layers[-1].self_attn.routing is None:
        return None
    return layers[-1].self_attn.routing.head_states


class Encoder(nn.Module):
    """A stack of :class:`EncoderLayer` with an optional final LayerNorm.

    Args:
        layers: the layers, applied in order.
        norm: final normalisation (pre-LN stacks need one; the paper's post-LN has none).
        carry_head_states: pass each layer's router head states to the next layer's router.
    """

    def __init__(
        self,
        layers: list[EncoderLayer],
        *,
        norm: nn.Module | None = None,
        carry_head_states: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.carry_head_states = carry_head_states

    def forward(
        self,
        x: Tensor,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: tuple[KVCache, ...] | None = None,
        use_cache: bool = False,
    ) -> StackOutput:
        outputs: list[LayerOutput] = []
        for i, layer in enumerate(self.layers):
            out = layer(
                x,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                is_causal=is_causal,
                kv_cache=None if cache is None else cache[i],
                use_cache=use_cache,
                head_states=_previous_head_states(self.carry_head_states, outputs),
            )
            outputs.append(out)
            x = out.hidden
        if self.norm is not None:
            x = self.norm(x)
        return StackOutput(x, outputs)


class Decoder(nn.Module):
    """A stack of :class:`DecoderLayer` with an optional final LayerNorm."""

    def __init__(
        self,
        layers: list[DecoderLayer],
        *,
        norm: nn.Module | None = None,
        carry_head_states: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.carry_head_states = carry_head_states

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        tgt_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        is_causal: bool = True,
        cache: tuple[KVCache, ...] | None = None,
        use_cache: bool = False,
    ) -> StackOutput:
        outputs: list[LayerOutput] = []
        for i, layer in enumerate(self.layers):
            out = layer(
                x,
                memory,
                tgt_mask=tgt_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                is_causal=is_causal,
                kv_cache=None if cache is None else cache[i],
                use_cache=use_cache,
                head_states=_previous_head_states(self.carry_head_states, outputs),
            )
            outputs.append(out)
            x = out.hidden
        if self.norm is not None:
            x = self.norm(x)
        return StackOutput(x, outputs)


@dataclass
class ModelOutput:
    """What :class:`DecoderOnlyLM` and :class:`Transformer` return.

    Attributes:
        logits: (b, t, v).
        routing: the routing of every routed attention block, in stack order (encoder
            self-attention, then per decoder layer self- and cross-attention); empty for
            dense attention.
        aux_loss: the sum of the blocks' load-balance losses (a zero scalar when dense).
            Training adds ``beta * aux_loss / len(routing)`` (beta * the mean over layers).
        cache: per-layer self-attention key/value caches when ``use_cache=True``.
    """

    logits: Tensor
    routing: tuple[RoutingOutput, ...] = ()
    aux_loss: Tensor | None = None
    cache: tuple[KVCache, ...] | None = None


def _collect_routing(
    stacks: list[StackOutput], like: Tensor
) -> tuple[tuple[RoutingOutput, ...], Tensor]:
    routing: list[RoutingOutput] = []
    for stack in stacks:
        for layer in stack.layers:
            for attn in (layer.self_attn, layer.cross_attn):
                if attn is not None and attn.routing is not None:
                    routing.append(attn.routing)
    aux = like.new_zeros(())
    for r in routing:
        aux = aux + r.load_balance_loss
    return tuple(routing), aux


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from (b, v) logits: greedy when ``temperature == 0``,
    else sampling from ``softmax(logits / temperature)`` restricted to the ``top_k`` best."""
    if temperature < 0:
        raise ValueError(f"sample_next_token: temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"sample_next_token: top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Embedding(nn.Module):
    """Token embedding times sqrt(d) plus sinusoidal positions, then dropout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.token.weight, std=config.d_model**-0.5)
        self.position = SinusoidalPositionalEncoding(config.d_model, config.max_seq_len)
        self.dropout = nn.Dropout(config.dropout)
        self.scale = math.sqrt(config.d_model)
        self.vocab_size = config.vocab_size

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(
                f"expected token ids of shape (batch, tokens), got {tuple(tokens.shape)}"
            )
        if tokens.numel():
            low, high = (int(v) for v in torch.aminmax(tokens))  # one pass, one sync per forward
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.vocab_size}), got range [{low}, {high}]"
                )
        return self.dropout(self.position(self.token(tokens) * self.scale, offset))


def _make_stack_norm(config: ModelConfig) -> nn.Module | None:
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_first else None


def _feed_forward(config: ModelConfig) -> FeedForward:
    return FeedForward(
        config.d_model, config.d_ff, dropout=config.dropout, activation=config.activation
    )


def _encoder_layers(
    config: ModelConfig, graph: Callable[[], HeadGraph | None]
) -> list[EncoderLayer]:
    return [
        EncoderLayer(
            self_attn=build_attention(
                config, graph=graph(), carry=config.carry_head_states and i > 0
            ),
            feed_forward=_feed_forward(config),
            d_model=config.d_model,
            dropout=config.dropout,
            norm_first=config.norm_first,
            layer_norm_eps=config.layer_norm_eps,
        )
        for i in range(config.num_layers)
    ]


def _decoder_layers(
    config: ModelConfig, graph: Callable[[], HeadGraph | None]
) -> list[DecoderLayer]:
    return [
        DecoderLayer(
            self_attn=build_attention(
                config, graph=graph(), carry=config.carry_head_states and i > 0
            ),
            cross_attn=build_attention(config, graph=graph()),
            feed_forward=_feed_forward(config),
            d_model=config.d_model,
            dropout=config.dropout,
            norm_first=config.norm_first,
            layer_norm_eps=config.layer_norm_eps,
        )
        for i in range(config.num_decoder_layers or config.num_layers)
    ]


class DecoderOnlyLM(nn.Module):
    """A causal language model: embeddings, causal self-attention layers, LM head.

    Example::

        model = DecoderOnlyLM(ModelConfig(vocab_size=100, attention="goh", num_shared=1))
        out = model(tokens)                      # ModelOutput
        loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten()) + 0.01 * out.aux_loss

    Args:
        config: the model configuration.
        graph: a custom :class:`~graphheads.graph.HeadGraph` for every GoH block instead
            of the preset ``config.graph``: each block gets its own copy, or all blocks
            this one object when ``config.share_graph`` is set.
    """

    def __init__(self, config: ModelConfig, *, graph: HeadGraph | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = _Embedding(config)
        self.decoder = Encoder(
            _encoder_layers(config, _graph_factory(config, graph)),
            norm=_make_stack_norm(config),
            carry_head_states=config.carry_head_states,
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.token.weight

    def forward(
        self,
        tokens: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        cache: tuple[KVCache, ...] | None = None,
        use_cache: bool = False,
    ) -> ModelOutput:
        """tokens (b, t) -> :class:`ModelOutput` with logits (b, t, v).

        ``cache`` is the ``ModelOutput.cache`` of an earlier call: the tokens given now
        continue those sequences.
        """
        if cache is not None and len(cache) != len(self.decoder.layers):
            raise ValueError(
                f"DecoderOnlyLM: cache has {len(cache)} layers, model has "
                f"{len(self.decoder.layers)}"
            )
        offset = 0 if cache is None or not cache else cache[0].length
        x = self.embed(tokens, offset)
        stack = self.decoder(
            x, key_padding_mask=key_padding_mask, is_causal=True, cache=cache, use_cache=use_cache
        )
        routing, aux = _collect_routing([stack], x)
        return ModelOutput(
            self.lm_head(stack.hidden), routing, aux, stack.cache if use_cache else None
        )

    def head_graphs(self) -> list[HeadGraph]:
        """The current head graph of every layer (GoH attention only)."""
        return collect_head_graphs(self)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Continue ``prompt`` (b, t) by ``max_new_tokens`` tokens; returns (b, t + n).

        ``temperature=0`` is greedy decoding. With ``use_cache`` each step feeds only the
        newest token and reuses the keys and values of the earlier ones.
        """
        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        total = prompt.size(1) + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"generate: prompt ({prompt.size(1)}) + max_new_tokens ({max_new_tokens}) "
                f"exceeds max_seq_len ({self.config.max_seq_len})"
            )
        tokens = prompt
        cache: tuple[KVCache, ...] | None = None
        step_input = prompt
        for _ in range(max_new_tokens):
            if use_cache:
                out = self(step_input, cache=cache, use_cache=True)
                cache = out.cache
            else:
                out = self(tokens)
            next_token = sample_next_token(
                out.logits[:, -1], temperature=temperature, top_k=top_k, generator=generator
            )
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
        return tokens


class Transformer(nn.Module):
    """The encoder-decoder Transformer with shared source/target embeddings.

    ``forward(src, tgt)`` returns :class:`ModelOutput` with logits (b, t, v) for the
    target positions (teacher forcing, causal decoder self-attention). ``graph`` is as in
    :class:`DecoderOnlyLM`.
    """

    def __init__(self, config: ModelConfig, *, graph: HeadGraph | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = _Embedding(config)
        graph_factory = _graph_factory(config, graph)
        self.encoder = Encoder(
            _encoder_layers(config, graph_factory),
            norm=_make_stack_norm(config),
            carry_head_states=config.carry_head_states,
        )
        self.decoder = Decoder(
            _decoder_layers(config, graph_factory),
            norm=_make_stack_norm(config),
            carry_head_states=config.carry_head_states,
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.token.weight

    def encode(self, src: Tensor, *, src_key_padding_mask: Tensor | None = None) -> StackOutput:
        return self.encoder(self.embed(src), key_padding_mask=src_key_padding_mask)

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_key_padding_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory: StackOutput | None = None,
        cache: tuple[KVCache, ...] | None = None,
        use_cache: bool = False,
    ) -> ModelOutput:
        """src (b, s), tgt (b, t) -> logits (b, t, v). ``memory`` reuses an earlier
        :meth:`encode` of ``src``; ``cache`` continues an earlier decoder call."""
        enc = (
            memory
            if memory is not None
            else self.encode(src, src_key_padding_mask=src_key_padding_mask)
        )
        offset = 0 if not cache else cache[0].length
        dec = self.decoder(
            self.embed(tgt, offset),
            enc.hidden,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=src_key_padding_mask,
            is_causal=True,
            cache=cache,
            use_cache=use_cache,
        )
        stacks = [enc, dec] if memory is None else [dec]
        routing, aux = _collect_routing(stacks, dec.hidden)
        return ModelOutput(self.lm_head(dec.hidden), routing, aux, dec.cache if use_cache else None)

    def head_graphs(self) -> list[HeadGraph]:
        """The current head graph of every attention block (GoH attention only)."""
        return collect_head_graphs(self)

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        start_tokens: Tensor,
        max_new_tokens: int,
        *,
        src_key_padding_mask: Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Encode ``src`` once, then decode from ``start_tokens`` (b, t0) with a cache."""
        if start_tokens.size(1) + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"generate: start ({start_tokens.size(1)}) + max_new_tokens ({max_new_tokens}) "
                f"exceeds max_seq_len ({self.config.max_seq_len})"
            )
        memory = self.encode(src, src_key_padding_mask=src_key_padding_mask)
        tokens, step_input = start_tokens, start_tokens
        cache: tuple[KVCache, ...] | None = None
        for _ in range(max_new_tokens):
            out = self(
                src,
                step_input,
                src_key_padding_mask=src_key_padding_mask,
                memory=memory,
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
            next_token = sample_next_token(
                out.logits[:, -1], temperature=temperature, top_k=top_k, generator=generator
            )
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
        return tokens

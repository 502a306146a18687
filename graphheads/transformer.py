r"""The models: a decoder-only language model and the encoder-decoder Transformer of
Vaswani et al. 2017, built from :mod:`graphheads.blocks` by :mod:`graphheads.builders`.

Shape legend: b batch, t target/query tokens, s source tokens, d model width, v vocabulary.

Token ids are checked where they enter (datasets, :meth:`DecoderOnlyLM.generate`'s
prompt, the CLI; :func:`~graphheads.generation.check_token_ids`), not in ``forward``:
a forward pass never syncs with the host, so a whole model compiles with
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from graphheads.blocks import (
    FeedForward,
    LayerOutput,
    SinusoidalPositionalEncoding,
    StackOutput,
    TransformerBlock,
    TransformerStack,
)
from graphheads.builders import build_attention, build_stack, graph_source
from graphheads.compat import renamed_argument
from graphheads.config import ModelConfig
from graphheads.generation import cache_dtype, check_token_ids, decode, lm_step, sample_next_token
from graphheads.goh import collect_head_graphs
from graphheads.graph import HeadGraph
from graphheads.hub import HubMixin
from graphheads.types import KVCache, RoutingOutput

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
    "TokenEmbedding",
    "Transformer",
    "TransformerBlock",
    "TransformerStack",
    "build_attention",
    "sample_next_token",
]

# Names from before the one-block layout: an encoder layer is a block without
# cross-attention, a decoder layer one with it, and both stacks are the same loop.
EncoderLayer = DecoderLayer = TransformerBlock
Encoder = Decoder = TransformerStack


@dataclass
class ModelOutput:
    """What :class:`DecoderOnlyLM` and :class:`Transformer` return.

    Attributes:
        logits: (b, t, v).
        routing: the routing of every routed attention block, in stack order (encoder
            self-attention, then per decoder layer self- and cross-attention); empty for
            dense attention.
        routing_sites: where each entry of ``routing`` comes from, e.g.
            ``"encoder.0.self_attn"``, ``"decoder.1.cross_attn"``.
        aux_loss: the sum of the blocks' load-balance losses (a zero scalar when dense).
            Training adds ``beta * aux_loss / len(routing)`` (beta * the mean over layers).
        cache: per-layer self-attention key/value caches when ``use_cache=True``.
    """

    logits: Tensor
    routing: tuple[RoutingOutput, ...] = ()
    routing_sites: tuple[str, ...] = ()
    aux_loss: Tensor | None = None
    cache: tuple[KVCache, ...] | None = None

    def routing_of(self, stack: str) -> tuple[RoutingOutput, ...]:
        """The routing of the blocks of one stack ("encoder" or "decoder"): for the
        decoder these are the blocks whose queries are the target tokens."""
        return tuple(
            r
            for r, site in zip(self.routing, self.routing_sites, strict=True)
            if site.split(".", 1)[0] == stack
        )


def _model_output(
    logits: Tensor, stacks: list[tuple[str, StackOutput]], cache: tuple[KVCache, ...] | None
) -> ModelOutput:
    routing: list[RoutingOutput] = []
    sites: list[str] = []
    for name, stack in stacks:
        for i, layer in enumerate(stack.layers):
            for kind, attn in (("self_attn", layer.self_attn), ("cross_attn", layer.cross_attn)):
                if attn is not None and attn.routing is not None:
                    routing.append(attn.routing)
                    sites.append(f"{name}.{i}.{kind}")
    aux = logits.new_zeros(())
    for r in routing:
        aux = aux + r.load_balance_loss
    return ModelOutput(logits, tuple(routing), tuple(sites), aux, cache)


def _padding_mask(key_padding_mask: Tensor | None, num_tokens: int) -> Tensor | None:
    """(b, t) True at the padding among the last ``num_tokens`` keys (these tokens): a
    boolean mask as it is, an integer one where nonzero, a float (additive) one at -inf."""
    if key_padding_mask is None:
        return None
    mask = key_padding_mask[:, -num_tokens:]
    return mask.isneginf() if mask.is_floating_point() else mask.bool()


class TokenEmbedding(nn.Module):
    """Token embedding times sqrt(d) plus sinusoidal positions, then dropout (the paper's);
    with ``block="llama"`` the embedding alone (positions are rotary, in attention).

    Ids are not range-checked here (that would sync with the host in every forward):
    :func:`~graphheads.generation.check_token_ids` checks them where they enter.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.token.weight, std=config.d_model**-0.5)
        # Llama-style blocks carry positions in the attention (rotary), unscaled tokens
        self.position = (
            SinusoidalPositionalEncoding(config.d_model, config.max_seq_len)
            if config.block == "vaswani"
            else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.scale = math.sqrt(config.d_model) if config.block == "vaswani" else 1.0

    def forward(self, tokens: Tensor, offset: int = 0, shift: Tensor | None = None) -> Tensor:
        """Embeddings of ``tokens`` (b, t) at positions ``offset ..`` less ``shift`` (b,)
        (left padding) when given."""
        if tokens.dim() != 2:
            raise ValueError(
                f"expected token ids of shape (batch, tokens), got {tuple(tokens.shape)}"
            )
        x = self.token(tokens) * self.scale
        return self.dropout(x if self.position is None else self.position(x, offset, shift))


class DecoderOnlyLM(HubMixin):
    """A causal language model: embeddings, causal self-attention blocks, LM head.

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
        self.embed = TokenEmbedding(config)
        self.decoder = build_stack(
            config, graph_source(config, graph), num_layers=config.num_layers, cross_attention=False
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.token.weight
        # task-conditioned routing: a learned embedding per task added to every router's
        # input (zero at init: the routing starts as without it)
        self.task_embedding = (
            nn.Embedding(config.task_embeddings, config.d_model)
            if config.task_embeddings > 0
            else None
        )
        if self.task_embedding is not None:
            nn.init.zeros_(self.task_embedding.weight)

    def forward(
        self,
        tokens: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        cache: tuple[KVCache, ...] | None = None,
        use_cache: bool = False,
        task_ids: Tensor | None = None,
    ) -> ModelOutput:
        """tokens (b, t) -> :class:`ModelOutput` with logits (b, t, v).

        ``key_padding_mask`` (b, past + t) marks padding (True) among the cached and the
        new tokens: no query attends to it and the load-balance loss skips it. Positions
        are not shifted by it: left-padded sequences keep their positions from each
        one's first real token only through a cache made with ``left_padding``
        (``self.decoder.empty_cache(b, capacity, left_padding=mask.sum(1))``), as
        ``generate`` does. ``cache`` is the ``ModelOutput.cache`` of an earlier call
        (or such an empty one): the tokens given now continue those sequences.
        ``task_ids`` (b,) select each sequence's task embedding for task-conditioned
        routing (models with ``config.task_embeddings``).
        """
        offset = cache[0].length if cache else 0
        x = self.embed(tokens, offset, cache[0].left_padding if cache else None)
        context = None
        if task_ids is not None:
            if self.task_embedding is None:
                raise ValueError(
                    "DecoderOnlyLM: task_ids given, but the model has no task embedding "
                    "(ModelConfig.task_embeddings is 0)"
                )
            context = self.task_embedding(task_ids)
        stack = self.decoder(
            x,
            key_padding_mask=key_padding_mask,
            is_causal=True,
            cache=cache,
            use_cache=use_cache,
            padding_mask=_padding_mask(key_padding_mask, tokens.size(1)),
            router_context=context,
        )
        return _model_output(
            self.lm_head(stack.hidden), [("decoder", stack)], stack.cache if use_cache else None
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
        sample_top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        key_padding_mask: Tensor | None = None,
        sliding_window: bool = False,
        top_k: int | None = None,  # deprecated: sample_top_k
    ) -> Tensor:
        """Continue ``prompt`` (b, t) by ``max_new_tokens`` tokens; returns (b, t + n).

        ``temperature=0`` is greedy decoding; else sampling, from the ``sample_top_k``
        best tokens when given (``top_k`` is its deprecated name). With ``use_cache``
        each step feeds only the newest token and reuses the keys and values of the
        earlier ones.

        Prompts of different lengths go in one batch left-padded: ``key_padding_mask``
        (b, t) is True at the padding, which must come before each prompt's first token.
        Each sequence is then continued as it would be alone: padding is never attended
        to, and positions count from its first real token.

        ``sliding_window=True`` (rotary positions: ``block="llama"``) generates past
        ``max_seq_len``: each step sees the newest ``max_seq_len`` tokens, and the cache
        keeps the keys and values computed when its tokens were seen (rotated at their
        own positions), as a streaming cache does; without a cache each step recomputes
        the window. The sinusoidal block's positions end at ``max_seq_len``: refused.
        """
        sample_top_k = renamed_argument(  # under @torch.no_grad(): one frame more
            "generate", "top_k", top_k, "sample_top_k", sample_top_k, stacklevel=4
        )
        window = self.config.max_seq_len
        if sliding_window and self.config.block != "llama":
            raise ValueError(
                "generate: sliding_window needs rotary positions (block='llama'); the "
                f"sinusoidal positions of block={self.config.block!r} end at max_seq_len "
                f"({window})"
            )
        step = lm_step(
            self,
            prompt,
            max_new_tokens,
            use_cache=use_cache,
            key_padding_mask=key_padding_mask,
            window=window if sliding_window else None,
        )
        return decode(
            step,
            prompt,
            max_new_tokens,
            vocab_size=self.config.vocab_size,
            max_len=self.config.max_seq_len,
            temperature=temperature,
            sample_top_k=sample_top_k,
            generator=generator,
            sliding_window=sliding_window,
            past_context_hint="; rotary models go past it with sliding_window=True"
            if self.config.block == "llama"
            else "",
        )


class Transformer(HubMixin):
    """The encoder-decoder Transformer with shared source/target embeddings.

    ``forward(src, tgt)`` returns :class:`ModelOutput` with logits (b, t, v) for the
    target positions (teacher forcing, causal decoder self-attention). ``graph`` is as in
    :class:`DecoderOnlyLM`.
    """

    def __init__(self, config: ModelConfig, *, graph: HeadGraph | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config)
        graphs = graph_source(config, graph)
        self.encoder = build_stack(
            config, graphs, num_layers=config.num_layers, cross_attention=False
        )
        self.decoder = build_stack(
            config,
            graphs,
            num_layers=config.num_decoder_layers or config.num_layers,
            cross_attention=True,
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.token.weight

    def encode(self, src: Tensor, *, src_key_padding_mask: Tensor | None = None) -> StackOutput:
        return self.encoder(
            self.embed(src),
            key_padding_mask=src_key_padding_mask,
            padding_mask=_padding_mask(src_key_padding_mask, src.size(1)),
        )

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
        memory_kv: tuple[KVCache, ...] | None = None,
    ) -> ModelOutput:
        """src (b, s), tgt (b, t) -> logits (b, t, v). ``memory`` reuses an earlier
        :meth:`encode` of ``src``; ``cache`` continues an earlier decoder call;
        ``memory_kv`` are the decoder's cross-attention keys and values of ``memory``
        (``self.decoder.memory_kv(memory.hidden)``), reused across decoding steps."""
        enc = (
            memory
            if memory is not None
            else self.encode(src, src_key_padding_mask=src_key_padding_mask)
        )
        offset = cache[0].length if cache else 0
        dec = self.decoder(
            self.embed(tgt, offset, cache[0].left_padding if cache else None),
            enc.hidden,
            key_padding_mask=tgt_key_padding_mask,
            is_causal=True,
            memory_key_padding_mask=src_key_padding_mask,
            cache=cache,
            use_cache=use_cache,
            memory_kv=memory_kv,
            padding_mask=_padding_mask(tgt_key_padding_mask, tgt.size(1)),
        )
        stacks = [("decoder", dec)] if memory is not None else [("encoder", enc), ("decoder", dec)]
        return _model_output(self.lm_head(dec.hidden), stacks, dec.cache if use_cache else None)

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
        sample_top_k: int | None = None,
        generator: torch.Generator | None = None,
        top_k: int | None = None,  # deprecated: sample_top_k
    ) -> Tensor:
        """Encode ``src`` once, then decode from ``start_tokens`` (b, t0) with a
        preallocated cache; the cross-attention keys and values of the memory are
        computed once. Sampling as in :meth:`DecoderOnlyLM.generate`."""
        sample_top_k = renamed_argument(  # under @torch.no_grad(): one frame more
            "generate", "top_k", top_k, "sample_top_k", sample_top_k, stacklevel=4
        )
        check_token_ids(src, self.config.vocab_size, owner="generate: src")
        memory = self.encode(src, src_key_padding_mask=src_key_padding_mask)
        memory_kv = self.decoder.memory_kv(memory.hidden)
        capacity = start_tokens.size(1) + max_new_tokens

        def step(
            new: Tensor, _tokens: Tensor, cache: tuple[KVCache, ...] | None
        ) -> tuple[Tensor, tuple[KVCache, ...] | None]:
            if cache is None:
                cache = self.decoder.empty_cache(
                    new.size(0), capacity, dtype=cache_dtype(self.lm_head.weight), device=new.device
                )
            out = self(
                src,
                new,
                src_key_padding_mask=src_key_padding_mask,
                memory=memory,
                cache=cache,
                use_cache=True,
                memory_kv=memory_kv,
            )
            return out.logits[:, -1], out.cache

        return decode(
            step,
            start_tokens,
            max_new_tokens,
            vocab_size=self.config.vocab_size,
            max_len=self.config.max_seq_len,
            temperature=temperature,
            sample_top_k=sample_top_k,
            generator=generator,
        )

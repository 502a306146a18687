"""Token generation shared by every model: one decoding loop, the sampling rule and the
token-id check made where ids enter (a prompt), not inside a forward pass.

Shape legend: b batch, t tokens, v vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from graphheads.compat import renamed_argument
from graphheads.gates import autocast_dtype

__all__ = ["cache_dtype", "check_token_ids", "decode", "left_padding_counts", "sample_next_token"]

State = TypeVar("State")


def check_token_ids(tokens: Tensor, vocab_size: int, *, owner: str = "tokens") -> None:
    """ValueError unless ``tokens`` is (b, t) integer ids in ``[0, vocab_size)``.

    One host sync; call it where ids enter (datasets, prompts, the CLI), never in a
    forward pass."""
    if tokens.dim() != 2 or tokens.is_floating_point():
        raise ValueError(
            f"{owner}: expected integer token ids of shape (batch, tokens), got "
            f"{tuple(tokens.shape)} of {tokens.dtype}"
        )
    if tokens.numel():
        low, high = (int(v) for v in torch.aminmax(tokens))
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{owner}: token ids must lie in [0, {vocab_size}), got range [{low}, {high}]"
            )


def left_padding_counts(
    key_padding_mask: Tensor,
    shape: torch.Size | tuple[int, ...],
    device: torch.device | None = None,
    *,
    owner: str = "generate",
) -> Tensor:
    """(b,) long: the padding before each prompt's first token, from ``key_padding_mask``
    (b, t) True at padding. ValueError unless the mask has the prompt's ``shape`` (and
    ``device``, when given), is boolean, pads on the left only and leaves every prompt
    at least one token.

    One host sync; call it where prompts enter, never in a forward pass."""
    if device is not None and key_padding_mask.device != device:
        raise ValueError(
            f"{owner}: key_padding_mask is on {key_padding_mask.device}, the prompt on {device}"
        )
    if tuple(key_padding_mask.shape) != tuple(shape) or key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"{owner}: key_padding_mask must be a bool tensor of the prompt's shape "
            f"{tuple(shape)}, got {tuple(key_padding_mask.shape)} of {key_padding_mask.dtype}"
        )
    counts = key_padding_mask.sum(dim=1)
    positions = torch.arange(key_padding_mask.size(1), device=key_padding_mask.device)
    left = positions.unsqueeze(0) < counts.unsqueeze(1)  # what left padding would look like
    bad = (left != key_padding_mask).any(dim=1) | (counts == key_padding_mask.size(1))
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{owner}: key_padding_mask must pad prompts on the left and leave each at least "
            f"one token; rows {rows} do not"
        )
    return counts


def cache_dtype(weight: Tensor) -> torch.dtype:
    """The dtype keys and values will have in a model with this ``weight``: autocast's
    when autocast is on for its device (bf16 keys into an fp32 buffer would copy the
    whole cache at every token), else the weight's."""
    return autocast_dtype(weight.device.type) or weight.dtype


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    sample_top_k: int | None = None,
    generator: torch.Generator | None = None,
    top_k: int | None = None,  # deprecated: sample_top_k
) -> Tensor:
    """Pick the next token from (b, v) logits: greedy when ``temperature == 0``,
    else sampling from ``softmax(logits / temperature)`` restricted to the
    ``sample_top_k`` best (``top_k`` is its deprecated name: ``top_k`` means routed
    heads everywhere else)."""
    sample_top_k = renamed_argument(
        "sample_next_token", "top_k", top_k, "sample_top_k", sample_top_k
    )
    if temperature < 0:
        raise ValueError(f"sample_next_token: temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if sample_top_k is not None:
        if sample_top_k < 1:
            raise ValueError(f"sample_next_token: sample_top_k must be >= 1, got {sample_top_k}")
        kth = torch.topk(logits, min(sample_top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode(
    step: Callable[[Tensor, Tensor, State | None], tuple[Tensor, State | None]],
    prompt: Tensor,
    max_new_tokens: int,
    *,
    vocab_size: int,
    max_len: int,
    temperature: float = 0.0,
    sample_top_k: int | None = None,
    generator: torch.Generator | None = None,
    owner: str = "generate",
    sliding_window: bool = False,
    past_context_hint: str = "",
    top_k: int | None = None,  # deprecated: sample_top_k
) -> Tensor:
    """Continue ``prompt`` (b, t) by ``max_new_tokens`` tokens; returns (b, t + n).

    ``step(new_tokens, all_tokens, state)`` returns the next-token logits (b, v) and the
    state for the next call (e.g. a key/value cache; ``None`` at the first call).
    With ``sliding_window`` the sequence may grow past ``max_len`` (``step`` keeps to the
    window); the prompt must still fit. ``past_context_hint`` ends the refusal of a
    sequence past ``max_len`` without it (how to go past it, where the model can).
    """
    sample_top_k = renamed_argument("decode", "top_k", top_k, "sample_top_k", sample_top_k)
    check_token_ids(prompt, vocab_size, owner=f"{owner}: prompt")
    if prompt.size(1) == 0:
        raise ValueError(f"{owner}: the prompt must hold at least one token per row")
    if max_new_tokens < 0:
        raise ValueError(f"{owner}: max_new_tokens must be >= 0, got {max_new_tokens}")
    if sliding_window and prompt.size(1) > max_len:
        raise ValueError(
            f"{owner}: the prompt ({prompt.size(1)} tokens) exceeds max_seq_len ({max_len})"
        )
    if not sliding_window and prompt.size(1) + max_new_tokens - 1 > max_len:
        raise ValueError(
            f"{owner}: prompt ({prompt.size(1)}) + max_new_tokens ({max_new_tokens}) - 1 "
            f"positions exceed max_seq_len ({max_len}){past_context_hint}"
        )
    tokens, new, state = prompt, prompt, None
    for _ in range(max_new_tokens):
        logits, state = step(new, tokens, state)
        next_token = sample_next_token(
            logits, temperature=temperature, sample_top_k=sample_top_k, generator=generator
        )
        new = next_token[:, None]
        tokens = torch.cat([tokens, new], dim=1)
    return tokens


def lm_step(
    model: Any,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool,
    key_padding_mask: Tensor | None,
    window: int | None,
) -> Callable[[Tensor, Tensor, Any], tuple[Tensor, Any]]:
    """The ``step`` of :func:`decode` for a decoder-only LM ``model`` (its
    ``decoder.empty_cache``, ``lm_head`` and forward), as
    :meth:`~graphheads.transformer.DecoderOnlyLM.generate` uses it: a preallocated cache
    written in place, left padding (``key_padding_mask``, True at padding) with
    positions from each prompt's first real token, and with ``window`` (a sliding
    window of that many tokens) a cache that drops its oldest tokens."""
    max_len = window if window is not None else prompt.size(1) + max_new_tokens
    capacity = min(prompt.size(1) + max_new_tokens, max_len)
    left_padding = None
    if key_padding_mask is not None:
        left_padding = left_padding_counts(key_padding_mask, prompt.shape, prompt.device)

    def padding(tokens: Tensor, seen: int) -> Tensor | None:  # (b, the last `seen`)
        if key_padding_mask is None:
            return None
        mask = F.pad(key_padding_mask, (0, tokens.size(1) - key_padding_mask.size(1)))
        return mask[:, mask.size(1) - seen :]

    def empty(dropped: int = 0) -> Any:  # preallocated: in-place steps
        shift = left_padding
        if dropped:  # a window starting `dropped` tokens in: positions from there
            base = prompt.new_zeros(prompt.size(0)) if shift is None else shift
            shift = base - dropped
        return model.decoder.empty_cache(
            prompt.size(0),
            capacity,
            dtype=cache_dtype(model.lm_head.weight),
            device=prompt.device,
            left_padding=shift,
        )

    def step(new: Tensor, tokens: Tensor, cache: Any) -> tuple[Tensor, Any]:
        if not use_cache:  # the whole sequence again (an empty cache: its positions)
            dropped = max(tokens.size(1) - max_len, 0)
            fresh = empty(dropped) if left_padding is not None or dropped else None
            mask = padding(tokens, tokens.size(1) - dropped)
            out = model(tokens[:, dropped:], key_padding_mask=mask, cache=fresh)
            return out.logits[:, -1], None
        cache = cache or empty()
        past = cache[0].length
        if past + new.size(1) > max_len:  # a sliding window (decode refuses it otherwise)
            cache = tuple(c.drop_front(past + new.size(1) - max_len) for c in cache)
            past = max_len - new.size(1)
        mask = padding(tokens, past + new.size(1))
        out = model(new, key_padding_mask=mask, cache=cache, use_cache=True)
        return out.logits[:, -1], out.cache

    return step

"""Masks merged into one additive attention bias, built once per forward.

Conventions (those of :class:`torch.nn.MultiheadAttention`): ``key_padding_mask`` (b, s)
``True`` marks a padding key; ``attn_mask`` (t, s), (b * h, t, s) or (b|1, h|1, t|1, s),
boolean ``True`` forbids a pair, a float mask is added; ``is_causal=True`` aligns the
causal mask bottom-right (decoding with a key/value cache).

Shape legend: b batch, h heads, t query tokens, s key tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["build_attention_bias", "self_attention_mask"]


def build_attention_bias(
    *,
    batch_size: int,
    num_heads: int,
    query_len: int,
    key_len: int,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    dtype: torch.dtype,
    device: torch.device,
    owner: str = "MultiHeadAttention",
) -> Tensor | None:
    """Merge the user-facing masks into one additive bias of shape (b or 1, h or 1, t, s).

    ``attn_mask`` may be (t, s), (b * h, t, s) or 4-D (b or 1, h or 1, t or 1, s), the
    size-1 axes broadcast: a bias this function returned can be passed back in, which is
    how a stack builds its mask once and hands it to every layer.
    Returns ``None`` when no mask applies. Raises ValueError for a mask of the wrong shape.
    """
    b, h, t, s = batch_size, num_heads, query_len, key_len
    bias: Tensor | None = None

    def as_bias(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
                mask, float("-inf")
            )
        return mask.to(dtype)

    if attn_mask is not None:
        shape = tuple(attn_mask.shape)
        if shape == (t, s):
            bias = as_bias(attn_mask).view(1, 1, t, s)
        elif shape == (b * h, t, s):
            bias = as_bias(attn_mask).view(b, h, t, s)
        elif (
            len(shape) == 4
            and shape[0] in (1, b)
            and shape[1] in (1, h)
            and shape[2] in (1, t)
            and shape[3] == s
        ):
            bias = as_bias(attn_mask)
        else:
            raise ValueError(
                f"{owner}: attn_mask has shape {shape}; expected ({t}, {s}), "
                f"({b * h}, {t}, {s}) or ({b} or 1, {h} or 1, {t} or 1, {s})"
            )
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (b, s):
            raise ValueError(
                f"{owner}: key_padding_mask has shape {tuple(key_padding_mask.shape)}; "
                f"expected (batch, key_len) = ({b}, {s})"
            )
        padding = as_bias(key_padding_mask).view(b, 1, 1, s)
        bias = padding if bias is None else bias + padding
    if is_causal and t > 1:  # one query at the end of the keys sees them all
        offset = s - t  # keys already in the cache come before the first query
        future = torch.ones(t, s, dtype=torch.bool, device=device).triu(diagonal=offset + 1)
        causal = as_bias(future).view(1, 1, t, s)
        bias = causal if bias is None else bias + causal
    return bias


def self_attention_mask(
    *,
    batch_size: int,
    num_heads: int,
    query_len: int,
    key_len: int,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor | None, bool]:
    """The self-attention mask of a whole stack, built once per forward.

    Returns ``(attn_mask, is_causal)`` to pass to every layer: no mask, or plain causal
    attention with as many queries as keys, stays as it is (``is_causal=True`` lets the
    kernels use their own causal path, nothing materialised); anything else becomes one
    additive bias (b or 1, h or 1, t, s) with ``is_causal=False``.
    """
    if attn_mask is None and key_padding_mask is None and (not is_causal or query_len == key_len):
        return None, is_causal
    bias = build_attention_bias(
        batch_size=batch_size,
        num_heads=num_heads,
        query_len=query_len,
        key_len=key_len,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        is_causal=is_causal,
        dtype=dtype,
        device=device,
        owner="self_attention_mask",
    )
    return bias, False

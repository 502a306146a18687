"""The small types that flow between graphheads modules: attention and routing outputs,
and the key/value cache. This module imports nothing of ours, so every other module can
use these types without an import cycle.

Shape legend: b batch, t query tokens, s key tokens, h heads, r routed heads,
k top-k, e head width, f node features, d model width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["AttentionOutput", "KVBuffer", "KVCache", "RoutingOutput"]


@dataclass
class KVBuffer:
    """Preallocated key/value storage of one attention module, shared by the
    :class:`KVCache` objects that are prefixes of it: ``filled`` tokens are written."""

    key: Tensor  # (b, h, capacity, e)
    value: Tensor  # (b, h, capacity, e)
    filled: int = 0
    adopt_dtype: bool = False  # no dtype was asked for: take the first keys'

    @property
    def capacity(self) -> int:
        return int(self.key.size(-2))


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far by one attention module.

    A forward pass never changes what a cache holds: it returns a new one. A cache made
    by :meth:`empty` writes appended tokens into preallocated storage (``buffer``), so
    decoding costs no ``torch.cat`` per token; the new cache is a longer view of that
    storage and the old one still reads its own prefix. Appending to a cache that is not
    the storage's newest (branching), beyond its capacity, or under autograd copies
    instead, with the same result. Storage made without a dtype takes that of the first
    keys appended (bf16 under autocast), so mixed precision decodes in place too.
    """

    key: Tensor  # (b, h, s, e)
    value: Tensor  # (b, h, s, e)
    buffer: KVBuffer | None = field(default=None, repr=False, compare=False)
    # (b,) long: slots of left padding before each sequence's first token (ragged
    # prompts); a token at slot j is at position j - left_padding (rotary, sinusoidal)
    left_padding: Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(
        cls,
        batch_size: int,
        num_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        left_padding: Tensor | None = None,
    ) -> KVCache:
        """A cache of length 0 with room for ``capacity`` tokens, in ``dtype``; without one,
        in the dtype of the first keys appended (bf16 under autocast). ``left_padding``
        (b,): slots of padding before each sequence's first token (left-padded prompts
        of different lengths): positions count from each sequence's first real token."""
        if min(batch_size, num_heads, capacity, head_dim) < 1:
            raise ValueError(
                "KVCache.empty: batch_size, num_heads, capacity and head_dim must be >= 1, got "
                f"{(batch_size, num_heads, capacity, head_dim)}"
            )
        if left_padding is not None and (
            tuple(left_padding.shape) != (batch_size,) or left_padding.is_floating_point()
        ):
            raise ValueError(
                f"KVCache.empty: left_padding must be ({batch_size},) integers, got "
                f"{tuple(left_padding.shape)} of {left_padding.dtype}"
            )
        shape = (batch_size, num_heads, capacity, head_dim)
        buffer = KVBuffer(
            torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device),
            adopt_dtype=dtype is None,
        )
        return cls(buffer.key[:, :, :0], buffer.value[:, :, :0], buffer, left_padding)

    @property
    def length(self) -> int:
        return int(self.key.size(-2))

    def drop_front(self, n: int) -> KVCache:
        """This cache without its first ``n`` tokens (a sliding window); the others keep
        their positions (``left_padding`` less ``n``). Appending to it copies."""
        shift = self.left_padding
        if shift is None:
            shift = torch.zeros(self.key.size(0), dtype=torch.long, device=self.key.device)
        return KVCache(self.key[:, :, n:], self.value[:, :, n:], left_padding=shift - n)

    def append(self, key: Tensor, value: Tensor) -> KVCache:
        """This cache followed by ``key``, ``value`` (b, h, n, e)."""
        s, n, buf = self.length, key.size(-2), self.buffer
        if (
            buf is not None
            and buf.adopt_dtype
            and buf.filled == 0 == s
            and buf.key.dtype != key.dtype
        ):
            # nothing written yet and no dtype asked for: the storage takes the keys' (e.g.
            # bf16 under autocast)
            buf.key = torch.empty(buf.key.shape, dtype=key.dtype, device=buf.key.device)
            buf.value = torch.empty(buf.value.shape, dtype=value.dtype, device=buf.key.device)
        in_place = (
            buf is not None
            and buf.filled == s
            and s + n <= buf.capacity
            and key.shape[:2] == buf.key.shape[:2]
            and key.dtype == buf.key.dtype
            and not (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad))
        )
        if not in_place:
            return KVCache(
                torch.cat([self.key, key], dim=-2),
                torch.cat([self.value, value], dim=-2),
                left_padding=self.left_padding,
            )
        assert buf is not None
        buf.key[:, :, s : s + n] = key
        buf.value[:, :, s : s + n] = value
        buf.filled = s + n
        return KVCache(buf.key[:, :, : s + n], buf.value[:, :, : s + n], buf, self.left_padding)


@dataclass
class RoutingOutput:
    """The routing of one attention block.

    Attributes:
        gates: (b, t, h) the weight of every head's output; 0 for unchosen routed heads.
        router_probs: (b, t, r) softmax over the routed heads (``p``).
        routed_mask: (b, t, r) 1.0 where a routed head is chosen (``m``).
        top_k_indices: (b, t, k) the chosen routed heads, counted among routed heads
            (add ``num_shared`` for the head index).
        load_balance_loss: scalar ``H_r * sum_i P_i f_i`` over the real tokens (0 without
            routed heads).
        head_states: (b, t, h, f) the graph-router's final node states (GoH only).
    """

    gates: Tensor
    router_probs: Tensor
    routed_mask: Tensor
    top_k_indices: Tensor
    load_balance_loss: Tensor
    head_states: Tensor | None = None

    @property
    def num_shared(self) -> int:
        return int(self.gates.size(-1) - self.routed_mask.size(-1))

    @property
    def active_heads(self) -> Tensor:
        """(b, t, h) bool: True for every head a token uses (shared heads always)."""
        shared = self.routed_mask.new_ones((*self.routed_mask.shape[:-1], self.num_shared))
        return torch.cat([shared, self.routed_mask], dim=-1) > 0

    @property
    def active_head_indices(self) -> Tensor:
        """(b, t, num_shared + k) long: the heads every token uses, shared heads first,
        then the top-k routed heads (as head indices); the same count for every token."""
        lead = self.top_k_indices.shape[:-1]
        shared = torch.arange(self.num_shared, device=self.top_k_indices.device)
        routed = self.top_k_indices.long() + self.num_shared
        return torch.cat([shared.expand(*lead, self.num_shared), routed], dim=-1)


@dataclass
class AttentionOutput:
    """What an attention module returns.

    Attributes:
        output: (b, t, d) attention output after the output projection.
        routing: the head routing for routed attention (MoH / GoH), else ``None``.
        cache: the updated key/value cache when ``use_cache=True``, else ``None``.
    """

    output: Tensor
    routing: RoutingOutput | None = None
    cache: KVCache | None = None

"""The small types that flow between graphheads modules: attention and routing outputs,
and the key/value cache. This module imports nothing of ours, so every other module can
use these types without an import cycle.

Shape legend: b batch, t query tokens, s key tokens, h heads, r routed heads,
k top-k, e head width, f node features, d model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AttentionOutput", "KVCache", "RoutingOutput"]


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far by one attention module.

    A forward pass never mutates a cache: it returns a new one (immutable style, no
    hidden state on the module).
    """

    key: Tensor  # (b, h, s, e)
    value: Tensor  # (b, h, s, e)

    @property
    def length(self) -> int:
        return int(self.key.size(-2))

    def append(self, key: Tensor, value: Tensor) -> KVCache:
        return KVCache(torch.cat([self.key, key], dim=-2), torch.cat([self.value, value], dim=-2))


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

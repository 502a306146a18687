r"""Rotary position embeddings (RoFormer, Su et al. 2021, https://arxiv.org/abs/2104.09864)
in the layout Llama uses: the head width is split in two halves that rotate together,

.. math::
    \mathrm{RoPE}(x)_p = x \cos(p \theta) + \mathrm{rotate\_half}(x) \sin(p \theta), \quad
    \theta_i = \mathrm{base}^{-2i/e}, \quad \mathrm{rotate\_half}([x_1, x_2]) = [-x_2, x_1]

for a query or key at position p. Angles are computed in fp32.

Shape legend: b batch, h heads, t tokens, e head width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Rotates queries and keys (b, h, t, e) by their positions ``offset .. offset + t - 1``.

    Args:
        head_dim: e (even).
        max_len: the longest sequence (positions beyond it raise ValueError).
        base: the frequency base (Llama's ``rope_theta``, default 10000).
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.max_len = max_len
        self.base = float(base)
        inv_freq = 1.0 / (
            self.base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # a constant

    def forward(self, x: Tensor, offset: int = 0, shift: Tensor | None = None) -> Tensor:
        """``shift`` (b,): subtracted from each sequence's positions (left padding; the
        positions of padding, below 0, become 0)."""
        t = x.size(-2)
        if offset + t > self.max_len:
            raise ValueError(
                f"RotaryEmbedding: positions {offset}..{offset + t - 1} exceed max_seq_len "
                f"({self.max_len})"
            )
        positions = torch.arange(offset, offset + t, device=x.device, dtype=torch.float32)
        if shift is not None:  # (b, 1, t): per sequence, broadcast over heads
            positions = (positions - shift.view(-1, 1, 1).to(positions.dtype)).clamp_min(0)
        angles = positions.unsqueeze(-1) * self.inv_freq.to(x.device)  # (..., t, e / 2)
        angles = torch.cat([angles, angles], dim=-1)  # (..., t, e)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        half = x.size(-1) // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_len={self.max_len}, base={self.base}"

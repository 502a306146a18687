r"""FlexAttention for routed heads: each (sequence, routed head) attends with only its
active queries, packed in position order, and a block mask built from their positions.

The chunked sparse path (:func:`graphheads.sparse.sparse_routed_attention`) gathers the
active rows too, but hands SDPA a float mask per chunk (rows x keys) to keep causality,
and that mask costs about a third of its time. Here the mask is a rule,
``key <= last[b, head, row]`` (``last`` = the row's position plus ``s - t``), and the
:class:`~torch.nn.attention.flex_attention.BlockMask` is made directly from the rows'
positions (:func:`routed_block_mask`): query block i visits key
blocks up to the one holding its largest ``last`` (``BlockMask.from_kv_blocks``), and key
blocks every row of the block sees in full skip the rule. Padding rows (past a head's
active count) see what its last real row sees. Nothing of size rows x keys is ever
materialised. An additive mask (padding, or per query row) enters as a
``score_mod``.

Where it runs: PyTorch's FlexAttention (``torch.nn.attention.flex_attention``) needs
``torch.compile`` to be fast. On CUDA it runs forward and backward; on CPU the compiled
kernel is inference only (it refuses inputs that require grad), and every new shape
(batch, packed rows rounded up to the block size, keys) compiles once (seconds; a C++
compiler is needed). It has no attention dropout, and on CUDA (torch 2.11's Inductor) no
heads under 16 wide. :func:`flex_supported` says whether it
applies; ``sparse_backend="auto"`` (:func:`choose_sparse_backend`) uses it on CUDA only:
on CPU the compiled kernel measured slower than the chunked path (it computes a (row,
key) pair about 2.3x slower than PyTorch's flash kernel at head width 32), so there it
is an explicit choice (``sparse_backend="flex"``).

Shape legend: b batch, t query tokens, s key tokens, r routed heads, M packed rows per
(sequence, head) (a multiple of the block size), e head width, d model width.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "BLOCK_SIZE",
    "choose_sparse_backend",
    "flex_routed_heads",
    "flex_supported",
    "routed_block_mask",
]

BLOCK_SIZE = 128  # FlexAttention's default block: rows and keys per tile
PROJECTION_ROWS = 256  # rows per (sequence, head) projected at a time (bounds memory)


@functools.cache
def _has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


FLEX_MIN_HEAD_DIM_CUDA = 16  # Inductor's CUDA template: "must be at least 16" (torch 2.11)


def flex_supported(
    device: torch.device, *, grad: bool, dropout_p: float, head_dim: int | None = None
) -> str | None:
    """``None`` when the FlexAttention backend can run here for heads ``head_dim`` wide
    (``None``: any width), else the reason it cannot."""
    if not _has_flex():  # looked up once: the sparse path asks at every layer
        return f"this PyTorch ({torch.__version__}) has no FlexAttention"
    if dropout_p > 0:
        return "FlexAttention has no attention dropout"
    if device.type == "cpu" and grad:
        return "FlexAttention on CPU runs only without autograd (inference)"
    if device.type not in ("cpu", "cuda"):
        return f"FlexAttention runs on CPU and CUDA, not {device.type}"
    if device.type == "cuda" and head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM_CUDA:
        return (
            f"FlexAttention on CUDA needs heads at least {FLEX_MIN_HEAD_DIM_CUDA} wide, "
            f"got {head_dim}"
        )
    return None


def choose_sparse_backend(
    setting: str, device: torch.device, *, grad: bool, dropout_p: float, head_dim: int | None = None
) -> Literal["chunked", "flex"]:
    """The sparse path's backend for one call: ``setting`` ``"flex"`` or ``"chunked"``
    as given; ``"auto"`` takes FlexAttention on CUDA where it runs, and the chunked path
    on CPU, where the compiled FlexAttention kernel measured slower (1.05-1.18x the
    chunked path's time at T 512-2048, docs/benchmarks.md) besides compiling every new
    shape."""
    if setting != "auto":
        return "flex" if setting == "flex" else "chunked"
    usable = flex_supported(device, grad=grad, dropout_p=dropout_p, head_dim=head_dim) is None
    return "flex" if usable and device.type == "cuda" else "chunked"


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # static shapes: automatic dynamic-shape recompiles of the CPU template fail to build
    # in torch 2.13 for key lengths that are not a multiple of the block size
    return torch.compile(flex_attention, dynamic=False)


def routed_block_mask(last: Tensor, key_len: int, block_size: int = BLOCK_SIZE) -> Any:
    """The block mask of rule ``key <= last[b, head, row]`` for ``last`` (b, r, M), M a
    multiple of ``block_size``: query block i visits the key blocks up to the one holding
    its largest ``last``; those every row of it sees in full are "full" blocks (no rule
    applied)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, r, rows = last.shape
    q_blocks, k_blocks = rows // block_size, -(-key_len // block_size)
    per_block = last.view(b, r, q_blocks, block_size)
    visited = per_block.amax(-1) // block_size + 1  # (b, r, q_blocks)
    full = ((per_block.amin(-1) + 1) // block_size).clamp(max=key_len // block_size)
    blocks = torch.arange(k_blocks, device=last.device).expand(b, r, q_blocks, k_blocks)
    partial_idx = (blocks + full.unsqueeze(-1)).clamp(max=k_blocks - 1)
    as_int = functools.partial(torch.Tensor.to, dtype=torch.int32)

    def mask_mod(batch: Tensor, head: Tensor, row: Tensor, key: Tensor) -> Tensor:
        return key <= last[batch, head, row]

    return BlockMask.from_kv_blocks(
        as_int(visited - full),
        as_int(partial_idx).contiguous(),
        as_int(full),
        as_int(blocks).contiguous(),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(rows, key_len),
    )


def flex_routed_heads(
    out: Tensor,
    query: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    active: Tensor,
    *,
    w_q: Tensor,
    b_q: Tensor | None,
    w_o: Tensor,
    q_all: Tensor | None,
    bias: Tensor | None,
    num_shared: int,
    is_causal: bool,
) -> None:
    """Add the routed heads' contributions to ``out`` (b, t, d) in place, as
    ``graphheads.sparse``'s chunked path does (same arguments: keys and values (r, b, s,
    e), gates (b, t, r), ``active`` (b, t, r) bool, weight views ``w_q``/``w_o`` (r, e,
    d), ``bias`` (b|1, h|1, t|1, s) additive), with one FlexAttention call."""
    b, t, d = query.shape
    r, s, e = k.size(0), k.size(-2), k.size(-1)
    order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices  # (b, t, r)
    counts = active.sum(dim=1)  # (b, r)
    m = int(counts.max())  # the one host sync
    if m == 0:
        return
    rows = -(-m // BLOCK_SIZE) * BLOCK_SIZE
    idx = order.transpose(1, 2)[..., : min(rows, t)]  # (b, r, M') token positions
    idx = torch.nn.functional.pad(idx, (0, rows - idx.size(-1)))  # (b, r, M)
    valid = torch.arange(rows, device=query.device) < counts.unsqueeze(-1)  # (b, r, M)
    seq = torch.arange(b, device=query.device).view(b, 1, 1)
    # the projections run over chunks of rows: (r, b c, d) inputs and outputs, never the
    # whole (r, b M, d)
    chunks = [slice(i, i + PROJECTION_ROWS) for i in range(0, rows, PROJECTION_ROWS)]
    if q_all is not None:  # (r, b, t, e)
        q = q_all.transpose(0, 1).gather(2, idx.unsqueeze(-1).expand(b, r, rows, e))
    else:
        w = w_q.transpose(1, 2)  # (r, d, e)
        parts = []
        for sl in chunks:
            x = query[seq, idx[..., sl]].transpose(0, 1)  # (r, b, c, d): active tokens only
            c = x.size(2)
            x = x.reshape(r, b * c, d)
            part = torch.bmm(x, w) if b_q is None else torch.baddbmm(b_q, x, w)
            parts.append(part.view(r, b, c, e))
        q = torch.cat(parts, dim=2).transpose(0, 1)  # (b, r, M, e)
    block_mask = None
    if is_causal:  # key j is visible from position i if j <= i + s - t
        last = idx + (s - t)
        # padding rows (at the end) see what the last real row sees: no extra key blocks
        row_max = torch.where(valid, last, 0).amax(dim=-1, keepdim=True)
        block_mask = routed_block_mask(torch.where(valid, last, row_max), s)
    score_mod = None
    if bias is not None:
        score_mod = _bias_score_mod(bias, idx, num_shared)
    o = _compiled_flex()(
        q, k.transpose(0, 1), v.transpose(0, 1), score_mod=score_mod, block_mask=block_mask
    )  # (b, r, M, e)
    g = gates.transpose(1, 2).gather(2, idx)  # (b, r, M)
    o = torch.where(valid.unsqueeze(-1), o * g.unsqueeze(-1).to(o.dtype), 0.0)
    flat_out = out.view(b * t, d)
    for sl in chunks:
        o_c = o[:, :, sl].transpose(0, 1)  # (r, b, c, e)
        c = o_c.size(2)
        y = torch.bmm(o_c.reshape(r, b * c, e), w_o)  # (r, b c, d)
        flat = (seq * t + idx[..., sl]).transpose(0, 1).reshape(-1)
        flat_out.index_add_(0, flat, y.reshape(-1, d))


def _bias_score_mod(bias: Tensor, idx: Tensor, num_shared: int) -> Callable[..., Tensor]:
    """The additive mask as a ``score_mod``: a (b|1, 1|h, 1, s) padding bias read per
    key, or a per-row bias (b|1, 1|h, t, s) read at each packed row's position."""
    per_batch = bias.size(0) > 1
    per_head = bias.size(1) > 1
    per_row = bias.size(2) > 1

    def score_mod(score: Tensor, batch: Tensor, head: Tensor, row: Tensor, key: Tensor) -> Tensor:
        bi = batch if per_batch else 0
        hi = head + num_shared if per_head else 0
        ri = idx[batch, head, row] if per_row else 0
        return score + bias[bi, hi, ri, key]

    return score_mod

r"""The sparse execution paths of routed attention: compute only active (token, head) pairs.

A token's inactive heads need no query projection, no attention row and no slice of the
output projection; keys and values are still computed for every head. Shared heads are
on for every token, so they run as ordinary dense attention.

:func:`sparse_routed_attention` (many query tokens): the active tokens of each (routed
head, sequence) are gathered, in position order, into a padded block of ``m`` rows
(``m`` = the largest count of active tokens of any routed head in the batch), laid out
head-major so every projection is one batched GEMM against a *view* of the weights (no
per-pair weight copies), a chunk of rows at a time:

    x_g  (r, b, m, d)  = the active tokens' inputs
    q    (r, b, m, e)  = x_g W_q[head]^T + b_q[head]             # only active queries
    o    (r, b, m, e)  = attention of those rows over the keys of their head
    y   += index_add over tokens of  (g * o) W_o[:, head]^T        # only active slices

A padding mask is read per sequence (never expanded over heads), and a causal chunk
reads only the keys up to its last row's position, also with padding.

:func:`routed_decode_attention` (one query token per sequence, inference): decoding with
a long key/value cache is bound by memory traffic, and a token that does not use head h
need not read head h's cache. The active heads come as an index tensor (shared plus
top-k: static shapes, no host sync); compiled, the cache reads are fused with the
indexing, so only the active heads' rows are read (:func:`decode_pays` says when that
beats dense attention).

Both equal the dense masked path up to rounding (the chunked path also in its gradients).
They are functions of tensors (inputs, keys, values, gates, weights), not of a module, so
any attention module can call them (:class:`~graphheads.routed.RoutedAttention` does).
The chunked path reads which rows are active (one host sync per call), so it is meant
for inference and long sequences; training uses the static-shape dense path
(``torch.compile``, DDP and FSDP friendly).

Shape legend: b batch, t query tokens, s key tokens, h heads, r routed heads, m gathered
rows per routed head, c rows per chunk, e head width, d model width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from graphheads.attention import scaled_dot_product_attention
from graphheads.flex import flex_routed_heads, flex_supported
from graphheads.masks import build_attention_bias

__all__ = [
    "DECODE_MIN_SKIPPED_BYTES",
    "SparseBackend",
    "decode_pays",
    "routed_decode_attention",
    "sparse_routed_attention",
]

SparseBackend = Literal["chunked", "flex"]


def sparse_routed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    gates: Tensor,
    routed_mask: Tensor,
    *,
    q_weight: Tensor,
    q_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    attn_bias: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    fused_attention: bool = True,
    queries: Tensor | None = None,
    chunk_rows: int = 64,
    backend: SparseBackend = "chunked",
) -> Tensor:
    """Routed attention output (b, t, d), computing only the active (token, head) pairs.

    Args:
        query: (b, t, d) the query inputs (before the query projection).
        key: (b, h, s, e) projected keys of every head.
        value: (b, h, s, e) projected values of every head.
        gates: (b, t, h) head gates; the first ``h - r`` heads are the shared ones.
        routed_mask: (b, t, r) 1.0 where a routed head is active.
        q_weight: the query projection's weight (h e, d).
        q_bias: its bias (h e,), or ``None``.
        out_weight: the output projection's weight (d, h e).
        out_bias: its bias (d,), or ``None``.
        attn_bias: additive mask (b or 1, h or 1, t or 1, s), or ``None``; a padding
            bias (b, 1, 1, s) is read per sequence, never expanded.
        is_causal: bottom-right causal attention; with ``attn_bias`` both apply.
        dropout_p: dropout on the attention weights.
        fused_attention: PyTorch's SDPA kernel (else the plain math path).
        queries: (b, h, t, e) all projected queries when the caller already has them
            (the parameter-free router needs them); otherwise only active ones are made.
        chunk_rows: routed rows per chunk. A causal chunk reads only the keys up to its
            last position, and under autograd each chunk is recomputed in the backward
            pass instead of keeping its (rows x keys) mask.
        backend: how the routed heads attend: ``"chunked"`` (SDPA over chunks of
            gathered rows with a float mask) or ``"flex"`` (one FlexAttention call over
            the packed rows with a block mask from their positions; see
            :mod:`graphheads.flex` for where it runs).
    """
    b, t, d = query.shape
    h, s, e = key.size(1), key.size(-2), key.size(-1)
    r = routed_mask.size(-1)
    h_s = h - r
    bias = attn_bias
    if bias is not None and (bias.dim() != 4 or bias.size(1) not in (1, h)):
        raise ValueError(
            f"sparse_routed_attention: attn_bias must be (b or 1, {h} or 1, t or 1, s), "
            f"got {tuple(bias.shape)}"
        )
    if backend not in ("chunked", "flex"):
        raise ValueError(
            f"sparse_routed_attention: backend must be 'chunked' or 'flex', got {backend!r}"
        )
    if backend == "flex" and r > 0:  # refused before any work is done
        reason = flex_supported(
            query.device, grad=torch.is_grad_enabled(), dropout_p=dropout_p, head_dim=e
        )
        if reason is not None:
            raise ValueError(f"sparse_routed_attention: backend='flex' cannot run: {reason}")
    out = query.new_zeros(b, t, d)
    if h_s > 0:  # shared heads: every token, dense
        if queries is not None:
            q_s = queries[:, :h_s]
        else:
            b_s = None if q_bias is None else q_bias[: h_s * e]
            q_s = F.linear(query, q_weight[: h_s * e], b_s)
            q_s = q_s.view(b, t, h_s, e).transpose(1, 2)  # (b, h_s, t, e)
        shared_mask = None if bias is None else bias[:, :h_s]
        causal_kernel = is_causal and t == s and shared_mask is None
        if is_causal and not causal_kernel:  # (1, 1, t, s); None for one query token
            causal = build_attention_bias(
                batch_size=1,
                num_heads=1,
                query_len=t,
                key_len=s,
                attn_mask=None,
                key_padding_mask=None,
                is_causal=True,
                dtype=query.dtype,
                device=query.device,
                owner="sparse_routed_attention",
            )
            if causal is not None:
                shared_mask = causal if shared_mask is None else shared_mask + causal
        o_s = scaled_dot_product_attention(
            q_s,
            key[:, :h_s],
            value[:, :h_s],
            attn_mask=shared_mask,
            is_causal=causal_kernel,
            dropout_p=dropout_p,
            fused_attention=fused_attention,
        )
        o_s = o_s * gates[..., :h_s].transpose(1, 2).unsqueeze(-1)  # (b, h_s, t, e)
        out = out + o_s.transpose(1, 2).reshape(b, t, h_s * e) @ out_weight[:, : h_s * e].T
    if r > 0:
        heads = (
            out,
            query,
            key[:, h_s:].transpose(0, 1),  # (r, b, s, e): views, head-major
            value[:, h_s:].transpose(0, 1),
            gates[..., h_s:],
            routed_mask > 0,
        )
        routed: dict[str, Any] = {
            "w_q": q_weight[h_s * e :].view(r, e, d),  # views of the weights, no copies
            "b_q": None if q_bias is None else q_bias[h_s * e :].view(r, 1, e),
            "w_o": out_weight[:, h_s * e :].view(d, r, e).permute(1, 2, 0),  # (r, e, d)
            "q_all": None if queries is None else queries[:, h_s:].transpose(0, 1),
            "bias": bias,
            "num_shared": h_s,
            "is_causal": is_causal,
        }
        if backend == "flex":
            flex_routed_heads(*heads, **routed)
        else:
            _add_routed_heads(
                *heads,
                **routed,
                dropout_p=dropout_p,
                fused_attention=fused_attention,
                chunk_rows=chunk_rows,
            )
    if out_bias is not None:
        out = out + out_bias
    return out


def _add_routed_heads(
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
    dropout_p: float,
    fused_attention: bool,
    chunk_rows: int,
) -> None:
    """Add the routed heads' contributions to ``out`` (b, t, d) in place; keys and
    values (r, b, s, e), gates (b, t, r), ``active`` (b, t, r) bool."""
    b, t, d = query.shape
    s = k.size(-2)
    # per (sequence, head) its active tokens first, in position order (a stable sort)
    order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices  # (b, t, r)
    idx_all = order.permute(2, 0, 1)  # (r, b, t) token positions
    counts = active.sum(dim=1).T  # (r, b) active tokens per (head, sequence)
    rows = torch.arange(t, device=query.device)
    valid_all = rows < counts.unsqueeze(-1)  # (r, b, t)
    # one host sync for the row count m and every chunk's last visible key
    n_chunks = -(-t // chunk_rows)
    last = torch.where(valid_all, idx_all, -1).amax(dim=(0, 1))  # (t,) by row
    last = F.pad(last, (0, n_chunks * chunk_rows - t), value=-1).view(n_chunks, chunk_rows)
    host = torch.cat([counts.max().view(1), last.amax(dim=1)]).tolist()
    m, chunk_last = int(host[0]), host[1:]
    if m == 0:
        return
    g = gates.permute(2, 0, 1).gather(2, idx_all[..., :m])  # (r, b, m)
    row_bias: Tensor | None = None  # the mask rows of every routed row, when not per row
    if bias is not None and bias.size(2) == 1:  # padding only: (b|1, 1|h, 1, s)
        per_head = bias[:, num_shared:] if bias.size(1) > 1 else bias
        row_bias = per_head.transpose(0, 1)  # (r|1, b|1, 1, s), a view
    chunk = functools.partial(
        _routed_chunk,
        query=query,
        w_q=w_q,
        b_q=b_q,
        w_o=w_o,
        q_all=q_all,
        bias=bias if row_bias is None else None,
        num_shared=num_shared,
        causal_offset=s - t if is_causal else None,
        dropout_p=dropout_p,
        fused_attention=fused_attention,
    )
    seq = torch.arange(b, device=query.device).view(1, b, 1)
    flat_out = out.view(b * t, d)
    for i, start in enumerate(range(0, m, chunk_rows)):
        sl = slice(start, min(m, start + chunk_rows))
        idx_c = idx_all[..., sl]  # (r, b, c)
        # causal: this chunk's rows see keys up to the last position among them
        limit = max(int(chunk_last[i]) + s - t + 1, 1) if is_causal else s
        args = (
            idx_c,
            valid_all[..., sl],
            g[..., sl],
            k[:, :, :limit],
            v[:, :, :limit],
            None if row_bias is None else row_bias[..., :limit],
        )
        if torch.is_grad_enabled():  # recompute in backward: no (rows x keys) mask is kept
            y = checkpoint(chunk, *args, use_reentrant=False)
        else:
            y = chunk(*args)
        # in place: autograd needs only the indices
        flat_out.index_add_(0, (seq * t + idx_c).reshape(-1), y.reshape(-1, d))


def _routed_chunk(
    idx: Tensor,
    valid: Tensor,
    gates: Tensor,
    k: Tensor,
    v: Tensor,
    row_bias: Tensor | None,
    *,
    query: Tensor,
    w_q: Tensor,
    b_q: Tensor | None,
    w_o: Tensor,
    q_all: Tensor | None,
    bias: Tensor | None,
    num_shared: int,
    causal_offset: int | None,
    dropout_p: float,
    fused_attention: bool,
) -> Tensor:
    """Output-projection contributions (r, b c, d) of c gathered rows of every (routed
    head, sequence): token positions ``idx`` (r, b, c), ``valid`` rows, their gates
    (r, b, c), keys and values (r, b, s', e), a broadcast mask ``row_bias`` (r|1, b|1, 1,
    s') or per-row rows of ``bias`` (b|1, h|1, t, s), weight views ``w_q`` (r, e, d),
    ``w_o`` (r, e, d)."""
    r, b, c = idx.shape
    s_c, e = k.size(-2), k.size(-1)
    seq = torch.arange(b, device=idx.device).view(1, b, 1)
    if q_all is not None:  # (r, b, t, e)
        q = q_all.gather(2, idx.unsqueeze(-1).expand(r, b, c, e))
    else:
        x = query[seq, idx].view(r, b * c, -1)  # (r, b c, d): only the active tokens
        w = w_q.transpose(1, 2)  # (r, d, e)
        q = torch.bmm(x, w) if b_q is None else torch.baddbmm(b_q, x, w)
        q = q.view(r, b, c, e)
    mask = row_bias
    if bias is not None:  # a mask per query row: gather the rows, never expand over heads
        if bias.size(1) > 1:
            heads = num_shared + torch.arange(r, device=idx.device).view(r, 1, 1)
            rows = bias.expand(b, -1, -1, -1)[seq, heads, idx]  # (r, b, c, s)
        else:
            rows = bias[:, 0].expand(b, -1, -1)[seq, idx]
        mask = rows[..., :s_c]
    if causal_offset is not None:  # key j is visible from the token at position i if j <= i + s - t
        # padding rows (not valid) see every key: no fully masked rows
        last = torch.where(valid, idx + causal_offset, s_c).unsqueeze(-1)  # (r, b, c, 1)
        allowed = torch.arange(s_c, device=k.device) <= last  # (r, b, c, s')
        if mask is None:
            mask = torch.where(allowed, 0.0, float("-inf")).to(q.dtype)
        else:
            mask = mask.masked_fill(~allowed, float("-inf"))
    elif mask is not None and bias is not None:
        mask = mask.masked_fill(~valid.unsqueeze(-1), 0.0)
    o = scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, fused_attention=fused_attention
    )  # (r, b, c, e)
    o = torch.where(valid.unsqueeze(-1), o * gates.unsqueeze(-1), 0.0)  # padding rows: nothing
    return torch.bmm(o.reshape(r, b * c, e), w_o)  # (r, b c, d)


# The cache bytes per decoding step routed decoding must skip, compiled, to beat dense
# attention on this kind of device. CPU: measured (torch 2.13, 2 cores, fp32, half the
# heads active): the compiled kernel runs at 0.5-0.8x dense SDPA's speed where it skips
# <= 4 MiB, 0.8-1.2x at 8 MiB, 1.03-1.6x at >= 16 MiB. CUDA: not measured yet (see
# benchmarks/gpu_check.py); a cautious guess. Other devices (and ``meta``): never.
DECODE_MIN_SKIPPED_BYTES = {"cpu": 12 * 2**20, "cuda": 64 * 2**20}


def decode_pays(key: Tensor, num_active: int, *, compiled: bool | None = None) -> bool:
    """Whether one routed decoding step (:func:`routed_decode_attention`) should beat
    dense attention over the cache ``key`` (b, h_kv, s, e) with ``num_active`` query
    heads on: only under ``torch.compile`` (eager gathers copy the caches) and when the
    bytes it skips reading, keys and values, reach :data:`DECODE_MIN_SKIPPED_BYTES` for
    the device. Dense reads every key/value head once; the routed kernel reads one per
    active query head, even when grouped query heads share it, so with grouped-query
    attention it pays only when fewer query heads are active than there are key/value
    heads. The test is on the cache length, so a compiled decoding loop compiles once
    more when its cache crosses the threshold. ``compiled``: answer as if compiled
    (``True``) or eager (``False``) instead of for the code running now (``None``)."""
    threshold = DECODE_MIN_SKIPPED_BYTES.get(key.device.type)
    compiled = torch.compiler.is_compiling() if compiled is None else compiled
    if threshold is None or not compiled:
        return False
    b, h_kv, s, e = key.shape
    skipped = 2 * b * s * e * key.element_size() * (h_kv - num_active)
    return bool(skipped >= threshold)


def routed_decode_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    gates: Tensor,
    heads: Tensor,
    *,
    q_weight: Tensor,
    q_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    attn_bias: Tensor | None = None,
    rotate: Callable[[Tensor], Tensor] | None = None,
    queries: Tensor | None = None,
    fused_attention: bool = True,
) -> Tensor:
    """Routed attention output (b, 1, d) for one query token per sequence (inference),
    reading only the active heads' keys and values.

    Args:
        query: (b, 1, d) the query inputs.
        key: (b, h_kv, s, e) keys (a cache); query head i reads key/value head
            ``i // (h / h_kv)``.
        value: (b, h_kv, s, e) values.
        gates: (b, 1, h) head gates.
        heads: (b, 1, n) the indices of the n heads each token uses
            (:attr:`~graphheads.types.RoutingOutput.active_head_indices`: the shared
            heads and the top-k routed ones, so n is the same for every token).
        q_weight: the query projection's weight (h e, d).
        q_bias: its bias (h e,), or ``None``.
        out_weight: the output projection's weight (d, h e).
        out_bias: its bias (d,), or ``None``.
        attn_bias: additive mask (b or 1, h or 1, 1, s) or ``None``.
        rotate: applied to projected queries (b, h, 1, e) (rotary embeddings at this
            token's position), or ``None``.
        queries: (b, h, 1, e) all projected queries when the caller already has them.
        fused_attention: PyTorch's SDPA kernel in eager mode (else the plain math path).

    Static shapes, index tensors only: no host sync and no Python loop over sequences or
    heads, so a decoding step compiles with ``fullgraph=True`` and runs on ``meta``
    tensors. Under ``torch.compile`` the cache reads are written as reductions over
    ``key[b, heads]`` that Inductor fuses with the indexing, so only the active heads'
    rows are read. In eager mode PyTorch has no kernel that attends over indexed cache
    rows without copying them, so the active heads' caches are gathered (a copy) and
    attend through SDPA: correct, but slower than dense attention, which is why
    ``execution="auto"`` decodes through this kernel only when compiled (see
    :func:`decode_pays`). The query and output projections run for every head (one GEMM
    each; the skipped heads' outputs are zero): at one token per sequence they are a
    small part of a step with a long cache.
    """
    b, t = query.shape[:2]
    if t != 1:
        raise ValueError(f"routed_decode_attention: expected one query token, got {t}")
    h, h_kv, s, e = gates.size(-1), key.size(1), key.size(2), key.size(3)
    groups = h // h_kv
    idx = heads[:, 0]  # (b, n)
    n = idx.size(-1)
    if queries is None:
        queries = F.linear(query[:, 0], q_weight, q_bias).view(b, h, 1, e)
        queries = queries if rotate is None else rotate(queries)
    q = queries[:, :, 0].gather(1, idx.unsqueeze(-1).expand(b, n, e))  # (b, n, e)
    kv_idx = idx if groups == 1 else torch.div(idx, groups, rounding_mode="floor")
    bias = None
    if attn_bias is not None:  # (b, n, s): each active head's row of the mask
        bias = attn_bias.expand(b, h, 1, s)[:, :, 0].gather(1, idx.unsqueeze(-1).expand(b, n, s))
    if torch.compiler.is_compiling():  # reductions over indexed rows: Inductor fuses them
        rows = torch.arange(b, device=idx.device).unsqueeze(-1)
        k, v = key[rows, kv_idx], value[rows, kv_idx]  # (b, n, s, e), never materialised
        # in fp32, as SDPA accumulates (the casts fuse into the reads)
        scores = (q.float().unsqueeze(2) * e**-0.5 * k.float()).sum(-1)  # (b, n, s)
        if bias is not None:
            scores = scores + bias.float()
        weights = scores.softmax(dim=-1).unsqueeze(-1)
        o = (weights * v.float()).sum(2).to(q.dtype)  # (b, n, e), as SDPA returns
    else:  # eager: gather the active caches, then one SDPA call
        index = kv_idx[:, :, None, None].expand(b, n, s, e)
        o = scaled_dot_product_attention(
            q.unsqueeze(2),
            key.gather(1, index),
            value.gather(1, index),
            attn_mask=None if bias is None else bias.unsqueeze(2),
            fused_attention=fused_attention,
        )[:, :, 0]  # (b, n, e)
    o = o * gates[:, 0].gather(1, idx).unsqueeze(-1).to(o.dtype)
    full = o.new_zeros(b, h, e).scatter(1, idx.unsqueeze(-1).expand(b, n, e), o)
    return F.linear(full.view(b, 1, h * e), out_weight, out_bias)

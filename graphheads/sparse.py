r"""The sparse execution path of routed attention: compute only active (token, head) pairs.

A token's inactive heads need no query projection, no attention row and no slice of the
output projection; keys and values are still computed for every head. Shared heads are
on for every token, so they run as ordinary dense attention. For the routed heads the
active tokens of each (sequence, head) are gathered, in position order, into a padded
block of ``m`` rows (``m`` = the largest count of active tokens of any routed head in the
batch), and only (sequence, head) pairs with at least one active token take part, so
batched attention calls cover every routed head, a chunk of rows at a time:

    x_g  (p, m, d)  = the active tokens' inputs, for the p (sequence, head) pairs with work
    q    (p, m, e)  = x_g W_q[head]^T + b_q[head]             # only active queries
    o    (p, m, e)  = attention of those rows over the keys of their head
    y   += index_add over tokens of  (g * o) W_o[:, head]^T     # only active slices

The result equals the dense masked path (outputs and gradients) up to rounding. It is a
function of tensors (inputs, keys, values, gates, weights), not of a module, so any
attention module can call it (:class:`~graphheads.routed.RoutedAttention` does). The path
reads the active counts (one host sync), so it is meant for inference and long sequences;
training uses the static-shape dense path (``torch.compile``, DDP and FSDP friendly).

Shape legend: b batch, t query tokens, s key tokens, h heads, r routed heads, m gathered
rows per routed head, e head width, d model width.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from graphheads.attention import scaled_dot_product_attention

__all__ = ["sparse_routed_attention"]


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
        attn_bias: additive mask (b or 1, h or 1, t, s), or ``None``.
        is_causal: bottom-right causal attention (only with ``attn_bias=None``).
        dropout_p: dropout on the attention weights.
        fused_attention: PyTorch's SDPA kernel (else the plain math path).
        queries: (b, h, t, e) all projected queries when the caller already has them
            (the parameter-free router needs them); otherwise only active ones are made.
        chunk_rows: routed rows per chunk. A causal chunk reads only the keys up to its
            last position, and under autograd each chunk is recomputed in the backward
            pass instead of keeping its (rows x keys) mask.
    """
    if is_causal and attn_bias is not None:
        raise ValueError("sparse_routed_attention: pass either attn_bias or is_causal=True")
    b, t, d = query.shape
    h, s, e = key.size(1), key.size(-2), key.size(-1)
    r = routed_mask.size(-1)
    h_s = h - r
    k, v = key, value
    w_q, w_o, b_q = q_weight, out_weight, q_bias  # (h e, d), (d, h e), (h e,)
    q = queries
    bias = attn_bias
    out = query.new_zeros(b, t, d)
    if h_s > 0:  # shared heads: every token, dense
        if q is not None:
            q_s = q[:, :h_s]
        else:
            q_s = query @ w_q[: h_s * e].T
            if b_q is not None:
                q_s = q_s + b_q[: h_s * e]
            q_s = q_s.view(b, t, h_s, e).transpose(1, 2)  # (b, h_s, t, e)
        if is_causal and t == s:
            o_s = scaled_dot_product_attention(
                q_s,
                k[:, :h_s],
                v[:, :h_s],
                is_causal=True,
                dropout_p=dropout_p,
                fused_attention=fused_attention,
            )
        else:
            mask = _causal_allowed(t, s, query.device) if is_causal else bias
            if mask is not None and mask.dim() == 4 and mask.size(1) == h:
                mask = mask[:, :h_s]
            o_s = scaled_dot_product_attention(
                q_s,
                k[:, :h_s],
                v[:, :h_s],
                attn_mask=mask,
                dropout_p=dropout_p,
                fused_attention=fused_attention,
            )
        o_s = o_s * gates[..., :h_s].transpose(1, 2).unsqueeze(-1)  # (b, h_s, t, e)
        out = out + o_s.transpose(1, 2).reshape(b, t, h_s * e) @ w_o[:, : h_s * e].T
    if r > 0:
        active = routed_mask > 0  # (b, t, r)
        counts = active.sum(dim=1).reshape(b * r)  # active tokens per (sequence, routed head)
        pairs = counts.nonzero().squeeze(1)  # (p,) the (sequence, head) pairs with work
        m = int(counts.max())  # rows per pair (host syncs: this path is for inference)
        n_pairs = pairs.numel()
        if n_pairs:
            # per pair, its active tokens first, in position order (stable sort of "inactive")
            order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices[:, :m]
            idx = order.transpose(1, 2).reshape(b * r, m)[pairs]  # (p, m) token positions
            valid = torch.arange(m, device=query.device) < counts[pairs].unsqueeze(-1)  # (p, m)
            g = gates[..., h_s:].transpose(1, 2).reshape(b * r, t)[pairs].gather(1, idx)  # (p, m)
            seq, head = pairs // r, pairs % r  # (p,)
            k_r = k[:, h_s:].reshape(b * r, s, e)  # (b r, s, e), a view
            v_r = v[:, h_s:].reshape(b * r, s, e)
            if n_pairs < b * r:  # only the pairs with work (e.g. decoding one token)
                k_r, v_r = k_r[pairs], v_r[pairs]  # (p, s, e)
            if bias is not None:
                bias = bias.expand(b, h, t, s)[:, h_s:].reshape(b * r, t, s)[pairs]
            chunk = functools.partial(
                _routed_chunk,
                query=query,
                seq=seq,
                w_q=w_q[h_s * e :].view(r, e, d)[head],  # (p, e, d)
                b_q=None if b_q is None else b_q[h_s * e :].view(r, 1, e)[head],  # (p, 1, e)
                w_o=w_o[:, h_s * e :].view(d, r, e).permute(1, 2, 0)[head],  # (p, e, d)
                q_all=None if q is None else q[:, h_s:].reshape(b * r, t, e)[pairs],
                bias=bias,
                causal_offset=s - t if is_causal else None,
                dropout_p=dropout_p,
                fused_attention=fused_attention,
            )
            flat_out = out.view(b * t, d)
            for start in range(0, m, chunk_rows):
                rows = slice(start, min(m, start + chunk_rows))
                idx_c = idx[:, rows]  # (p, c)
                # causal: this chunk's rows see keys up to its last position, no further
                limit = int(idx_c.max()) + s - t + 1 if is_causal else s
                args = (idx_c, valid[:, rows], g[:, rows], k_r[:, :limit], v_r[:, :limit])
                if torch.is_grad_enabled():  # recompute in backward: no (rows x keys) mask is kept
                    y = checkpoint(chunk, *args, use_reentrant=False)
                else:
                    y = chunk(*args)
                # in place: autograd needs only the indices
                flat_out.index_add_(0, (seq.unsqueeze(1) * t + idx_c).reshape(-1), y.reshape(-1, d))
    if out_bias is not None:
        out = out + out_bias
    return out


def _routed_chunk(
    idx: Tensor,
    valid: Tensor,
    gates: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    query: Tensor,
    seq: Tensor,
    w_q: Tensor,
    b_q: Tensor | None,
    w_o: Tensor,
    q_all: Tensor | None,
    bias: Tensor | None,
    causal_offset: int | None,
    dropout_p: float,
    fused_attention: bool,
) -> Tensor:
    """Output-projection contributions (p, c, d) of c gathered rows for each of p
    (sequence, routed head) pairs: token positions ``idx`` (p, c), their gates (p, c),
    the pairs' keys and values (p, s', e), their sequences ``seq`` (p,) and weight slices
    ``w_q``, ``w_o`` (p, e, d)."""
    e = k.size(-1)
    if q_all is not None:
        q = q_all.gather(1, idx.unsqueeze(-1).expand(*idx.shape, e))  # (p, c, e)
    else:
        x = query[seq.unsqueeze(1), idx]  # (p, c, d): only the active tokens
        q = torch.bmm(x, w_q.transpose(1, 2))  # (p, c, e)
        if b_q is not None:
            q = q + b_q
    mask: Tensor | None = None
    if causal_offset is not None:  # key j is visible from the token at position i if j <= i + s - t
        allowed = torch.arange(k.size(-2), device=k.device) <= (idx + causal_offset).unsqueeze(-1)
        mask = torch.where(allowed, 0.0, float("-inf")).to(
            q.dtype
        )  # float: used by the kernel as is
    elif bias is not None:
        mask = bias.gather(1, idx.unsqueeze(-1).expand(*idx.shape, bias.size(-1)))  # (p, c, s)
    o = scaled_dot_product_attention(  # 4-D, so PyTorch picks its fused CPU kernel
        q.unsqueeze(1),
        k.unsqueeze(1),
        v.unsqueeze(1),
        attn_mask=None if mask is None else mask.unsqueeze(1),
        dropout_p=dropout_p,
        fused_attention=fused_attention,
    ).squeeze(1)  # (p, c, e)
    o = torch.where(valid.unsqueeze(-1), o * gates.unsqueeze(-1), 0.0)  # padding rows: nothing
    return torch.bmm(o, w_o)  # (p, c, d)


def _causal_allowed(t: int, s: int, device: torch.device) -> Tensor:
    """(t, s) bool, True where query i may see key j (bottom-right aligned)."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)

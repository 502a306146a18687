r"""The sparse execution path of routed attention: compute only active (token, head) pairs.

A token's inactive heads need no query projection, no attention row and no slice of the
output projection; keys and values are still computed for every head. Shared heads are
on for every token, so they run as ordinary dense attention. For the routed heads the
active tokens of each (sequence, head) are gathered, in position order, into a padded
block of ``m`` rows (``m`` = the largest count of active tokens of any routed head in the
batch), so one batched attention call covers every routed head:

    x_g  (b, r, m, d)  = the active tokens' inputs
    q    (b, r, m, e)  = x_g W_q[head]^T + b_q[head]          # only active queries
    o    (b, r, m, e)  = attention of those rows over all keys of their head
    y   += scatter_add over tokens of  (g * o) W_o[:, head]^T  # only active slices

The result equals the dense masked path (outputs and gradients) up to rounding. The path
reads the active counts (one host sync), so it is meant for inference and long sequences;
training uses the static-shape dense path (``torch.compile``, DDP and FSDP friendly).

Shape legend: b batch, t query tokens, s key tokens, h heads, r routed heads, m gathered
rows per routed head, e head width, d model width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from graphheads.attention import KVCache, build_attention_bias, scaled_dot_product_attention

if TYPE_CHECKING:
    from graphheads.moh import RoutedAttention, RoutingOutput

__all__ = ["sparse_routed_attention"]


def sparse_routed_attention(
    attn: RoutedAttention,
    query: Tensor,
    kv: KVCache,
    routing: RoutingOutput,
    *,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    q: Tensor | None = None,
) -> Tensor:
    """Routed attention output (b, t, d), computing only the active (token, head) pairs.

    ``q`` (b, h, t, e) are all queries when the caller already has them (the
    parameter-free router needs them); otherwise only the active ones are projected.
    """
    b, t, d = query.shape
    h, e = attn.num_heads, attn.head_dim
    h_s = routing.num_shared
    r = h - h_s
    k, v = kv.key, kv.value  # (b, h, s, e)
    s = k.size(-2)
    dropout_p = attn.dropout if attn.training else 0.0
    gates = routing.gates  # (b, t, h)
    w_q, w_o = attn.q_proj.weight, attn.out_proj.weight  # (h e, d), (d, h e)
    b_q = attn.q_proj.bias
    simple_causal = is_causal and attn_mask is None and key_padding_mask is None
    bias = None
    if not simple_causal and (is_causal or attn_mask is not None or key_padding_mask is not None):
        bias = build_attention_bias(
            batch_size=b,
            num_heads=h,
            query_len=t,
            key_len=s,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            dtype=query.dtype,
            device=query.device,
            owner=type(attn).__name__,
        )  # (b or 1, h or 1, t, s)
    out = query.new_zeros(b, t, d)
    if h_s > 0:  # shared heads: every token, dense
        if q is not None:
            q_s = q[:, :h_s]
        else:
            q_s = query @ w_q[: h_s * e].T
            if b_q is not None:
                q_s = q_s + b_q[: h_s * e]
            q_s = q_s.view(b, t, h_s, e).transpose(1, 2)  # (b, h_s, t, e)
        if simple_causal and t == s:
            o_s = scaled_dot_product_attention(
                q_s, k[:, :h_s], v[:, :h_s], is_causal=True, dropout_p=dropout_p, fused=attn.fused
            )
        else:
            mask = _causal_allowed(t, s, query.device) if simple_causal else bias
            if mask is not None and mask.dim() == 4 and mask.size(1) == h:
                mask = mask[:, :h_s]
            o_s = scaled_dot_product_attention(
                q_s, k[:, :h_s], v[:, :h_s], attn_mask=mask, dropout_p=dropout_p, fused=attn.fused
            )
        o_s = o_s * gates[..., :h_s].transpose(1, 2).unsqueeze(-1)  # (b, h_s, t, e)
        out = out + o_s.transpose(1, 2).reshape(b, t, h_s * e) @ w_o[:, : h_s * e].T
    if r > 0:
        active = routing.routed_mask > 0  # (b, t, r)
        counts = active.sum(dim=1)  # (b, r)
        m = int(counts.max())  # rows per routed head (one host sync)
        if m > 0:
            # active tokens first, in position order (a stable sort of "inactive")
            order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices[:, :m]
            idx = order.transpose(1, 2)  # (b, r, m) token index per gathered row
            valid = torch.arange(m, device=query.device) < counts.unsqueeze(-1)  # (b, r, m)
            flat = idx.reshape(b, r * m)
            if q is not None:
                q_r = q[:, h_s:].gather(2, idx.unsqueeze(-1).expand(b, r, m, e))  # (b, r, m, e)
            else:
                x_g = query.gather(1, flat.unsqueeze(-1).expand(b, r * m, d)).view(b, r, m, d)
                q_r = torch.einsum("brmd,red->brme", x_g, w_q[h_s * e :].view(r, e, d))
                if b_q is not None:
                    q_r = q_r + b_q[h_s * e :].view(1, r, 1, e)
            if simple_causal:  # key j is visible from the token at position p if j <= p + s - t
                positions = idx + (s - t)  # (b, r, m)
                mask = torch.arange(s, device=query.device) <= positions.unsqueeze(-1)
            elif bias is not None:
                full = bias.expand(b, h, t, s)[:, h_s:]  # (b, r, t, s)
                mask = full.gather(2, idx.unsqueeze(-1).expand(b, r, m, s))  # (b, r, m, s)
            else:
                mask = None
            o_r = scaled_dot_product_attention(
                q_r, k[:, h_s:], v[:, h_s:], attn_mask=mask, dropout_p=dropout_p, fused=attn.fused
            )  # (b, r, m, e)
            g_r = gates[..., h_s:].transpose(1, 2).gather(2, idx)  # (b, r, m)
            o_r = torch.where(valid.unsqueeze(-1), o_r * g_r.unsqueeze(-1), 0.0)
            y_r = torch.einsum("brme,dre->brmd", o_r, w_o[:, h_s * e :].view(d, r, e))
            out = out.scatter_add(
                1, flat.unsqueeze(-1).expand(b, r * m, d), y_r.reshape(b, r * m, d)
            )
    if attn.out_proj.bias is not None:
        out = out + attn.out_proj.bias
    return out


def _causal_allowed(t: int, s: int, device: torch.device) -> Tensor:
    """(t, s) bool, True where query i may see key j (bottom-right aligned)."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)

r"""Scaled dot-product attention and multi-head attention (Vaswani et al. 2017).

Shape legend used in comments below:

    b  batch            t  query tokens        s  key/value tokens
    h  heads            d  model width         e  head width (d // h)

Mask conventions (the same as :class:`torch.nn.MultiheadAttention`):

* ``key_padding_mask`` (b, s): ``True`` marks a padding key that no query may attend to.
  A float mask is added to the attention scores.
* ``attn_mask`` (t, s), (b * h, t, s) or (b, h, t, s): a boolean ``True`` forbids that
  query/key pair; a float mask is added to the scores.
* ``is_causal=True``: query ``i`` sees keys ``j <= i + (s - t)``, i.e. the causal mask is
  aligned bottom-right, which is what decoding with a key/value cache needs.

The low-level :func:`scaled_dot_product_attention` follows the convention of
:func:`torch.nn.functional.scaled_dot_product_attention` instead (boolean ``True`` =
*may* attend), because it is a drop-in for that function.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphheads.compat import FORWARD_STACKLEVEL, padding_from_token_mask
from graphheads.masks import build_attention_bias, self_attention_mask
from graphheads.rotary import RotaryEmbedding
from graphheads.types import AttentionOutput, KVCache

__all__ = [
    "MultiHeadAttention",
    "build_attention_bias",
    "repeat_kv",
    "scaled_dot_product_attention",
    "self_attention_mask",
]


def repeat_kv(x: Tensor, num_heads: int) -> Tensor:
    """(..., h_kv, s, e) -> (..., h, s, e): query head i reads key/value head
    ``i // (h / h_kv)``, as in grouped-query attention (Ainslie et al. 2023)."""
    groups = num_heads // x.size(-3)
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    fused_attention: bool = True,
) -> Tensor:
    r"""Attention(Q, K, V) = softmax(Q K^T / sqrt(e) + M) V.

    Args:
        query: (..., t, e).
        key: (..., s, e); with (..., h_kv, s, e) and fewer heads than the query's, each
            key/value head serves ``h / h_kv`` query heads (grouped-query attention).
        value: (..., s, e_v), heads as ``key``.
        attn_mask: broadcastable to (..., t, s); boolean ``True`` = may attend, or a float
            bias added to the scores (PyTorch SDPA convention).
        dropout_p: dropout probability on the attention weights.
        is_causal: top-left aligned causal mask (needs ``attn_mask=None``), as in PyTorch.
        scale: score scale; defaults to ``1 / sqrt(e)``.
        fused_attention: use :func:`torch.nn.functional.scaled_dot_product_attention`
            (same result, faster). ``False`` runs the plain math below, kept as the
            readable oracle. For a query whose every key is masked (left padding) the plain
            path gives 0, as PyTorch's math, flash and memory-efficient kernels do (cuDNN's
            may give other finite values there; no real token reads such a row).

    Returns:
        (..., t, e_v).
    """
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: pass either attn_mask or is_causal=True")
    grouped = query.dim() >= 3 and key.size(-3) != query.size(-3)  # fewer key/value heads
    if fused_attention:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=grouped,  # shared key/value heads read in place, not copied
        )
    if grouped:
        key, value = repeat_kv(key, query.size(-3)), repeat_kv(value, query.size(-3))
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale  # (..., t, s)
    if is_causal:
        t, s = scores.shape[-2:]
        allowed = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    if attn_mask is not None:  # a query that may see no key (left padding) gets 0, as
        # PyTorch's math kernel gives, not the NaN of a softmax over -inf alone
        blind = scores.isneginf().all(dim=-1, keepdim=True)  # (..., t, 1)
        weights = scores.masked_fill(blind, 0.0).softmax(dim=-1).masked_fill(blind, 0.0)
    else:
        weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ value  # (..., t, e_v)


class MultiHeadAttention(nn.Module):
    r"""Multi-head attention from "Attention Is All You Need"
    (https://arxiv.org/abs/1706.03762).

    .. math::
        \mathrm{MHA}(Q, K, V) = \mathrm{concat}(\mathrm{head}_1, \dots, \mathrm{head}_h) W^O,
        \quad \mathrm{head}_i = \mathrm{softmax}\!\left(\frac{Q W_i^Q (K W_i^K)^\top}
        {\sqrt{d/h}} + M\right) V W_i^V

    Args:
        d_model: model width ``d``.
        num_heads: number of heads ``h``; must divide ``d_model``.
        dropout: dropout on the attention weights (default ``0.0``).
        bias: whether the four projections have a bias (default ``True``).
        fused_attention: use PyTorch's fused SDPA kernel (default ``True``); ``False``
            runs the plain math path. Both give the same result.
        num_kv_heads: key/value heads for grouped-query attention (default: ``num_heads``);
            must divide ``num_heads``.
        rotary: rotary position embeddings applied to queries and keys (self-attention
            with a cache: positions continue after the cached tokens).

    Shapes:
        - query (b, t, d); key and value (b, s, d), default to ``query`` (self-attention).
        - returns :class:`AttentionOutput` with ``output`` (b, t, d).

    See the module docstring for the meaning of every mask.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        fused_attention: bool = True,
        num_kv_heads: int | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if d_model <= 0 or num_heads <= 0:
            raise ValueError(
                f"{name}: d_model ({d_model}) and num_heads ({num_heads}) must be positive"
            )
        if d_model % num_heads != 0:
            raise ValueError(
                f"{name}: d_model ({d_model}) must be divisible by num_heads ({num_heads})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if kv_heads < 1 or num_heads % kv_heads:
            raise ValueError(
                f"{name}: num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})"
            )
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = kv_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.fused_attention = fused_attention
        self.rotary = rotary
        kv_width = kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, kv_width, bias=bias)
        self.v_proj = nn.Linear(d_model, kv_width, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same initialisation as torch.nn.MultiheadAttention.
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.out_proj.reset_parameters()
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    @torch.no_grad()
    def copy_from_torch(self, module: nn.MultiheadAttention) -> None:
        """Take the weights of a :class:`torch.nn.MultiheadAttention` with the same width,
        heads and bias setting (packed ``in_proj_weight`` split into q, k, v)."""
        name = type(self).__name__
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"{name}.copy_from_torch: grouped-query attention has no torch twin")
        if module.embed_dim != self.d_model or module.num_heads != self.num_heads:
            raise ValueError(
                f"{name}.copy_from_torch: module has embed_dim={module.embed_dim}, "
                f"num_heads={module.num_heads}; this has d_model={self.d_model}, "
                f"num_heads={self.num_heads}"
            )
        if module.in_proj_weight is None:
            raise ValueError(f"{name}.copy_from_torch: modules with kdim/vdim are not supported")
        if (module.in_proj_bias is None) != (self.q_proj.bias is None):
            raise ValueError(f"{name}.copy_from_torch: bias settings differ")
        weights = module.in_proj_weight.chunk(3)
        biases = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
        for proj, w, b in zip(
            (self.q_proj, self.k_proj, self.v_proj), weights, biases, strict=True
        ):
            proj.weight.copy_(w)
            if b is not None and proj.bias is not None:
                proj.bias.copy_(b)
        self.out_proj.weight.copy_(module.out_proj.weight)
        if self.out_proj.bias is not None and module.out_proj.bias is not None:
            self.out_proj.bias.copy_(module.out_proj.bias)

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return f"d_model={self.d_model}, num_heads={self.num_heads}{kv}, dropout={self.dropout}"

    @property
    def merged_masks(self) -> bool:
        """Whether a stack should hand this module its masks merged into one additive
        bias, built once per forward (True: the kernels take one bias)."""
        return True

    # -- pieces shared with the routed subclasses -------------------------------------
    def split_heads(self, x: Tensor) -> Tensor:
        b, t, width = x.shape
        return x.view(b, t, width // self.head_dim, self.head_dim).transpose(1, 2)  # (b, h, t, e)

    def merge_heads(self, x: Tensor) -> Tensor:
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.d_model)  # (b, t, d)

    def resolve_inputs(
        self, query: Tensor, key: Tensor | None, value: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``(key, value)`` with the self-attention defaults filled in, after checking the
        shapes of all three."""
        key = query if key is None else key
        value = key if value is None else value
        self.check_inputs(query, key, value)
        return key, value

    def check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        name = type(self).__name__
        for label, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3 or x.size(-1) != self.d_model:
                raise ValueError(
                    f"{name}: {label} must have shape (batch, tokens, {self.d_model}), "
                    f"got {tuple(x.shape)}"
                )
        if key.shape[:2] != value.shape[:2] or key.size(0) != query.size(0):
            raise ValueError(
                f"{name}: batch/length mismatch: query {tuple(query.shape)}, "
                f"key {tuple(key.shape)}, value {tuple(value.shape)}"
            )

    def project_query(self, query: Tensor, kv_cache: KVCache | int | None = None) -> Tensor:
        """Queries (b, h, t, e); with rotary, rotated to the positions that follow
        ``kv_cache``'s tokens (counted from each sequence's first real token). An integer
        offset (the 0.3 signature) still works, with a DeprecationWarning."""
        if isinstance(kv_cache, int):
            warnings.warn(
                "MultiHeadAttention.project_query(query, offset) is deprecated: pass the "
                "KVCache the query follows (project_query(query, kv_cache))",
                DeprecationWarning,
                stacklevel=2,
            )
            q = self.split_heads(self.q_proj(query))
            return q if self.rotary is None else self.rotary(q, kv_cache)
        return self._rotate(self.split_heads(self.q_proj(query)), kv_cache)  # (b, h, t, e)

    def _rotate(self, x: Tensor, kv_cache: KVCache | None) -> Tensor:
        """Rotary embeddings at the positions that follow ``kv_cache``'s tokens."""
        if self.rotary is None:
            return x
        if kv_cache is None:
            return self.rotary(x)
        return self.rotary(x, kv_cache.length, kv_cache.left_padding)

    def project_kv(self, key: Tensor, value: Tensor, kv_cache: KVCache | None) -> KVCache:
        """Keys and values (b, h_kv, s, e) of ``kv_cache``'s tokens followed by these
        (keys rotated to their positions with rotary)."""
        k = self.split_heads(self.k_proj(key))  # (b, h_kv, s_new, e)
        v = self.split_heads(self.v_proj(value))  # (b, h_kv, s_new, e)
        k = self._rotate(k, kv_cache)
        return KVCache(k, v) if kv_cache is None else kv_cache.append(k, v)

    def keys_values(
        self, key: Tensor, value: Tensor, kv_cache: KVCache | None, memory_kv: KVCache | None
    ) -> KVCache:
        """The keys and values to attend to: ``memory_kv`` as it is (a fixed memory
        projected once, :meth:`project_kv` of it), else :meth:`project_kv`."""
        if memory_kv is None:
            return self.project_kv(key, value, kv_cache)
        if kv_cache is not None:
            raise ValueError(f"{type(self).__name__}: pass either kv_cache or memory_kv")
        if memory_kv.key.size(0) != key.size(0) or memory_kv.key.size(1) != self.num_kv_heads:
            raise ValueError(
                f"{type(self).__name__}: memory_kv has keys {tuple(memory_kv.key.shape)}, "
                f"expected (batch {key.size(0)}, {self.num_kv_heads} heads, tokens, head width)"
            )
        return memory_kv

    def expand_kv(self, kv: KVCache) -> tuple[Tensor, Tensor]:
        """Keys and values with one key/value head per query head (b, h, s, e), for
        kernels without grouped-query support (the sparse path): :func:`repeat_kv`."""
        return repeat_kv(kv.key, self.num_heads), repeat_kv(kv.value, self.num_heads)

    def attention_bias(
        self,
        like: Tensor,
        *,
        key_len: int,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
    ) -> Tensor | None:
        """The masks merged into one additive bias (b or 1, h or 1, t, s) for queries
        shaped like ``like`` (b, h, t, e) or (b, t, d); ``None`` when no mask applies."""
        b, t = like.size(0), like.size(-2)
        return build_attention_bias(
            batch_size=b,
            num_heads=self.num_heads,
            query_len=t,
            key_len=key_len,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            dtype=like.dtype,
            device=like.device,
            owner=type(self).__name__,
        )

    def attend(
        self,
        q: Tensor,
        kv: KVCache,
        *,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        """Per-head outputs (b, h, t, e) before ``out_proj`` for projected queries ``q``
        (b, h, t, e) over the keys and values in ``kv``."""
        k, v = kv.key, kv.value  # (b, h_kv, s, e): the kernel shares them across groups
        t = q.size(-2)
        s = k.size(-2)
        dropout_p = self.dropout if self.training else 0.0
        if is_causal and attn_mask is None and key_padding_mask is None and t == s:
            return scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout_p, fused_attention=self.fused_attention
            )
        bias = self.attention_bias(
            q,
            key_len=s,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
        )
        return scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, fused_attention=self.fused_attention
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        memory_kv: KVCache | None = None,
        head_states: Tensor | None = None,
        padding_mask: Tensor | None = None,
        token_mask: Tensor | None = None,  # deprecated: padding_mask
    ) -> AttentionOutput:
        """Attend from ``query`` to ``key``/``value`` (default: self-attention).

        ``kv_cache`` holds keys and values of earlier tokens (self-attention decoding);
        with ``use_cache=True`` the returned :class:`AttentionOutput` carries the cache
        extended by this call's tokens. ``memory_kv`` are keys and values projected once
        from a fixed memory (cross-attention while decoding, :meth:`project_kv`): they
        are used as they are and ``key``/``value`` are not read. ``head_states`` and
        ``padding_mask`` (b, t) belong to the interface of routed attention:
        ``head_states`` must be ``None`` here and ``padding_mask`` (True at padding
        queries, which only the load-balance loss reads) is ignored.
        """
        padding_from_token_mask(
            type(self).__name__, token_mask, padding_mask, stacklevel=FORWARD_STACKLEVEL
        )
        if head_states is not None:
            raise ValueError(f"{type(self).__name__}: head_states is only used by GoH attention")
        key, value = self.resolve_inputs(query, key, value)
        q = self.project_query(query, kv_cache)
        kv = self.keys_values(key, value, kv_cache, memory_kv)
        heads = self.attend(
            q, kv, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal
        )
        cache = kv if use_cache else None
        return AttentionOutput(self.out_proj(self.merge_heads(heads)), cache=cache)

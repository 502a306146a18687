r"""The Mixture-of-Head gate (Jin et al. 2024, https://arxiv.org/abs/2410.11842) from
router logits, and its load-balance loss. Both routers (:mod:`graphheads.moh`'s linear
router and :mod:`graphheads.goh`'s graph-router) end here.

The gate, as the authors' released code computes it (``gate_convention="reference"``),
per token with routed logits l_r, shared logits l_s and two-stage logits l_h::

    p   = softmax(l_r)
    m   = one-hot of top-k(p)
    g_r = k * (p * m) / max(sum(p * m), eps)
    g_s = h_s * softmax(l_s)                  # all ones if h_s == 1
    a   = 2 * softmax(l_h)                    # two-stage weights
    g   = [a_0 * g_s, a_1 * g_r]

``gate_convention="paper"`` drops the factors k, h_s and 2 and the renormalisation over
the chosen heads (equations 5-6 of the paper). The load-balance loss over the real
tokens of a batch is ``L_b = H_r * sum_i P_i f_i`` with ``P_i`` the mean routed
probability and ``f_i`` the fraction of tokens choosing routed head i; at perfect
balance ``L_b = top_k``. Padding tokens (``padding_mask`` True) take no part.

Shape legend: b batch, t tokens, h heads, r routed heads, k top-k.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from torch import Tensor

from graphheads.compat import padding_from_token_mask
from graphheads.types import RoutingOutput

__all__ = [
    "GateConvention",
    "apply_balance_step",
    "autocast_dtype",
    "check_routing_config",
    "layer_head_counts",
    "load_balance_loss",
    "moh_gates",
    "routed_head_counts",
    "router_precision",
    "split_linear",
    "update_balance_bias",
]

GateConvention = Literal["reference", "paper"]


@contextmanager
def router_precision(x: Tensor, weight: Tensor | None) -> Iterator[Tensor]:
    """Routing in full precision under mixed precision: inside the ``with`` block
    autocast is off on ``x``'s device and the router input is ``x`` in the router's weight
    dtype (at least fp32 when the router has no ``weight``). Under bf16 autocast the
    logits would otherwise round to 8 bits of mantissa and a few tokens in a thousand
    pick another top-k set than in fp32; the router's few small GEMMs cost little in
    fp32. A model cast to bf16 as a whole routes in bf16, as its weights are.

    Example::

        with router_precision(x, self.routed_gate.weight) as x:
            logits = self.routed_gate(x)
    """
    off = autocast_dtype(x.device.type) is not None
    dtype = torch.promote_types(x.dtype, torch.float32) if weight is None else weight.dtype
    with torch.autocast(x.device.type, enabled=False) if off else nullcontext():
        yield x.to(dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, ``None`` when it is off."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def split_linear(x: Tensor, weights: list[Tensor | None]) -> list[Tensor | None]:
    """``[x W_i^T for each i]`` computed as one GEMM over the concatenated weights
    (``None`` entries give ``None``). A router's several small projections of the same
    input then cost one matrix product and one input gradient, not one each: on CPU a
    product with an output of width 2 costs about as much as one of width 100."""
    present = [w for w in weights if w is not None]
    if not present:
        return [None for _ in weights]
    out = torch.nn.functional.linear(x, torch.cat(present))  # (..., sum of widths)
    pieces = iter(out.split([w.size(0) for w in present], dim=-1))
    return [None if w is None else next(pieces) for w in weights]


def load_balance_loss(
    router_probs: Tensor,
    routed_mask: Tensor,
    token_mask: Tensor | None = None,  # deprecated: padding_mask
    *,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """``H_r * sum_i P_i f_i``: P_i the mean probability and f_i the mean choice of routed
    head i over the tokens where ``padding_mask`` (b, t) is False (all tokens when
    ``None``)."""
    padding_mask = padding_from_token_mask("load_balance_loss", token_mask, padding_mask)
    num_routed = router_probs.size(-1)
    if num_routed == 0:
        return router_probs.new_zeros(())
    probs = router_probs.reshape(-1, num_routed)  # (b t, r)
    chosen = routed_mask.reshape(-1, num_routed)
    if padding_mask is None:
        p_mean, f_mean = probs.mean(dim=0), chosen.mean(dim=0)  # (r,)
    else:
        if padding_mask.shape != router_probs.shape[:-1]:
            raise ValueError(
                f"load_balance_loss: padding_mask has shape {tuple(padding_mask.shape)}, "
                f"expected {tuple(router_probs.shape[:-1])}"
            )
        weight = (~padding_mask.bool()).reshape(-1, 1).to(probs.dtype)  # (b t, 1), 0 at pad
        count = weight.sum().clamp_min(1.0)
        p_mean = (probs * weight).sum(dim=0) / count
        f_mean = (chosen * weight).sum(dim=0) / count
    return num_routed * (p_mean * f_mean).sum()


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def moh_gates(
    routed_logits: Tensor,
    shared_logits: Tensor | None,
    type_logits: Tensor | None,
    *,
    num_shared: int,
    top_k: int,
    gate_convention: GateConvention = "reference",
    hard_gates: bool = False,
    padding_mask: Tensor | None = None,
    selection_bias: Tensor | None = None,
    token_mask: Tensor | None = None,  # deprecated: padding_mask
) -> RoutingOutput:
    """The MoH gate from router logits.

    Args:
        routed_logits: (b, t, r) scores of the routed heads (r may be 0).
        shared_logits: (b, t, h_s) scores of the shared heads, or ``None`` for equal
            weights (used when ``num_shared <= 1``).
        type_logits: (b, t, 2) two-stage scores [shared, routed], or ``None`` for equal
            weights (used when there are no shared or no routed heads).
        num_shared: h_s.
        top_k: routed heads chosen per token.
        gate_convention: "reference" (released code) or "paper" (equations 5-6).
        hard_gates: forward 0/1 gates, backward through the soft gates (straight-through).
        padding_mask: (b, t) True at padding: only the other tokens enter the
            load-balance loss (``token_mask``, True at real tokens, is deprecated).
        selection_bias: (r,) added to the routed heads' probabilities for the top-k
            choice only (balancing without an auxiliary loss, DeepSeek-V3); the gate
            values come from the unbiased probabilities. See :func:`update_balance_bias`.
    """
    reference = gate_convention == "reference"
    # routing in at least fp32 whatever the autocast dtype: logits, softmax, top-k and the
    # load-balance loss (bf16 would round near-equal scores together); fp64 stays fp64
    routed_logits = _at_least_fp32(routed_logits)
    shared_logits = None if shared_logits is None else _at_least_fp32(shared_logits)
    type_logits = None if type_logits is None else _at_least_fp32(type_logits)
    lead = routed_logits.shape[:-1]
    num_routed = routed_logits.size(-1)
    probs = routed_logits.softmax(dim=-1)  # (b, t, r)
    if num_routed > 0:
        scores = probs if selection_bias is None else probs + selection_bias.to(probs.dtype)
        top_idx = torch.topk(scores, top_k, dim=-1).indices  # (b, t, k)
        mask = torch.zeros_like(probs).scatter(-1, top_idx, 1.0)  # (b, t, r), no one-hot
        chosen = probs * mask
        if reference:
            denom = chosen.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).eps)
            routed_gates = top_k * chosen / denom
        else:
            routed_gates = chosen
    else:
        top_idx = torch.zeros((*lead, 0), dtype=torch.long, device=probs.device)
        mask = routed_gates = probs
    if num_shared > 0:
        if shared_logits is None:
            shared_gates = routed_logits.new_ones((*lead, num_shared))
            if not reference:
                shared_gates = shared_gates / num_shared
        else:
            shared_gates = shared_logits.softmax(dim=-1) * (num_shared if reference else 1)
        if num_routed > 0:
            scale = 2.0 if reference else 1.0
            if type_logits is None:
                weights = routed_logits.new_full((*lead, 2), 0.5 * scale)
            else:
                weights = type_logits.softmax(dim=-1) * scale  # (b, t, 2)
            shared_gates = weights[..., :1] * shared_gates
            routed_gates = weights[..., 1:] * routed_gates
        gates = torch.cat([shared_gates, routed_gates], dim=-1)  # (b, t, h)
    else:
        gates = routed_gates
    if hard_gates:
        hard = (gates > 0).to(gates.dtype)
        gates = hard + (gates - gates.detach())  # exactly 0/1 forward, soft gradient backward
    return RoutingOutput(
        gates=gates,
        router_probs=probs,
        routed_mask=mask,
        top_k_indices=top_idx,
        load_balance_loss=load_balance_loss(
            probs, mask, padding_mask=padding_from_token_mask("moh_gates", token_mask, padding_mask)
        ),
    )


def check_routing_config(owner: str, num_heads: int, num_shared: int, top_k: int) -> None:
    """ValueError naming the values for an impossible (num_heads, num_shared, top_k)."""
    if num_heads < 1:
        raise ValueError(f"{owner}: num_heads must be >= 1, got {num_heads}")
    if not 0 <= num_shared <= num_heads:
        raise ValueError(
            f"{owner}: num_shared ({num_shared}) must be in [0, num_heads ({num_heads})]"
        )
    num_routed = num_heads - num_shared
    if num_routed > 0 and not 1 <= top_k <= num_routed:
        raise ValueError(
            f"{owner}: top_k ({top_k}) must be in [1, routed heads ({num_routed}) = "
            f"num_heads ({num_heads}) - num_shared ({num_shared})]"
        )
    if num_routed == 0 and top_k != 0:
        raise ValueError(
            f"{owner}: top_k ({top_k}) must be 0 when every head is shared "
            f"(num_shared == num_heads == {num_heads})"
        )


def routed_head_counts(
    routed_mask: Tensor,
    token_mask: Tensor | None = None,  # deprecated: padding_mask
    *,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """How often each routed head was chosen, and by how many tokens: ``(r + 1,)``, the
    counts of ``routed_mask`` (..., r) over the tokens where ``padding_mask`` (...) is
    False (all when ``None``), then the number of those tokens. Masks by multiplication,
    so it never waits for the host; counts of several micro-batches or processes add up
    (all-reduce them with a sum) before :func:`apply_balance_step` turns them into loads."""
    padding_mask = padding_from_token_mask("routed_head_counts", token_mask, padding_mask)
    chosen = routed_mask.reshape(-1, routed_mask.size(-1)).detach()  # (tokens, r)
    if padding_mask is None:
        weight = chosen.new_ones((chosen.size(0), 1))
    else:
        weight = (~padding_mask.bool()).reshape(-1, 1).to(chosen.dtype)  # (tokens, 1), 0 at pad
    sums = [(chosen * weight).sum(0, dtype=torch.float64), weight.sum(0, dtype=torch.float64)]
    return torch.cat(sums)  # (r + 1,), fp64: exact integers past 2^24 tokens per step


def layer_head_counts(
    routing: Sequence[RoutingOutput], padding_mask: Tensor | None
) -> list[Tensor]:
    """:func:`routed_head_counts` of every layer's routing of a decoder-only model over
    the tokens that are not padding (``padding_mask`` (b, t)). A layer whose tokens the
    mask does not fit counts all of its own. The layers are told apart by shape only: for
    an encoder-decoder, whose source and target may have one length, count each stack's
    layers with its own mask."""
    counts = []
    for r in routing:
        fits = padding_mask is not None and padding_mask.shape == r.routed_mask.shape[:-1]
        counts.append(
            routed_head_counts(r.routed_mask, padding_mask=padding_mask if fits else None)
        )
    return counts


@torch.no_grad()
def apply_balance_step(bias: Tensor, counts: Tensor, rate: float) -> Tensor:
    """Balancing without an auxiliary loss (DeepSeek-V3, Liu et al. 2024): each routed
    head's selection bias moves by ``rate`` towards balance, ``b_i += rate * sign(mean_j
    f_j - f_i)``, with ``f`` the loads of :func:`routed_head_counts`' ``counts`` (r + 1,).
    Changes ``bias`` (r,) in place (a buffer, outside autograd) and returns ``f``."""
    if counts.shape != (bias.numel() + 1,):
        raise ValueError(
            f"apply_balance_step: counts must be (routed heads + 1,) = ({bias.numel() + 1},), "
            f"got {tuple(counts.shape)} (routed_head_counts makes them)"
        )
    load = counts[:-1] / counts[-1].clamp_min(1.0)  # (r,), the sign taken in the counts' dtype
    bias.add_(rate * torch.sign(load.mean() - load).to(bias.dtype))
    return load.to(bias.dtype)


@torch.no_grad()
def update_balance_bias(
    bias: Tensor,
    routed_mask: Tensor,
    rate: float,
    token_mask: Tensor | None = None,  # deprecated: padding_mask
    *,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """:func:`apply_balance_step` with the loads of ``routed_mask`` (..., r) over the
    tokens where ``padding_mask`` is False: after an optimiser step, one process. Changes
    ``bias`` (r,) in place and returns the loads ``f``."""
    padding_mask = padding_from_token_mask("update_balance_bias", token_mask, padding_mask)
    counts = routed_head_counts(routed_mask, padding_mask=padding_mask)
    return apply_balance_step(bias, counts, rate)

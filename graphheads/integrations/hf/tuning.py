"""Head importance (Michel et al. 2019) and continued tuning of converted models.

Shape legend: b batch, t tokens, d width.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphheads.integrations.hf.convert import (
    attention_modules,
    convert_to_goh,
    converted_modules,
    head_layout,
    record_routing,
)
from graphheads.types import RoutingOutput

__all__ = ["head_importance", "mean_pool", "tune"]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM: the mean of
    the token states over non-padding tokens, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


def _default_loss(model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
    """Causal LMs: the LM loss. Others: the output's projection on a random direction
    (the sensitivity of the output to each head)."""
    if hasattr(model, "lm_head"):
        labels = batch["input_ids"]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        return model(**batch, labels=labels).loss
    hidden = model(**batch).last_hidden_state
    direction = torch.randn(hidden.shape, generator=generator).to(hidden)
    return (hidden * direction).sum() / hidden.shape[0]


def head_importance(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None,
    normalize: bool = True,
) -> Tensor:
    """Head importance of Michel et al. 2019: ``I_h = sum_batches |dL / d xi_h|`` with
    ``xi_h`` a gate on head h's output (at 1). ``model`` is not changed (a converted copy
    with every head on is probed). Returns (layers, heads), each layer normalised to unit
    L2 norm when ``normalize``.
    """
    probe = copy.deepcopy(model)
    config: Any = getattr(probe, "config", None)
    counts = {head_layout(m, config)[0] for m in attention_modules(probe)}
    if len(counts) != 1:
        raise ValueError(
            f"head_importance: attention modules with different head counts {sorted(counts)}"
        )
    (num_heads,) = counts
    convert_to_goh(probe, num_shared=0, top_k=num_heads, graph_layers=0, feature_dim=1)
    probe.eval()
    modules = converted_modules(probe)
    xis = [torch.ones(num_heads, requires_grad=True) for _ in modules]
    importance = torch.zeros(len(modules), num_heads)
    generator = torch.Generator().manual_seed(0)

    def replace_gates(xi: Tensor) -> Callable[..., RoutingOutput]:
        def hook(_m: nn.Module, _i: Any, out: RoutingOutput) -> RoutingOutput:
            out.gates = xi.to(out.gates).expand_as(out.gates)
            return out

        return hook

    handles = [
        m.router.register_forward_hook(replace_gates(xi))
        for m, xi in zip(modules, xis, strict=True)
    ]
    try:
        for batch in batches:
            loss = (
                loss_fn(probe, batch)
                if loss_fn is not None
                else _default_loss(probe, batch, generator)
            )
            grads = torch.autograd.grad(loss, xis)
            importance += torch.stack([g.abs() for g in grads])
    finally:
        for handle in handles:
            handle.remove()
    if normalize:
        importance = importance / importance.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return importance


def tune(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    *,
    lr: float = 1e-3,
    aux_loss_weight: float = 0.01,
    routers_only: bool = False,
    lora: bool = False,
    lora_rank: int = 8,
) -> list[float]:
    """Continued tuning of a converted model, one optimiser step per batch.

    The loss is ``loss_fn(model, batch) + aux_loss_weight * mean load-balance loss``.
    Trains every weight, or only the routers (``routers_only``), or the routers plus
    LoRA adapters on the attention projections (``lora``, needs ``peft``). Returns the
    losses. With ``lora`` the adapters are merged back into the weights at the end.
    """
    target: Any = model
    trainable = {p: p.requires_grad for p in model.parameters()}  # the caller's choice,
    if lora:  # read before PEFT freezes everything but its adapters
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise ModuleNotFoundError(
                "tune(lora=True) needs peft, part of the 'hf' extra: pip install 'graphheads[hf]'",
                name="peft",
            ) from err

        names = {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "c_attn",
            "c_proj",
            "query",
            "key",
            "value",
        }
        present = sorted(
            {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if ".router." not in n} & names
        )
        target = get_peft_model(
            model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=present)
        )
    for name, p in target.named_parameters():
        if ".router." in f".{name}":
            p.requires_grad_(True)
        elif routers_only:
            p.requires_grad_(False)
    losses: list[float] = []
    try:
        params = [p for p in target.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        target.train()
        for batch in batches:
            with record_routing(target) as routing:
                loss = loss_fn(target, batch)
            if routing and aux_loss_weight > 0:
                balance = torch.stack([r.load_balance_loss for r in routing]).mean()
                loss = loss + aux_loss_weight * balance
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:  # also when a step fails: the model back as it was given, adapters merged
        target.eval()
        if lora:
            target.merge_and_unload()
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return losses

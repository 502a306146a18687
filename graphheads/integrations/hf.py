"""Graph-routed heads in Hugging Face ``transformers`` models (the ``hf`` extra).

:func:`convert_to_goh` turns each attention module of a Llama, GPT-2 or BERT model into
a routed one **in place**: the module keeps its class's code and its pretrained
projections under their original names (``q_proj``/``k_proj``/``v_proj``/``o_proj``,
``c_attn``/``c_proj``, ``query``/``key``/``value``), gains a
:class:`~graphheads.goh.GraphRouter` as ``router``, and scales each query head's output
by its gate before the output projection. Grouped-query attention routes the query
heads.

How: transformers picks its attention kernel from a registry
(``AttentionInterface``). We register one kernel, ``"graphheads"``: PyTorch SDPA
followed by the per-head gates, which the converted module passes down as the
``head_gates`` keyword. Nothing is stored on modules between calls; to read the
routing (for the load-balance loss or plots) wrap the forward in :func:`record_routing`.

With ``top_k`` equal to all routed heads the routers start with every gate exactly 1:
the converted model computes what the original did. With fewer heads they start from
the heads a per-head prior prefers: the most important ones when ``head_importance``
(:func:`head_importance`, Michel et al. 2019) is given, where the most important heads
also become the shared heads (MoH-LLaMA3's recipe).

Shape legend: b batch, t tokens, h heads, e head width.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphheads.goh import GraphRouter
from graphheads.graph import HeadGraph
from graphheads.moh import RoutingOutput

__all__ = [
    "ATTENTION_NAME",
    "SUPPORTED_ATTENTION",
    "convert_to_goh",
    "converted_modules",
    "head_importance",
    "load_converted",
    "load_pretrained",
    "mean_pool",
    "record_routing",
    "save_converted",
    "tune",
]

ATTENTION_NAME = "graphheads"
SUPPORTED_ATTENTION = ("LlamaAttention", "GPT2Attention", "BertSelfAttention")


def gated_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    head_gates: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' SDPA kernel, then each head's output (b, t, h, e) times its gate."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if head_gates is not None:
        out = out * head_gates.unsqueeze(-1).to(out.dtype)  # (b, t, h, e)
    return out, weights


def _register_kernel() -> None:
    """Register the gated kernel and its mask format (SDPA's); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, gated_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class RoutedHFAttention(nn.Module):
    """Mixin put in front of a transformers attention class by :func:`convert_to_goh`.

    ``router`` scores heads in its own order; router head i is model head
    ``head_order[i]`` (important heads first, so that they can be the shared ones).
    """

    router: GraphRouter
    head_order: Tensor
    head_position: Tensor

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        routing = self.router(hidden_states)
        gates = routing.gates.index_select(-1, self.head_position)  # (b, t, h), model order
        return super().forward(hidden_states, *args, head_gates=gates, **kwargs)


def _routed_class(base: type, made: dict[type, type]) -> type:
    """One routed subclass per attention class (``made`` holds this conversion's)."""
    if base not in made:
        made[base] = type(f"Routed{base.__name__}", (RoutedHFAttention, base), {})
    return made[base]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if any(c.__name__ in SUPPORTED_ATTENTION for c in type(m).__mro__)
        and not isinstance(m, RoutedHFAttention)
    ]


def converted_modules(model: nn.Module) -> list[RoutedHFAttention]:
    """The routed attention modules of a converted model, in layer order."""
    return [m for m in model.modules() if isinstance(m, RoutedHFAttention)]


def convert_to_goh(
    model: nn.Module,
    *,
    num_shared: int,
    top_k: int,
    graph: HeadGraph | None = None,
    head_importance: Tensor | None = None,
    feature_dim: int = 16,
    num_layers: int = 2,
    prior_step: float = 0.01,
) -> nn.Module:
    """Route the heads of every attention module of ``model`` (changed in place).

    Args:
        model: a transformers ``LlamaForCausalLM``/``LlamaModel``, ``GPT2LMHeadModel``/
            ``GPT2Model`` or ``BertModel`` (or another model built from those attention
            classes).
        num_shared: always-on heads per layer.
        top_k: routed heads per token; ``num_heads - num_shared`` keeps every head on and
            reproduces the original model exactly.
        graph: head-graph template, copied per layer (default: complete graph with
            learnable edge weights). Router head i is the i-th most important head.
        head_importance: (layers, heads) scores; the most important heads of each layer
            become its shared heads and the preferred routed heads.
        feature_dim: node feature width of the routers.
        num_layers: message-passing layers of the routers.
        prior_step: with fewer than all heads on, router head i starts with score prior
            ``-i * prior_step`` (small: gates start near 1).

    Returns:
        ``model``, now using the ``"graphheads"`` attention kernel.
    """
    modules = _attention_modules(model)
    if not modules:
        kind = "already converted" if converted_modules(model) else "not a supported model"
        raise ValueError(
            f"convert_to_goh: {type(model).__name__} is {kind}; supported attention classes: "
            f"{list(SUPPORTED_ATTENTION)}"
        )
    config: Any = getattr(model, "config", None)
    num_heads, d_model = int(config.num_attention_heads), int(config.hidden_size)
    if head_importance is not None and tuple(head_importance.shape) != (len(modules), num_heads):
        raise ValueError(
            f"convert_to_goh: head_importance has shape {tuple(head_importance.shape)}, "
            f"expected (layers, heads) = ({len(modules)}, {num_heads})"
        )
    all_on = top_k == num_heads - num_shared
    _register_kernel()
    classes: dict[type, type] = {}
    for layer, module in enumerate(modules):
        param = next(module.parameters())
        template = (
            copy.deepcopy(graph)
            if graph is not None
            else HeadGraph.complete(num_heads, learnable="edge")
        )
        router = GraphRouter(
            d_model,
            num_heads,
            num_shared,
            top_k,
            template,
            feature_dim=feature_dim,
            num_layers=num_layers,
        )
        router.reset_to_uniform()
        if not all_on:
            with torch.no_grad():
                router.score_bias.copy_(-prior_step * torch.arange(num_heads, dtype=torch.float32))
        order = (
            torch.argsort(head_importance[layer], descending=True, stable=True)
            if head_importance is not None
            else torch.arange(num_heads)
        )
        module.__class__ = _routed_class(type(module), classes)
        module.add_module("router", router.to(device=param.device, dtype=param.dtype))
        module.register_buffer("head_order", order.to(param.device))
        module.register_buffer("head_position", torch.argsort(order).to(param.device))
    model.set_attn_implementation(ATTENTION_NAME)  # type: ignore[operator]
    return model


@contextmanager
def record_routing(model: nn.Module) -> Iterator[list[RoutingOutput]]:
    """Collect the :class:`~graphheads.moh.RoutingOutput` of every routed module during
    the forward passes inside the ``with`` block, in call order::

        with record_routing(model) as routing:
            out = model(**batch)
        aux = sum(r.load_balance_loss for r in routing) / len(routing)
    """
    records: list[RoutingOutput] = []

    def hook(_module: nn.Module, _inputs: Any, output: RoutingOutput) -> None:
        records.append(output)

    handles = [m.router.register_forward_hook(hook) for m in converted_modules(model)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


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
    config: Any = probe.config
    num_heads = int(config.num_attention_heads)
    convert_to_goh(probe, num_shared=0, top_k=num_heads, num_layers=0, feature_dim=1)
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
    if lora:
        from peft import LoraConfig, get_peft_model

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
    params = [p for p in target.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    target.train()
    losses = []
    for batch in batches:
        with record_routing(target) as routing:
            loss = loss_fn(target, batch)
        if routing and aux_loss_weight > 0:
            loss = (
                loss + aux_loss_weight * torch.stack([r.load_balance_loss for r in routing]).mean()
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    target.eval()
    if lora:
        target.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


CONVERSION_FILE = "graphheads_conversion.json"
WEIGHTS_FILE = "graphheads_model.safetensors"


def load_pretrained(path: str | Path) -> nn.Module:
    """A transformers model from a local folder: the causal-LM class when the config
    names one (``...ForCausalLM``/``...LMHeadModel``), else the bare model."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    loader = AutoModelForCausalLM if causal else AutoModel
    return loader.from_pretrained(path).eval()


def save_converted(model: nn.Module, out_dir: str | Path, settings: dict[str, Any]) -> Path:
    """Write the converted weights (safetensors) and the conversion settings (JSON);
    :func:`load_converted` rebuilds the model from them and the base model."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS_FILE))
    (out / CONVERSION_FILE).write_text(json.dumps(settings, indent=2))
    return out


def load_converted(out_dir: str | Path) -> nn.Module:
    """The model :func:`save_converted` wrote: base model, converted, converted weights."""
    from safetensors.torch import load_model

    out = Path(out_dir)
    if not (out / CONVERSION_FILE).exists():
        raise FileNotFoundError(f"no {CONVERSION_FILE} in {out}")
    settings = json.loads((out / CONVERSION_FILE).read_text())
    model = load_pretrained(settings["base_model"])
    convert_to_goh(
        model,
        num_shared=settings["num_shared"],
        top_k=settings["top_k"],
        feature_dim=settings["feature_dim"],
        num_layers=settings["num_layers"],
    )
    load_model(model, str(out / WEIGHTS_FILE))
    return model.eval()

"""Conversion of transformers attention modules into graph-routed ones, and the gated
attention kernel registered with transformers (see :mod:`graphheads.integrations.hf`).

Shape legend: b batch, t tokens, h heads, e head width.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
import sys
from typing import Any

import torch
from torch import Tensor, nn

from graphheads.compat import renamed_argument
from graphheads.gates import check_routing_config
from graphheads.goh import GraphRouter, record_routing
from graphheads.graph import HeadGraph
from graphheads.hub import graph_spec

__all__ = [
    "ATTENTION_NAME",
    "CONFIG_KEY",
    "RoutedHFAttention",
    "attention_modules",
    "conversion_settings",
    "convert_to_goh",
    "converted_modules",
    "dispatches_through_registry",
    "head_layout",
    "record_routing",
]

ATTENTION_NAME = "graphheads"
CONFIG_KEY = "graphheads"  # the conversion settings in model.config (and config.json)
_CLASS_PREFIX = "Routed__"  # routed classes by name: see __getattr__ below


def _attention_with_weights(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Attention that also returns its weights (b, h, t, s), for ``output_attentions``:
    the same masks, key/value groups and causal rule as transformers' SDPA kernel."""
    from transformers.integrations.sdpa_attention import repeat_kv

    position_bias = kwargs.get("position_bias")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and q_len > 1 and attention_mask is None
    if causal and kv_len > q_len:  # as SDPA's kernel: the first q_len keys
        key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(2, 3)) * scale
    if position_bias is not None:
        scores = scores + position_bias
    if causal:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask[..., :kv_len]
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def gated_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    head_gates: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' SDPA kernel (or, with ``output_attentions``, attention that returns
    its weights), then each head's output (b, t, h, e) times its gate."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for unsupported in ("softcap", "s_aux"):  # logit soft-capping, attention sinks
        if kwargs.get(unsupported) is not None:
            raise ValueError(
                f"the {ATTENTION_NAME!r} attention kernel does not support {unsupported!r} "
                f"({type(module).__name__}): this family cannot be routed yet"
            )
    kernel = _attention_with_weights if kwargs.get("output_attentions") else sdpa_attention_forward
    out, weights = kernel(module, query, key, value, attention_mask, **kwargs)
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

    ``router`` scores heads in its own order (important heads first, so that they can be
    the shared ones); model head j is router head ``head_position[j]``.
    """

    router: GraphRouter
    head_position: Tensor

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        implementation = getattr(getattr(self, "config", None), "_attn_implementation", None)
        if implementation not in (None, ATTENTION_NAME):  # other kernels ignore the gates
            raise ValueError(
                f"{type(self).__name__}: routed heads need the {ATTENTION_NAME!r} attention "
                f"kernel, but the model uses {implementation!r} (set_attn_implementation?); "
                f"call model.set_attn_implementation({ATTENTION_NAME!r})"
            )
        routing = self.router(hidden_states)
        gates = routing.gates.index_select(-1, self.head_position)  # (b, t, h), model order
        return super().forward(hidden_states, *args, head_gates=gates, **kwargs)


_UNNAMED: dict[type, type] = {}  # routed classes of bases pickle cannot find by name


def routed_class(base: type) -> type:
    """The routed subclass of attention class ``base``: one per class, importable from
    this module by its qualified name (made on first use by :func:`__getattr__`), so that
    converted models pickle (``torch.save(model)``) and unpickle in a fresh process. A
    class defined in ``__main__``, in a function or in another class gets a routed class
    that works but does not pickle."""
    named = (
        base.__module__ != "__main__"
        and "." not in base.__qualname__
        and "__" not in base.__module__ + base.__qualname__
    )
    if named:
        name = _CLASS_PREFIX + base.__module__.replace(".", "__") + "__" + base.__qualname__
        cls = getattr(sys.modules[__name__], name)
        if cls.__bases__[1] is base:  # not a class of the same name that a reload replaced
            return cls
        globals().pop(name)
        return getattr(sys.modules[__name__], name)
    if base not in _UNNAMED:
        _register_kernel()
        _UNNAMED[base] = type(f"Routed{base.__name__}", (RoutedHFAttention, base), {})
    return _UNNAMED[base]


def __getattr__(name: str) -> type:
    """PEP 562: ``Routed__<module path>__<class>`` is made from the transformers class."""
    if not name.startswith(_CLASS_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    *module_path, qualname = name.removeprefix(_CLASS_PREFIX).split("__")
    base = getattr(importlib.import_module(".".join(module_path)), qualname)
    _register_kernel()  # an unpickled model finds its kernel in a fresh process too
    cls = type(f"Routed{base.__name__}", (RoutedHFAttention, base), {"__module__": __name__})
    cls.__qualname__ = name
    globals()[name] = cls
    return cls


def dispatches_through_registry(cls: type) -> bool:
    """Whether attention class ``cls`` computes its attention through transformers'
    kernel registry (``ALL_ATTENTION_FUNCTIONS``, the ``AttentionInterface``) and hands
    its keyword arguments down to the kernel: what the conversion needs, whatever the
    family."""
    try:
        source = inspect.getsource(cls.forward)  # type: ignore[attr-defined]
    except (OSError, TypeError, AttributeError):
        return False
    calls = re.findall(r"attention_interface\((.*?)\n\s*\)", source, re.S)
    return "ALL_ATTENTION_FUNCTIONS" in source and any("**kwargs" in c for c in calls)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The transformers attention modules :func:`convert_to_goh` routes, in module
    order; ValueError naming any attention module
    (a class named ``...Attention``) that cannot be routed."""
    verdicts: dict[type, bool] = {}  # one source inspection per class

    def dispatches(module: nn.Module) -> bool:
        cls = type(module)
        if cls not in verdicts:
            verdicts[cls] = dispatches_through_registry(cls)
        return verdicts[cls]

    found, refused = [], []
    for name, m in model.named_modules():
        if isinstance(m, RoutedHFAttention):
            continue
        if dispatches(m):
            found.append(m)
        elif type(m).__name__.endswith("Attention") and not any(
            dispatches(c) or isinstance(c, RoutedHFAttention) for c in m.modules()
        ):
            refused.append(f"{name} ({type(m).__name__})")
    if refused:
        raise ValueError(
            f"convert_to_goh: cannot route {', '.join(refused)}: only attention modules that "
            "dispatch through transformers' attention registry (AttentionInterface, "
            "passing **kwargs to the kernel) are supported"
        )
    return found


def head_layout(module: nn.Module, config: Any) -> tuple[int, int]:
    """(query heads, router input width) of a transformers attention module."""
    heads = next(
        (
            getattr(module, a)
            for a in ("num_heads", "num_attention_heads", "n_heads")
            if isinstance(getattr(module, a, None), int)
        ),
        getattr(config, "num_attention_heads", None),
    )
    width = next(
        (
            getattr(module, a)
            for a in ("embed_dim", "d_model", "hidden_size")
            if isinstance(getattr(module, a, None), int)
        ),
        getattr(config, "hidden_size", None) or getattr(config, "d_model", None),
    )
    if not isinstance(heads, int) or not isinstance(width, int):
        raise ValueError(
            f"convert_to_goh: cannot read the head count and width of {type(module).__name__}"
        )
    return heads, width


def converted_modules(model: nn.Module) -> list[RoutedHFAttention]:
    """The routed attention modules of a converted model, in layer order."""
    return [m for m in model.modules() if isinstance(m, RoutedHFAttention)]


def conversion_settings(model: nn.Module) -> dict[str, Any]:
    """The settings :func:`convert_to_goh` was called with, read off a converted model's
    routers: enough to convert the base model again into the same shapes (the head graph
    included), so that the converted weights load. ``convert_to_goh`` records them in
    ``model.config.graphheads``: ``save_pretrained`` writes them into ``config.json``."""
    modules = converted_modules(model)
    if not modules:
        raise ValueError(f"conversion_settings: {type(model).__name__} is not converted")
    router = modules[0].router
    same_heads = len({m.router.num_heads for m in modules}) == 1
    return {
        "num_shared": router.num_shared,
        "top_k": router.top_k,
        "feature_dim": router.feature_dim,
        "graph_layers": len(router.message_passing.layers),
        # modules with different head counts were given no template: each its default graph
        "graph": graph_spec(router.graph) if same_heads else None,
    }


def convert_to_goh(
    model: nn.Module,
    *,
    num_shared: int,
    top_k: int,
    graph: HeadGraph | None = None,
    head_importance: Tensor | None = None,
    feature_dim: int = 16,
    graph_layers: int | None = None,
    prior_step: float = 0.01,
    num_layers: int | None = None,  # deprecated: graph_layers
) -> nn.Module:
    """Route the heads of every attention module of ``model`` (changed in place).

    Args:
        model: a transformers model whose attention modules dispatch through the
            attention registry (:func:`dispatches_through_registry`): decoders, encoders,
            encoder-decoders (self- and cross-attention; a cross-attention module routes
            on its queries), grouped-query attention (query heads are routed). The
            families tested are listed in the docs ("Other models").
        num_shared: always-on heads per layer.
        top_k: routed heads per token; ``num_heads - num_shared`` keeps every head on and
            reproduces the original model exactly.
        graph: head-graph template, copied per layer (default: complete graph with
            learnable edge weights). Router head i is the i-th most important head.
        head_importance: (layers, heads) scores; the most important heads of each layer
            become its shared heads and the preferred routed heads.
        feature_dim: node feature width of the routers.
        graph_layers: message-passing layers of the routers (default 2; ``num_layers``
            is its deprecated name).
        prior_step: with fewer than all heads on, router head i starts with score prior
            ``-i * prior_step`` (small: gates start near 1).

    Returns:
        ``model``, now using the ``"graphheads"`` attention kernel.
    """
    graph_layers = renamed_argument(
        "convert_to_goh", "num_layers", num_layers, "graph_layers", graph_layers
    )
    graph_layers = 2 if graph_layers is None else graph_layers
    modules = attention_modules(model)
    if not modules:
        kind = (
            "already converted"
            if converted_modules(model)
            else "a model without attention modules that dispatch through transformers' "
            "attention registry"
        )
        raise ValueError(f"convert_to_goh: {type(model).__name__} is {kind}")
    config: Any = getattr(model, "config", None)
    layouts = [head_layout(m, config) for m in modules]
    num_heads = layouts[0][0]
    for module, (heads, _) in zip(modules, layouts, strict=True):
        check_routing_config(f"convert_to_goh ({type(module).__name__})", heads, num_shared, top_k)
    if head_importance is not None and (
        tuple(head_importance.shape) != (len(modules), num_heads)
        or any(heads != num_heads for heads, _ in layouts)
    ):
        raise ValueError(
            f"convert_to_goh: head_importance has shape {tuple(head_importance.shape)}, "
            f"expected (attention modules, heads) = ({len(modules)}, {num_heads}) and the "
            "same head count in every module"
        )
    _register_kernel()
    for layer, (module, (num_heads, d_model)) in enumerate(zip(modules, layouts, strict=True)):
        param = next(module.parameters())
        template = (
            copy.deepcopy(graph)
            if graph is not None
            else HeadGraph.complete(num_heads, learnable="edge")
        )
        router = GraphRouter.starting_uniform(
            d_model,
            num_heads,
            num_shared,
            top_k,
            template,
            prior_step=prior_step,
            feature_dim=feature_dim,
            graph_layers=graph_layers,
        )
        order = (
            torch.argsort(head_importance[layer], descending=True, stable=True)
            if head_importance is not None
            else torch.arange(num_heads)
        )
        module.__class__ = routed_class(type(module))
        module.add_module("router", router.to(device=param.device, dtype=param.dtype))
        module.register_buffer("head_position", torch.argsort(order).to(param.device))
    model.set_attn_implementation(ATTENTION_NAME)  # type: ignore[operator]
    if config is not None:  # save_pretrained writes it into config.json
        setattr(config, CONFIG_KEY, conversion_settings(model))
    return model

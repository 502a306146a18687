"""graphheads: attention heads as nodes of a learnable graph.

The modules, in the order data flows (a module imports only modules above it):
``types`` -> ``graph``, ``gnn``, ``masks``, ``rotary`` -> ``attention`` -> ``sparse``
-> ``routed`` -> ``gates`` -> ``moh``, ``goh`` -> ``config``, ``blocks``, ``generation``
-> ``builders`` -> ``transformer``.

The names below load on first use (PEP 562), so ``import graphheads`` and the
``graphheads`` command's ``--help`` do not import PyTorch or PyTorch Geometric.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "AttentionOutput": "graphheads.types",
    "Decoder": "graphheads.transformer",
    "DecoderLayer": "graphheads.transformer",
    "DecoderOnlyLM": "graphheads.transformer",
    "Encoder": "graphheads.transformer",
    "EncoderLayer": "graphheads.transformer",
    "FeedForward": "graphheads.transformer",
    "GoHAttention": "graphheads.goh",
    "GraphRouter": "graphheads.goh",
    "HeadGCNConv": "graphheads.gnn",
    "HeadGraph": "graphheads.graph",
    "HeadMessagePassing": "graphheads.gnn",
    "KVCache": "graphheads.types",
    "MoHAttention": "graphheads.moh",
    "MoHRouter": "graphheads.moh",
    "ModelConfig": "graphheads.config",
    "ModelOutput": "graphheads.transformer",
    "MultiHeadAttention": "graphheads.attention",
    "RoutedAttention": "graphheads.routed",
    "RoutedMultiheadAttention": "graphheads.integrations.pytorch",
    "RoutingOutput": "graphheads.types",
    "SinusoidalPositionalEncoding": "graphheads.transformer",
    "Transformer": "graphheads.transformer",
    "TransformerBlock": "graphheads.blocks",
    "TransformerStack": "graphheads.blocks",
    "TrainedRun": "graphheads.runs",
    "load": "graphheads.loading",
    "open_run": "graphheads.runs",
    "record_routing": "graphheads.goh",
    "route_heads": "graphheads.integrations.pytorch",
    "scaled_dot_product_attention": "graphheads.attention",
    "set_top_k": "graphheads.builders",
}

__all__ = [
    "AttentionOutput",
    "Decoder",
    "DecoderLayer",
    "DecoderOnlyLM",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "GoHAttention",
    "GraphRouter",
    "HeadGCNConv",
    "HeadGraph",
    "HeadMessagePassing",
    "KVCache",
    "MoHAttention",
    "MoHRouter",
    "ModelConfig",
    "ModelOutput",
    "MultiHeadAttention",
    "RoutedAttention",
    "RoutedMultiheadAttention",
    "RoutingOutput",
    "SinusoidalPositionalEncoding",
    "TrainedRun",
    "Transformer",
    "TransformerBlock",
    "TransformerStack",
    "__version__",
    "load",
    "open_run",
    "record_routing",
    "route_heads",
    "scaled_dot_product_attention",
    "set_top_k",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (graphheads.train, ...), as before the names were lazy
        try:
            value = importlib.import_module(f"graphheads.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"graphheads.{name}":
                raise
            raise AttributeError(f"module 'graphheads' has no attribute {name!r}") from None
        globals()[name] = value
        return value
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from graphheads.attention import MultiHeadAttention, scaled_dot_product_attention
    from graphheads.blocks import TransformerBlock, TransformerStack
    from graphheads.builders import set_top_k
    from graphheads.config import ModelConfig
    from graphheads.gnn import HeadGCNConv, HeadMessagePassing
    from graphheads.goh import GoHAttention, GraphRouter, record_routing
    from graphheads.graph import HeadGraph
    from graphheads.integrations.pytorch import RoutedMultiheadAttention, route_heads
    from graphheads.loading import load
    from graphheads.moh import MoHAttention, MoHRouter
    from graphheads.routed import RoutedAttention
    from graphheads.runs import TrainedRun, open_run
    from graphheads.transformer import (
        Decoder,
        DecoderLayer,
        DecoderOnlyLM,
        Encoder,
        EncoderLayer,
        FeedForward,
        ModelOutput,
        SinusoidalPositionalEncoding,
        Transformer,
    )
    from graphheads.types import AttentionOutput, KVCache, RoutingOutput

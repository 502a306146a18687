"""graphheads: attention heads as nodes of a learnable graph.

The modules, in the order data flows (a module imports only modules above it):
``types`` -> ``graph``, ``gnn``, ``masks``, ``rotary`` -> ``attention`` -> ``sparse``
-> ``routed`` -> ``gates`` -> ``moh``, ``goh`` -> ``config``, ``blocks``, ``generation``
-> ``builders`` -> ``transformer``.
"""

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

__version__ = "0.2.0"

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
    "Transformer",
    "TransformerBlock",
    "TransformerStack",
    "__version__",
    "load",
    "record_routing",
    "route_heads",
    "scaled_dot_product_attention",
    "set_top_k",
]

"""graphheads: attention heads as nodes of a learnable graph."""

from graphheads.attention import (
    AttentionOutput,
    KVCache,
    MultiHeadAttention,
    scaled_dot_product_attention,
)
from graphheads.gnn import HeadMessagePassing
from graphheads.goh import GoHAttention, GraphRouter
from graphheads.graph import HeadGraph
from graphheads.moh import MoHAttention, MoHRouter, RoutedAttention, RoutingOutput
from graphheads.transformer import (
    Decoder,
    DecoderLayer,
    DecoderOnlyLM,
    Encoder,
    EncoderLayer,
    FeedForward,
    ModelConfig,
    ModelOutput,
    SinusoidalPositionalEncoding,
    Transformer,
)

__version__ = "0.1.0"

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
    "HeadGraph",
    "HeadMessagePassing",
    "KVCache",
    "MoHAttention",
    "MoHRouter",
    "ModelConfig",
    "ModelOutput",
    "MultiHeadAttention",
    "RoutedAttention",
    "RoutingOutput",
    "SinusoidalPositionalEncoding",
    "Transformer",
    "__version__",
    "scaled_dot_product_attention",
]

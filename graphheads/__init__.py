"""graphheads: attention heads as nodes of a learnable graph."""

from graphheads.attention import (
    AttentionOutput,
    KVCache,
    MultiHeadAttention,
    scaled_dot_product_attention,
)
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

"""Copy weights from PyTorch's own modules into graphheads modules (test oracles)."""

from __future__ import annotations

import torch
from torch import nn

from graphheads import Decoder, DecoderLayer, Encoder, EncoderLayer, FeedForward, MultiHeadAttention


def load_torch_mha(mine: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    mine.copy_from_torch(ref)


def _ffn(d: int, d_ff: int) -> FeedForward:
    return FeedForward(d, d_ff)


@torch.no_grad()
def _copy_common(mine: nn.Module, ref: nn.Module, norms: list[str]) -> None:
    """FFN and LayerNorms; ``norms[i]`` is our name of torch's ``norm{i + 1}``."""
    mine.feed_forward.linear1.load_state_dict(ref.linear1.state_dict())
    mine.feed_forward.linear2.load_state_dict(ref.linear2.state_dict())
    for i, name in enumerate(norms, start=1):
        getattr(mine, name).load_state_dict(getattr(ref, f"norm{i}").state_dict())


def encoder_like(
    ref: nn.TransformerEncoder, d: int, h: int, d_ff: int, norm_first: bool
) -> Encoder:
    layers = []
    for ref_layer in ref.layers:
        layer = EncoderLayer(
            self_attn=MultiHeadAttention(d, h),
            feed_forward=_ffn(d, d_ff),
            d_model=d,
            norm_first=norm_first,
        )
        load_torch_mha(layer.self_attn, ref_layer.self_attn)
        _copy_common(layer, ref_layer, ["self_attn_norm", "ff_norm"])
        layers.append(layer)
    norm = None
    if ref.norm is not None:
        norm = nn.LayerNorm(d)
        norm.load_state_dict(ref.norm.state_dict())
    return Encoder(layers, norm=norm)


def decoder_like(
    ref: nn.TransformerDecoder, d: int, h: int, d_ff: int, norm_first: bool
) -> Decoder:
    layers = []
    for ref_layer in ref.layers:
        layer = DecoderLayer(
            self_attn=MultiHeadAttention(d, h),
            cross_attn=MultiHeadAttention(d, h),
            feed_forward=_ffn(d, d_ff),
            d_model=d,
            norm_first=norm_first,
        )
        load_torch_mha(layer.self_attn, ref_layer.self_attn)
        load_torch_mha(layer.cross_attn, ref_layer.multihead_attn)
        _copy_common(layer, ref_layer, ["self_attn_norm", "cross_attn_norm", "ff_norm"])
        layers.append(layer)
    norm = None
    if ref.norm is not None:
        norm = nn.LayerNorm(d)
        norm.load_state_dict(ref.norm.state_dict())
    return Decoder(layers, norm=norm)

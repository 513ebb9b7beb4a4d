"""Modules built on pyattn ops."""
from pyattn.nn.attention import CausalSelfAttention, RotaryEmbedding
from pyattn.nn.conv import PaddedConv2d

__all__ = ["CausalSelfAttention", "PaddedConv2d", "RotaryEmbedding"]

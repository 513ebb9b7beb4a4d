"""Modules built on pyattn ops."""
from pyattn.nn.attention import CausalSelfAttention, RotaryEmbedding
from pyattn.nn.conv import PaddedConv2d
from pyattn.nn.graph import GCNConv, GraphConv, MessagePassing

__all__ = ["CausalSelfAttention", "GCNConv", "GraphConv", "MessagePassing", "PaddedConv2d",
           "RotaryEmbedding"]

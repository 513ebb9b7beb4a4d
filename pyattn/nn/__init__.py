"""Modules built on pyattn ops."""
from pyattn.nn.conv import PaddedConv2d

__all__ = ["PaddedConv2d"]

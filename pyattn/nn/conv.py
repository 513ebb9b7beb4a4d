"""``PaddedConv2d``: ``nn.Conv2d`` whose padding is fused into the pyattn kernel."""
import torch
from torch import nn

from pyattn.ops.padded_conv import padded_conv2d


class PaddedConv2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` computed by :func:`pyattn.padded_conv2d`.

    Same constructor (including ``padding_mode`` and ``padding='same'``), same
    parameters (``weight``, ``bias``), shapes and initialisation as
    ``nn.Conv2d``, so state dicts load both ways. ``nn.Conv2d`` pads by copying
    the input for non-zero padding modes; this module never does.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return padded_conv2d(input, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, self.groups, self.padding_mode)

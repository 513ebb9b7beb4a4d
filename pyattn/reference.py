"""Pure-PyTorch references that pyattn's kernels are tested against."""
import torch
import torch.nn.functional as F


def padded_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                  padding_mode="zeros"):
    """``F.conv2d`` of the input padded by ``F.pad`` (a padded copy, as nn.Conv2d does).

    ``padding`` is an int, an ``(h, w)`` pair or ``(top, bottom, left, right)``.
    """
    if isinstance(padding, int):
        padding = (padding, padding)
    if len(padding) == 2:
        padding = (padding[0], padding[0], padding[1], padding[1])
    top, bottom, left, right = padding
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = F.pad(input, (left, right, top, bottom), mode=mode)
    return F.conv2d(padded, weight, bias, stride, 0, dilation, groups)

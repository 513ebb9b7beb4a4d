"""The float64 reference of the padded-conv tests, extended to empty channel counts."""
import torch

from pyattn import reference


def reference_allowing_empty_channels(x, w, b, *args):
    """F.conv2d(F.pad(...)), which refuses zero input or output channels, extended
    by the empty sum: no input channels give bias (or zeros), no output channels
    an empty output. (N = 0 is F.conv2d's own answer.)"""
    if x.shape[1] and w.shape[0]:
        return reference.padded_conv2d(x, w, b, *args)
    probe = torch.ones(x.shape[0], 1, *x.shape[2:], dtype=x.dtype)
    probe_weight = torch.ones(1, 1, *w.shape[2:], dtype=x.dtype)
    stride, padding, dilation, _, mode = args
    shape = reference.padded_conv2d(probe, probe_weight, None, stride, padding, dilation, 1,
                                    mode).shape
    empty = (x.sum() + w.sum()) * 0  # keeps both in the autograd graph
    out = empty + torch.zeros(shape[0], w.shape[0], *shape[2:], dtype=x.dtype)
    return out if b is None else out + b.view(1, -1, 1, 1)

"""``pyattn.padded_conv2d``: conv2d with the padding fused into the kernel.

``torch.ops.pyattn.padded_conv2d`` computes
``F.conv2d(F.pad(input, pad, mode), weight, bias, stride, 0, dilation, groups)``
without building the padded input: the kernels map every out-of-range input
coordinate back into the tensor (reflect, replicate, circular) or to zero.
The backward of an input pixel collects every output position that read it,
directly or through the padding.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

IntOrPair = Union[int, Sequence[int]]
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(name: str, value: IntOrPair) -> list[int]:
    if isinstance(value, bool):
        raise TypeError(f"padded_conv2d: `{name}` must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return [value, value]
    values = list(value)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"padded_conv2d: `{name}` must be an int or a pair of ints, got {value!r}")
    return values


def _padding(padding: Union[str, IntOrPair], weight: torch.Tensor, stride: list[int],
             dilation: list[int]) -> list[int]:
    """(top, bottom, left, right) from an int, an (h, w) pair, 'valid' or 'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding != "same":
            raise ValueError(f"padded_conv2d: `padding` string must be 'valid' or 'same', got {padding!r}")
        if stride != [1, 1]:
            raise ValueError("padded_conv2d: `padding`='same' needs stride 1, got stride "
                             f"{tuple(stride)}")
        if weight.dim() != 4:
            raise ValueError(f"padded_conv2d: expected `weight` to be a 4-D tensor, got {weight.dim()}-D")
        pads = []
        for d, k in zip(dilation, weight.shape[2:]):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]  # as PyTorch: the extra one after
        return pads
    h, w = _pair("padding", padding)
    return [h, h, w, w]


def padded_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride: IntOrPair = 1, padding: Union[str, IntOrPair] = 0,
                  dilation: IntOrPair = 1, groups: int = 1,
                  padding_mode: str = "zeros") -> torch.Tensor:
    r"""2-D convolution of a padded input, without materialising the padding.

    .. math::
        \text{out}[n, o] = \text{bias}[o] + \sum_{c \in g(o)} \sum_{k_h, k_w}
        W[o, c, k_h, k_w]\; \tilde{x}[n, c,\, s_h i + d_h k_h - p_t,\, s_w j + d_w k_w - p_l]

    where :math:`\tilde{x}` is the input extended by ``padding_mode`` (zeros,
    reflect, replicate or circular). Equal to ``F.conv2d(F.pad(input, ...,
    mode=padding_mode), weight, bias, stride, 0, dilation, groups)``, and to
    ``nn.Conv2d(..., padding_mode=padding_mode)``.

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``.
        weight: ``(C_out, C_in / groups, KH, KW)``.
        bias: ``(C_out,)`` or ``None``.
        stride, dilation: int or ``(h, w)``. Default 1.
        padding: int, ``(h, w)``, ``'valid'`` or ``'same'`` (stride 1). Default 0.
        groups: blocked connections from input to output channels. Default 1.
        padding_mode: ``'zeros' | 'reflect' | 'replicate' | 'circular'``.
            Reflect needs padding < input size, circular padding <= input size.

    Returns:
        ``(N, C_out, H_out, W_out)`` (or unbatched), with
        ``H_out = (H + 2 p_h - d_h (KH - 1) - 1) // s_h + 1``.

    CPU: float32, float64. CUDA: float16, bfloat16, float32, float64.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padded_conv2d: `padding_mode` must be one of {PADDING_MODES}, "
                         f"got {padding_mode!r}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"padded_conv2d: `groups` must be an int, got {groups!r}")
    stride_hw = _pair("stride", stride)
    dilation_hw = _pair("dilation", dilation)
    pads = _padding(padding, weight, stride_hw, dilation_hw)
    unbatched = isinstance(input, torch.Tensor) and input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    out = torch.ops.pyattn.padded_conv2d(input, weight, bias, stride_hw, pads, dilation_hw,
                                         groups, padding_mode)
    return out.squeeze(0) if unbatched else out


def _out_size(size, before, after, kernel, stride, dilation):
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.register_fake("pyattn::padded_conv2d")
def _padded_conv2d_fake(input, weight, bias, stride, padding, dilation, groups, padding_mode):
    torch._check(input.dim() == 4, lambda: "padded_conv2d: expected `input` to be 4-D")
    torch._check(weight.dim() == 4, lambda: "padded_conv2d: expected `weight` to be 4-D")
    torch._check(weight.shape[1] * groups == input.shape[1],
                 lambda: "padded_conv2d: `weight` and `input` channels do not match")
    n, _, h, w = input.shape
    out_h = _out_size(h, padding[0], padding[1], weight.shape[2], stride[0], dilation[0])
    out_w = _out_size(w, padding[2], padding[3], weight.shape[3], stride[1], dilation[1])
    return input.new_empty((n, weight.shape[0], out_h, out_w))


@torch.library.register_fake("pyattn::padded_conv2d_grad_input")
def _grad_input_fake(grad_output, input, weight, stride, padding, dilation, groups, padding_mode):
    return input.new_empty(input.shape)


@torch.library.register_fake("pyattn::padded_conv2d_grad_weight")
def _grad_weight_fake(grad_output, input, weight, stride, padding, dilation, groups, padding_mode):
    return weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, padding_mode = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation, groups, padding_mode)


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = torch.ops.pyattn.padded_conv2d_grad_input(grad_output, input, weight,
                                                               *ctx.conv_args)
    if ctx.needs_input_grad[1]:
        grad_weight = torch.ops.pyattn.padded_conv2d_grad_weight(grad_output, input, weight,
                                                                 *ctx.conv_args)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_output.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


torch.library.register_autograd("pyattn::padded_conv2d", _backward, setup_context=_setup_context)

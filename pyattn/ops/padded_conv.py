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
from torch._prims_common import suggest_memory_format

from pyattn.ops import autograd_kernel

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
    """(top, bottom, left, right) from an int, an (h, w) pair, a (top, bottom,
    left, right) 4-tuple, 'valid' or 'same'."""
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
    if not isinstance(padding, int) and len(padding) == 4:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in padding):
            raise TypeError(f"padded_conv2d: `padding` values must be ints, got {padding!r}")
        return list(padding)
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
        padding: int, ``(h, w)``, ``(top, bottom, left, right)``, ``'valid'`` or
            ``'same'`` (stride 1). Default 0.
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
    out = autograd_kernel.call(torch.ops.pyattn.padded_conv2d.default, input, weight, bias,
                               stride_hw, pads, dilation_hw, groups, padding_mode)
    return out.squeeze(0) if unbatched else out


def _out_size(size, before, after, kernel, stride, dilation):
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


def _check_devices(op, **tensors):
    """Every tensor argument on one device. The fake kernel also serves the Meta
    dispatch key, which wins for a CPU input with a 'meta' weight: without this
    check it would return an uninitialised CPU tensor."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        torch._check(t.device == first.device,
                     lambda: f"{op}: `{name}` must be on the device of `{first_name}` "
                             f"({first.device}), got {t.device} (same device required)")


def _like_input(input, shape):
    """A new tensor of ``shape`` in ``input``'s memory format (as nn.Conv2d: a
    channels-last input gives a channels-last output)."""
    return input.new_empty(shape).contiguous(memory_format=suggest_memory_format(input))


@torch.library.register_fake("pyattn::padded_conv2d")
def _padded_conv2d_fake(input, weight, bias, stride, padding, dilation, groups, padding_mode):
    _check_devices("padded_conv2d", input=input, weight=weight, bias=bias)
    torch._check(input.dim() == 4, lambda: "padded_conv2d: expected `input` to be 4-D")
    torch._check(weight.dim() == 4, lambda: "padded_conv2d: expected `weight` to be 4-D")
    torch._check(weight.shape[1] * groups == input.shape[1],
                 lambda: "padded_conv2d: `weight` and `input` channels do not match")
    n, _, h, w = input.shape
    out_h = _out_size(h, padding[0], padding[1], weight.shape[2], stride[0], dilation[0])
    out_w = _out_size(w, padding[2], padding[3], weight.shape[3], stride[1], dilation[1])
    return _like_input(input, (n, weight.shape[0], out_h, out_w))


@torch.library.register_fake("pyattn::padded_conv2d_grad_input")
def _grad_input_fake(grad_output, input, weight, stride, padding, dilation, groups, padding_mode):
    _check_devices("padded_conv2d_grad_input", input=input, weight=weight,
                   grad_output=grad_output)
    return _like_input(input, input.shape)


@torch.library.register_fake("pyattn::padded_conv2d_grad_weight")
def _grad_weight_fake(grad_output, input, weight, stride, padding, dilation, groups, padding_mode):
    _check_devices("padded_conv2d_grad_weight", input=input, weight=weight,
                   grad_output=grad_output)
    return weight.new_empty(weight.shape)


# Autograd. The convolution y = conv(x, w) + b is bilinear in (x, w), and so are
# its two gradient ops: gx = conv_T(gy, w) (grad_input) and gw = corr(gy, x)
# (grad_weight). Every derivative of one of the three ops is therefore again one
# of the three ops, which makes any order of reverse and forward mode exact:
#   y  = conv(x, w):  vjp(u)  = (gx(u, w), gw(u, x), sum u)     jvp = conv(dx, w) + conv(x, dw) + db
#   gx = gx(gy, w):   vjp(v)  = (conv(v, w), -, gw(gy, v))        jvp = gx(dgy, w) + gx(gy, dw)
#   gw = gw(gy, x):   vjp(v)  = (conv(x, v), gx(gy, v), -)        jvp = gw(dgy, x) + gw(gy, dx)
# grad_input does not depend on the values of `input`, nor grad_weight on those
# of `weight` (only their shapes): those derivatives are exactly zero.
_ops = torch.ops.pyattn


def _conv(x, w, args):
    return _ops.padded_conv2d(x, w, None, *args)


def _grad_input(gy, x, w, args):
    return _ops.padded_conv2d_grad_input(gy, x, w, *args)


def _grad_weight(gy, x, w, args):
    return _ops.padded_conv2d_grad_weight(gy, x, w, *args)


def _sum_defined(*terms):
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0])


def _conv_vjp(ctx, u):
    x, w = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (_grad_input(u, x, w, ctx.args) if need[0] else None,
            _grad_weight(u, x, w, ctx.args) if need[1] else None,
            u.sum((0, 2, 3)) if ctx.has_bias and need[2] else None)


def _conv_jvp(ctx, dx, dw, db):
    x, w = ctx.saved_tensors
    return _sum_defined(None if dx is None else _conv(dx, w, ctx.args),
                        None if dw is None else _conv(x, dw, ctx.args),
                        None if db is None else db.view(1, -1, 1, 1))


def _grad_input_vjp(ctx, v):
    gy, x, w = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (_conv(v, w, ctx.args) if need[0] else None, None,
            _grad_weight(gy, v, w, ctx.args) if need[2] else None)


def _grad_input_jvp(ctx, dgy, dx, dw):
    gy, x, w = ctx.saved_tensors
    return _sum_defined(None if dgy is None else _grad_input(dgy, x, w, ctx.args),
                        None if dw is None else _grad_input(gy, x, dw, ctx.args),
                        None if dgy is not None or dw is not None else torch.zeros_like(x))


def _grad_weight_vjp(ctx, v):
    gy, x, w = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (_conv(x, v, ctx.args) if need[0] else None,
            _grad_input(gy, x, v, ctx.args) if need[1] else None, None)


def _grad_weight_jvp(ctx, dgy, dx, dw):
    gy, x, w = ctx.saved_tensors
    return _sum_defined(None if dgy is None else _grad_weight(dgy, x, w, ctx.args),
                        None if dx is None else _grad_weight(gy, dx, w, ctx.args),
                        None if dgy is not None or dx is not None else torch.zeros_like(w))


def _register_autograd(name, n_tensors, vjp, jvp):
    """Autograd kernel of pyattn::`name` (its first `n_tensors` arguments are the
    tensors) with a vjp and a jvp, so reverse mode, forward mode (torch.func.jvp,
    forward_ad) and their compositions all work."""
    def setup_context(ctx, inputs, output):
        tensors = [t for t in inputs[:n_tensors] if t is not None]
        if name == "padded_conv2d":
            ctx.has_bias = inputs[2] is not None
            tensors = list(inputs[:2])
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.args = tuple(inputs[n_tensors:])

    def backward(ctx, grad):
        return (*vjp(ctx, grad), *([None] * len(ctx.args)))

    def forward_tangent(ctx, *tangents):
        return jvp(ctx, *tangents[:n_tensors])

    autograd_kernel.register(
        autograd_kernel.function_class(name, setup_context, backward, forward_tangent))


_register_autograd("padded_conv2d", 3, _conv_vjp, _conv_jvp)
_register_autograd("padded_conv2d_grad_input", 3, _grad_input_vjp, _grad_input_jvp)
_register_autograd("padded_conv2d_grad_weight", 3, _grad_weight_vjp, _grad_weight_jvp)

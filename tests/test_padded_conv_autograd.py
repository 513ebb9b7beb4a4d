"""padded_conv2d beyond first-order reverse mode: double backward, forward mode,
empty batches, channels-last layout, device checks (issue 11)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad

import pyattn
from pyattn import reference
from padded_conv_reference import reference_allowing_empty_channels

MODES = ["zeros", "reflect", "replicate", "circular"]
# (stride, padding (top, bottom, left, right), dilation, groups): plain, strided +
# dilated + grouped with asymmetric padding.
SAMPLES = [((1, 1), (1, 1, 1, 1), (1, 1), 1), ((2, 1), (2, 1, 0, 2), (1, 2), 2)]


def _inputs(groups, bias=True):
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=["plain", "strided_dilated_grouped"])
def test_gradgradcheck(mode, sample):
    stride, padding, dilation, groups = sample
    x, w, b = _inputs(groups)
    fn = lambda x, w, b: torch.ops.pyattn.padded_conv2d(x, w, b, stride, padding, dilation,
                                                          groups, mode)
    assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_penalty_matches_reference(mode):
    # A WGAN-GP / R1 style penalty: the gradient of |d out / d x|^2 w.r.t. the weight.
    x, w, b = _inputs(2)
    args = ((2, 1), (2, 1, 0, 2), (1, 2), 2, mode)
    results = []
    for conv in (pyattn.padded_conv2d, reference.padded_conv2d):
        out = conv(x, w, b, *args)
        (gx,) = torch.autograd.grad((out.tanh()).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), (x, w, b)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_double_backward_is_not_silently_zero():
    x, w, _ = _inputs(1, bias=False)
    out = pyattn.padded_conv2d(x, w, None, 1, 1, 1, 1, "reflect")
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.sum(), w)
    assert gw.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=["plain", "strided_dilated_grouped"])
def test_jvp_matches_reference(mode, sample):
    stride, padding, dilation, groups = sample
    primals = tuple(t.detach() for t in _inputs(groups))
    tangents = tuple(torch.randn_like(t) for t in primals)
    args = (stride, padding, dilation, groups, mode)
    ours = torch.func.jvp(lambda *p: torch.ops.pyattn.padded_conv2d(*p, *args), primals, tangents)
    theirs = torch.func.jvp(lambda *p: reference.padded_conv2d(*p, *args), primals, tangents)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = torch.ops.pyattn.padded_conv2d(*duals, *args)
        torch.testing.assert_close(forward_ad.unpack_dual(out).tangent, theirs[1])


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_forward_over_reverse_hessian_vector_product(mode):
    x, w, b = [t.detach() for t in _inputs(2)]
    args = ((2, 1), (2, 1, 0, 2), (1, 2), 2, mode)
    v = torch.randn_like(w)
    results = []
    for conv in (torch.ops.pyattn.padded_conv2d, reference.padded_conv2d):
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(w.clone().requires_grad_(), v)
            (grad_w,) = torch.autograd.grad(conv(x, dual, b, *args).sin().sum(), dual,
                                            create_graph=True)
            results.append(forward_ad.unpack_dual(grad_w).tangent)
    torch.testing.assert_close(*results)
    assert results[0].abs().sum() > 0


def test_single_torch_func_level_works_and_nested_levels_raise():
    x, w, b = [t.detach() for t in _inputs(1)]
    args = ((1, 1), (1, 1, 1, 1), (1, 1), 1, "reflect")
    loss = lambda conv: (lambda w: conv(x, w, b, *args).sin().sum())
    torch.testing.assert_close(torch.func.grad(loss(torch.ops.pyattn.padded_conv2d))(w),
                               torch.func.grad(loss(reference.padded_conv2d))(w))
    hvp = lambda w: torch.func.jvp(torch.func.grad(loss(torch.ops.pyattn.padded_conv2d)),
                                   (w,), (torch.ones_like(w),))
    with pytest.raises(NotImplementedError, match="nested torch.func transforms"):
        hvp(w)


@pytest.mark.parametrize("shape, weight_shape", [((0, 4, 6, 7), (3, 4, 3, 3)),
                                                 ((2, 0, 6, 7), (3, 0, 3, 3)),
                                                 ((2, 4, 6, 7), (0, 4, 3, 3))],
                         ids=["batch0", "in_channels0", "out_channels0"])
@pytest.mark.parametrize("mode", MODES)
def test_empty_shapes_match_torch_and_backpropagate(shape, weight_shape, mode):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(weight_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(weight_shape[0], dtype=torch.float64, requires_grad=True)
    out = pyattn.padded_conv2d(x, w, b, 1, 1, 1, 1, mode)
    ref = reference_allowing_empty_channels(x, w, b, 1, 1, 1, 1, mode)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), grad),
                         torch.autograd.grad(ref, (x, w, b), grad)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_empty_batch_through_the_module():
    conv = pyattn.nn.PaddedConv2d(3, 5, 3, padding=1, padding_mode="reflect")
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    out = conv(x)
    assert out.shape == (0, 5, 8, 8)
    out.sum().backward()
    assert torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))


@pytest.mark.parametrize("mode", MODES)
def test_channels_last_in_channels_last_out(mode):
    x = torch.randn(2, 4, 9, 8).to(memory_format=torch.channels_last).requires_grad_()
    ours = pyattn.nn.PaddedConv2d(4, 6, 3, padding=1, padding_mode=mode)
    theirs = nn.Conv2d(4, 6, 3, padding=1, padding_mode=mode)
    theirs.load_state_dict(ours.state_dict())
    out, ref = ours(x), theirs(x)
    # nn.Conv2d keeps channels-last in zeros mode (its F.pad copy drops it in the others)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert gx.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_opcheck():
    x = torch.randn(2, 4, 7, 8).to(memory_format=torch.channels_last)
    w = torch.randn(6, 2, 3, 3)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 2, "replicate")
    torch.library.opcheck(torch.ops.pyattn.padded_conv2d, (x, w, None, *args))
    grad = torch.randn(2, 6, 7, 8)
    torch.library.opcheck(torch.ops.pyattn.padded_conv2d_grad_input, (grad, x, w, *args))


@pytest.mark.parametrize("which", ["weight", "bias", "input"])
def test_tensor_on_another_device_raises(which):
    tensors = {"input": torch.randn(1, 3, 8, 8), "weight": torch.randn(4, 3, 3, 3),
               "bias": torch.randn(4)}
    tensors[which] = tensors[which].to("meta")
    with pytest.raises(RuntimeError, match="same device|must be on"):
        pyattn.padded_conv2d(tensors["input"], tensors["weight"], tensors["bias"], 1, 1, 1, 1,
                             "reflect")


@pytest.mark.parametrize("op", ["padded_conv2d_grad_input", "padded_conv2d_grad_weight"])
def test_grad_output_on_another_device_raises(op):
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1, "zeros")
    with pytest.raises(RuntimeError, match="same device|must be on"):
        getattr(torch.ops.pyattn, op)(torch.randn(1, 4, 8, 8, device="meta"),
                                      torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), *args)

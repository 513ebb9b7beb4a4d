"""pyattn.padded_conv2d against F.pad + F.conv2d (pyattn.reference)."""
import itertools

import pytest
import torch
import torch.nn as nn

import pyattn
from pyattn import reference
from pyattn.profiling import peak_memory
from conftest import requires_cuda

MODES = ["zeros", "reflect", "replicate", "circular"]
# (h, w) paddings: symmetric 0..3 and asymmetric h != w.
PADDINGS = [0, 1, 2, 3, (1, 2), (3, 0)]


def _assert_close(got, exact, dtype, what):
    """float64: tight; float32: relative to the result's magnitude (sums of
    thousands of terms carry ~sqrt(n) eps of rounding)."""
    scale = max(exact.abs().max().item(), 1.0)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), exact.double(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def _check(x, w, b, stride, padding, dilation, groups, mode):
    """Forward and all three gradients of pyattn against the float64 reference."""
    dtype = x.dtype
    inputs = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    if b is None:
        inputs.append(None)
        exact_inputs.append(None)
    out = pyattn.padded_conv2d(*inputs, stride, padding, dilation, groups, mode)
    ref = reference.padded_conv2d(*exact_inputs, stride, padding, dilation, groups, mode)
    _assert_close(out, ref, dtype, "forward")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [t for t in inputs if t is not None], grad)
    want = torch.autograd.grad(ref, [t for t in exact_inputs if t is not None], grad.double())
    for name, g, r in zip(["input", "weight", "bias"], got, want):
        _assert_close(g, r, dtype, f"grad {name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("groups", [1, 2])
def test_grid_float64(mode, padding, stride, dilation, kernel, groups):
    x = torch.randn(2, 4, 11, 13, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, kernel, kernel, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    _check(x, w, b, stride, padding, dilation, groups, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 7, 7), (3, 5, 17, 9), (2, 3, 32, 32)])
def test_float32_odd_shapes(mode, shape):
    x = torch.randn(shape)
    kernel = 3 if min(shape[2:]) >= 3 else 1
    pad = min(1, min(shape[2:]) - 1) if mode == "reflect" else 1
    w = torch.randn(4, shape[1], kernel, kernel)
    _check(x, w, torch.randn(4), 1, pad, 1, 1, mode)


@pytest.mark.parametrize("mode", MODES)
def test_non_rectangular_kernel_and_asymmetric_stride(mode):
    x = torch.randn(2, 3, 9, 14, dtype=torch.float64)
    w = torch.randn(5, 3, 2, 4, dtype=torch.float64)
    _check(x, w, None, (2, 1), (1, 3), (2, 1), 1, mode)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(mode):
    x = torch.randn(2, 13, 11, 6, dtype=torch.float64).permute(0, 3, 2, 1)  # (2, 6, 11, 13)
    w = torch.randn(8, 3, 4, 3, dtype=torch.float64).transpose(2, 3)[::2]  # (4, 3, 3, 4)
    assert not x.is_contiguous() and not w.is_contiguous()
    _check(x, w, torch.randn(8, dtype=torch.float64)[::2], 1, 2, 1, 2, mode)
    xl = torch.randn(3, 4, 10, 12, dtype=torch.float64).to(memory_format=torch.channels_last)
    _check(xl, torch.randn(2, 4, 3, 3, dtype=torch.float64), None, 1, 1, 1, 1, mode)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_grad_output(mode):
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    out = pyattn.padded_conv2d(x, w, None, 1, 1, 1, 1, mode)
    ref = reference.padded_conv2d(x, w, None, 1, 1, 1, 1, mode)
    grad = torch.randn(9, 8, 4, 2, dtype=torch.float64).permute(3, 2, 1, 0)
    assert grad.shape == out.shape and not grad.is_contiguous()
    for g, r in zip(torch.autograd.grad(out, (x, w), grad), torch.autograd.grad(ref, (x, w), grad)):
        torch.testing.assert_close(g, r)


def test_unbatched_input_and_same_padding():
    x = torch.randn(3, 10, 11, dtype=torch.float64)
    w = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    out = pyattn.padded_conv2d(x, w, padding="same", dilation=(1, 2), padding_mode="reflect")
    # 'same' pads dilation * (k - 1) in total, the odd one after (as PyTorch).
    ref = reference.padded_conv2d(x[None], w, None, 1, (1, 2, 2, 2), (1, 2), 1, "reflect")[0]
    assert out.shape == (2, 10, 11)
    torch.testing.assert_close(out, ref)
    valid = pyattn.padded_conv2d(x, w, padding="valid")
    torch.testing.assert_close(valid, torch.nn.functional.conv2d(x, w))


def test_workspace_chunking_and_padded_copy_is_never_made():
    # The workspace holds one sample's columns (4.7 MB) per thread on CPU (3
    # samples per chunk on CUDA); the padded copy would be 40 MB.
    x = torch.randn(64, 32, 64, 64)
    w = torch.randn(4, 32, 3, 3)
    out = pyattn.padded_conv2d(x, w, None, 1, 3, 1, 1, "reflect")
    torch.testing.assert_close(out, reference.padded_conv2d(x, w, None, 1, 3, 1, 1, "reflect"),
                               rtol=1e-4, atol=1e-4)
    padded_bytes = 64 * 32 * 70 * 70 * 4
    pyattn.padded_conv2d(x, w, None, 1, 3, 1, 1, "reflect")  # warm up
    ours = peak_memory(lambda: pyattn.padded_conv2d(x, w, None, 1, 3, 1, 1, "reflect"))
    theirs = peak_memory(lambda: reference.padded_conv2d(x, w, None, 1, 3, 1, 1, "reflect"))
    assert ours < padded_bytes < theirs, (ours, padded_bytes, theirs)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_many_row_tiles(mode):
    # 1600 column rows x 40 columns of float64 = 512 KB per output row: the CPU
    # kernels run im2col + GEMM in tiles of 2 output rows (11 tiles here).
    x = torch.randn(2, 64, 41, 40, dtype=torch.float64)
    w = torch.randn(3, 64, 5, 5, dtype=torch.float64)
    _check(x, w, torch.randn(3, dtype=torch.float64), (2, 1), 2, 1, 1, mode)


@pytest.mark.parametrize("dtype, width", [(torch.float32, 32), (torch.float64, 16)])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_permuted_rows_in_row_tiles(dtype, width, mode):
    # 6400 column rows x 16 (8) outputs of 4 (8) bytes = 400 KB per output row:
    # tiles of 2 rows (6 here) whose width-32 float (width-16 double) rows go
    # through the AVX-512 permute (test_gathered_planes), each tile's rows
    # shifted along the height only.
    x = torch.randn(2, 256, 11, width, dtype=dtype)
    w = torch.randn(4, 256, 5, 5, dtype=dtype)
    _check(x, w, torch.randn(4, dtype=dtype), (1, 2), 2, 1, 1, mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width, padding, dilation",
                         [(33, 0, 1), (34, 2, 1), (35, 0, 2), (47, 1, 1), (81, 3, 2)])
def test_stride_two_rows_of_whole_vectors(dtype, mode, width, padding, dilation):
    # On CPU, rows read at stride 2 with at least one vector of outputs (16
    # floats, 8 doubles) move whole vectors (the even lanes of two 64-byte
    # loads), then a scalar tail: 16-42 outputs per row give one or several
    # vectors and tails;
    # at width 33 without padding the last tap's rows end one value short of
    # a second load and must finish one by one; the last row of the last plane
    # ends where the input does. Forward, grad input and grad weight (which
    # runs im2col again).
    x = torch.randn(3, 2, 5, width, dtype=dtype)
    w = torch.randn(4, 2, 3, 3, dtype=dtype)
    _check(x, w, torch.randn(4, dtype=dtype), 2, padding, dilation, 1, mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("height, width, stride, padding", [
    (3, 3, 2, 1), (7, 3, 2, 1), (7, 8, 2, 5), (7, 9, 2, 1), (7, 13, 2, 2), (7, 15, 3, 2),
    (7, 16, 2, 1), (7, 17, 2, 2), (7, 19, 2, 1), (7, 21, 2, 2), (7, 23, 2, 1), (13, 25, 2, 2),
    (5, 32, 2, 1), (5, 32, 2, 0), (7, 35, 3, 1)])
def test_gathered_planes(dtype, mode, height, width, stride, padding):
    # Small strided planes in im2col (forward, grad weight). With AVX-512:
    # input rows of at most 32 floats / 16 doubles with at most 16 / 8 outputs
    # per row are picked by a two-register permute per output row (widths 3,
    # 8 / 16 (one whole register of doubles / floats), 9 / 17 (one lane more),
    # 32 (two) with 16 / 15 outputs: a full and a partial vector of outputs;
    # Net1's conv3: 18 -> 10, conv4: 10 -> 6). Elsewhere (no AVX-512, wider
    # rows: 35 at stride 3, doubles from 17) rows of at most 8 outputs are
    # read through per-tap plane tables, longer ones by the row loops.
    x = torch.randn(3, 2, height, width, dtype=dtype)
    w = torch.randn(4, 2, 3, 3, dtype=dtype)
    _check(x, w, torch.randn(4, dtype=dtype), stride, padding, 1, 1, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride, groups, size", [(1, 1, 12), (2, 2, 12), (2, 1, 29)])
def test_several_samples_per_gemm(mode, stride, groups, size):
    # Small planes share a GEMM on CPU (about 512 columns): 12 x 12 outputs at
    # stride 1 put 4 samples in one, 6 x 6 at stride 2 put 15 (and take the
    # per-tap plane tables of rows <= 8), 15 x 15 at stride 2 put 3 (strided row
    # loops); batch 101 splits into uneven chunks, so both chunk sizes are checked.
    x = torch.randn(101, 8, size, size)
    w = torch.randn(6, 8 // groups, 3, 3)
    _check(x, w, torch.randn(6), stride, 1, 1, groups, mode)


def _cpu_has_avx512f():
    """The direct kernels' own condition (the CPU's avx512f flag), not torch's
    capability, which ATEN_CPU_CAPABILITY can lower and which also asks for
    AVX-512 BW / VL / DQ."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return "avx512f" in cpuinfo.read().split()
    except OSError:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


_HAS_AVX512F = _cpu_has_avx512f()


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def _four_pads(padding):
    """(top, bottom, left, right) from the op's int, (h, w) or 4-tuple."""
    if isinstance(padding, tuple) and len(padding) == 4:
        return list(padding)
    return [p for p in _pair(padding) for _ in range(2)]


def _cpu_path(which, x, w, stride, padding, dilation, groups, mode):
    """The kernel a CPU pass takes: 'direct', 'gemm', or for the input gradient
    'transposed_forward' / 'transposed_forward_folded'."""
    return torch.ops.pyattn.padded_conv2d_cpu_path(
        which, x, w, _pair(stride), _four_pads(padding), _pair(dilation), groups, mode)


# The CPU's direct kernels (AVX-512; forward and both gradients, which _check
# compares): (batch, C_in, C_out, H, W, kernel, stride, padding, dilation,
# groups). Output widths 1, 7 and 113 (113: tiles of 15-16 pixels, uneven); 40
# and 80 output channels end in part-filled vectors (80: a second block of
# channel vectors); stride 3 along the height, dilation 2, groups 2 and
# asymmetric padding; 40 x 113 x 24 channels packs several row blocks per sample
# in the forward (about 256 KiB each), up to 1 MiB for the input gradient, and
# leaves part of a vector of input channels; Net1's conv4 (6 x 6 outputs);
# 256 output channels, whose products cap a block at 3 rows (1 in float64);
# strides (3, 2) with padding on top and left only, where the input
# gradient's packed rows and columns end before the input's last row and
# column, which circular padding reads (their gradient is added outside the
# packed positions; the other padding positions fold into packed ones).
DIRECT_SHAPES = [
    (3, 16, 32, 5, 3, 3, 2, (2, 2, 0, 1), 1, 1),
    (2, 16, 40, 9, 12, 3, (3, 1), (1, 0, 2, 1), (2, 1), 1),
    (2, 32, 80, 6, 8, 3, 2, 2, 1, 2),
    (1, 24, 32, 40, 113, 3, 1, 1, 1, 1),
    (5, 64, 64, 10, 10, 3, 2, 2, 1, 1),
    (2, 16, 16, 11, 9, 5, (1, 2), 2, (1, 2), 1),
    (1, 16, 256, 12, 70, 3, 1, 1, 1, 1),
    (2, 16, 32, 8, 9, 3, (3, 2), (2, 0, 1, 0), 1, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", DIRECT_SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_direct_kernels(dtype, mode, shape):
    batch, c_in, c_out, height, width, kernel, stride, padding, dilation, groups = shape
    x = torch.randn(batch, c_in, height, width, dtype=dtype)
    w = torch.randn(c_out, c_in // groups, kernel, kernel, dtype=dtype)
    if not _HAS_AVX512F:
        pytest.skip("the direct CPU kernels need AVX-512")
    for which in ("forward", "grad_input", "grad_weight"):
        assert _cpu_path(which, x, w, stride, padding, dilation, groups, mode) == "direct", which
    _check(x, w, torch.randn(c_out, dtype=dtype), stride, padding, dilation, groups, mode)


# (forward, grad input, grad weight) where one condition fails. At stride 1 an
# input gradient the direct kernel does not take runs as the forward of the
# transposed convolution where that one is direct (its 32 / 16 outputs).
FOLDED = "transposed_forward_folded"


@pytest.mark.parametrize("c_in, c_out, size, stride, paths", [
    (3, 32, 12, 1, ("gemm", "gemm", "direct")),     # 27 terms per output; 3 input channels
    (32, 8, 12, 1, ("gemm", FOLDED, "gemm")),       # 8 output channels: half a float vector
    (32, 32, 12, 3, ("gemm", "direct", "gemm")),    # width stride 3 (grad input: any stride)
    (16, 16, 200, 1, ("direct", FOLDED, "direct")),  # grad input packs 2.6 MB per sample
])
def test_direct_kernels_where_they_apply(c_in, c_out, size, stride, paths):
    if not _HAS_AVX512F:
        paths = ("gemm", "gemm", "gemm")  # the direct kernels need AVX-512
    x = torch.randn(2, c_in, size, size)
    w = torch.randn(c_out, c_in, 3, 3)
    for which, path in zip(("forward", "grad_input", "grad_weight"), paths):
        assert _cpu_path(which, x, w, stride, 1, 1, 1, "reflect") == path, which
    _check(x, w, None, stride, 1, 1, 1, "reflect")


# The input gradient at stride 1 as the forward of the transposed convolution
# (flipped kernel, channel axes swapped): (batch, C_in, C_out, H, W, kernel,
# padding, dilation, groups). Every shape packs more than the direct input
# gradient's 1 MiB a sample. Zeros padding within the kernel's reach writes the
# gradient directly; the padded modes, and zeros padding beyond the reach
# (3 > 3 - 1), compute the padded input's gradient and fold its border back.
# Asymmetric padding, groups 2, dilation 2, a 5 x 5 kernel; in the padded modes
# 13 samples of 16 x 202 x 202 take two chunks of 32 MiB in float32 (12 + 1),
# three in float64 (6 + 6 + 1).
TRANSPOSED_SHAPES = [
    (2, 16, 24, 130, 130, 3, 1, 1, 1),
    (1, 32, 16, 90, 100, 3, (2, 0, 1, 2), 1, 2),
    (1, 16, 16, 126, 128, 3, 2, 2, 1),
    (1, 32, 32, 80, 100, 5, (3, 1), 1, 1),
    (1, 16, 16, 128, 128, 3, 3, 1, 1),
    (1, 16, 16, 128, 128, 3, (3, 0, 1, 1), 1, 1),
    (1, 16, 16, 120, 140, (3, 5), (1, 2), (1, 2), 1),
    (13, 16, 16, 200, 200, 3, 1, 1, 1),
]


def _reach_exceeded(kernel, padding, dilation):
    """Whether some side's zeros padding lies beyond dilation x (kernel - 1)."""
    (kh, kw), (dh, dw) = _pair(kernel), _pair(dilation)
    reach = [dh * (kh - 1)] * 2 + [dw * (kw - 1)] * 2
    return any(p > r for p, r in zip(_four_pads(padding), reach))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", TRANSPOSED_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_grad_input_as_transposed_forward(dtype, mode, shape):
    batch, c_in, c_out, height, width, kernel, padding, dilation, groups = shape
    kh, kw = _pair(kernel)
    x = torch.randn(batch, c_in, height, width, dtype=dtype)
    w = torch.randn(c_out, c_in // groups, kh, kw, dtype=dtype)
    if not _HAS_AVX512F:
        pytest.skip("the direct CPU kernels need AVX-512")
    folded = mode != "zeros" or _reach_exceeded(kernel, padding, dilation)
    want = FOLDED if folded else "transposed_forward"
    assert _cpu_path("grad_input", x, w, 1, padding, dilation, groups, mode) == want
    _check(x, w, None, 1, padding, dilation, groups, mode)


@pytest.mark.parametrize("mode", MODES)
def test_grad_input_fold_at_the_padding_limits(mode):
    """Padding as wide as the op allows (reflect: size - 1, else: size) on a
    12 x 12 plane of 256 channels (the packed gradient passes 1 MiB): every
    border position folds into an interior one, some of them through the
    other border's range. Also in channels_last, and unpadded on a larger
    plane (nothing to fold, so every mode writes the gradient directly)."""
    if not _HAS_AVX512F:
        pytest.skip("the direct CPU kernels need AVX-512")
    pad = 11 if mode == "reflect" else 12
    x = torch.randn(2, 256, 12, 12, dtype=torch.float64)
    w = torch.randn(16, 256, 3, 3, dtype=torch.float64)
    assert _cpu_path("grad_input", x, w, 1, pad, 1, 1, mode) == FOLDED
    _check(x, w, None, 1, pad, 1, 1, mode)
    _check(x.to(memory_format=torch.channels_last), w, None, 1, (pad, 3), 1, 1, mode)
    x, w = torch.randn(1, 16, 140, 140, dtype=torch.float64), w[:, :16]
    assert _cpu_path("grad_input", x, w, 1, 0, 1, 1, mode) == "transposed_forward"
    _check(x, w, None, 1, 0, 1, 1, mode)


def test_direct_forward_packs_rows_not_a_padded_copy():
    # Per thread one block of packed rows (~256 KiB) and its products: the
    # padded copy of this input would be 21 MB, the output is 5 MB.
    x = torch.randn(16, 32, 96, 96)
    w = torch.randn(32, 32, 3, 3)
    args = (None, 2, 3, 1, 1, "reflect")
    if _cpu_path("forward", x, w, 2, 3, 1, 1, "reflect") != "direct":
        pytest.skip("the direct CPU forward needs AVX-512")
    torch.testing.assert_close(pyattn.padded_conv2d(x, w, *args),
                               reference.padded_conv2d(x, w, *args), rtol=1e-4, atol=1e-4)
    padded_bytes = 16 * 32 * 102 * 102 * 4
    ours = peak_memory(lambda: pyattn.padded_conv2d(x, w, *args))
    theirs = peak_memory(lambda: reference.padded_conv2d(x, w, *args))
    assert ours < padded_bytes / 2 < theirs, (ours, padded_bytes, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_weight_with_many_output_channels(dtype):
    # The CPU weight-gradient kernel holds up to 64 float (32 double) output
    # channels in registers at a time: 70 channels take two passes, the last
    # one partial, and 13 input rows end in a partial block of rows.
    x = torch.randn(5, 13, 9, 9, dtype=dtype)
    w = torch.randn(70, 13, 1, 1, dtype=dtype)
    _check(x, w, None, 1, 1, 1, 1, "reflect")


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: pyattn.padded_conv2d(x, w, b, (1, 2), (2, 1), (1, 2), 2, mode), (x, w, b))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels", [(4, 6), (32, 32)], ids=["gemm", "direct"])
def test_opcheck(mode, channels):
    # 4 -> 6 channels take im2col + GEMM, 32 -> 32 the direct kernels (on AVX-512).
    c_in, c_out = channels
    x = torch.randn(2, c_in, 7, 8, requires_grad=True)
    w = torch.randn(c_out, c_in // 2, 3, 3, requires_grad=True)
    b = torch.randn(c_out, requires_grad=True)
    conv_args = ([2, 1], [2, 1, 0, 2], [1, 2], 2, mode)
    torch.library.opcheck(torch.ops.pyattn.padded_conv2d, (x, w, b, *conv_args))
    torch.library.opcheck(torch.ops.pyattn.padded_conv2d, (x, w, None, *conv_args))
    grad = torch.randn_like(torch.ops.pyattn.padded_conv2d(x, w, b, *conv_args))
    grad_args = (grad, x.detach(), w.detach(), *conv_args)
    torch.library.opcheck(torch.ops.pyattn.padded_conv2d_grad_input, grad_args)
    torch.library.opcheck(torch.ops.pyattn.padded_conv2d_grad_weight, grad_args)


def _assert_bitwise_same_across_thread_counts(grad_input, grad_weight):
    """The forward and gradient ops give bitwise equal results at 1, 2 and 3
    threads (fixed counts: relative to the current count this could not fail
    on one thread), and again at 2 and 1 after 3: MKL's GEMM, which the weight
    gradient used before, changed its sums after a 3-thread call."""
    # Batch 70: 32 grad-weight blocks of 2-3 samples; the forward and grad
    # input put 3 (stride 1) or 8 (stride 2) samples in one GEMM. Then Net1's
    # first layer (3 -> 32 channels, 32 x 32, padding 2, batch 200), whose
    # weight gradient through MKL differed between 1 and 2 threads; last a
    # layer whose forward takes the direct kernel (where AVX-512 is present),
    # and one whose input gradient is the transposed convolution's direct
    # forward, folded (16 x 132 x 132 floats per sample: over the direct
    # input gradient's 1 MiB).
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(70, 8, 15, 15, generator=gen), torch.randn(8, 8, 3, 3, generator=gen)
    net1 = torch.randn(200, 3, 32, 32, generator=gen), torch.randn(32, 3, 3, 3, generator=gen)
    direct = torch.randn(9, 32, 20, 20, generator=gen), torch.randn(32, 32, 3, 3, generator=gen)
    transposed = torch.randn(3, 16, 130, 130, generator=gen), torch.randn(16, 16, 3, 3,
                                                                           generator=gen)
    threads = torch.get_num_threads()
    if _HAS_AVX512F:  # else the direct kernels, this route included, do not run
        assert _cpu_path("grad_input", *transposed, 1, 1, 1, 1, "circular") == FOLDED
    for (x, w), stride, pad in [(small, 1, 1), (small, 2, 1), (net1, 1, 2), (direct, 2, 2),
                                (transposed, 1, 1)]:
        args = ([stride, stride], [pad] * 4, [1, 1], 1, "circular")
        grad = torch.randn(torch.ops.pyattn.padded_conv2d(x, w, None, *args).shape, generator=gen)
        results = []
        try:
            for n in (1, 2, 3, 2, 1):
                torch.set_num_threads(n)
                results.append([grad_weight(grad, x, w, *args), grad_input(grad, x, w, *args),
                                torch.ops.pyattn.padded_conv2d(x, w, None, *args)])
        finally:
            torch.set_num_threads(threads)
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b), "result depends on the thread count"


def test_deterministic_backward_across_thread_counts():
    _assert_bitwise_same_across_thread_counts(torch.ops.pyattn.padded_conv2d_grad_input,
                                              torch.ops.pyattn.padded_conv2d_grad_weight)


def test_determinism_check_fails_on_a_thread_dependent_grad_weight():
    def thread_dependent(*args):  # a deliberately broken kernel
        out = torch.ops.pyattn.padded_conv2d_grad_weight(*args)
        return out + 1e-6 * torch.get_num_threads()
    with pytest.raises(AssertionError, match="depends on the thread count"):
        _assert_bitwise_same_across_thread_counts(torch.ops.pyattn.padded_conv2d_grad_input,
                                                  thread_dependent)


@pytest.mark.parametrize("mode", MODES)
def test_module_matches_nn_conv2d_and_state_dicts_load_both_ways(mode):
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2,
                  dilation=1, groups=2, bias=True, padding_mode=mode)
    ours = pyattn.nn.PaddedConv2d(**kwargs)
    theirs = nn.Conv2d(**kwargs)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in theirs.state_dict().items()]
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 9, 10)
    torch.testing.assert_close(ours(x), theirs(x))
    fresh = pyattn.nn.PaddedConv2d(**kwargs)
    fresh.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh(x), theirs(x))


def test_module_init_matches_nn_conv2d():
    torch.manual_seed(3)
    ours = pyattn.nn.PaddedConv2d(8, 16, 3, padding_mode="circular")
    torch.manual_seed(3)
    theirs = nn.Conv2d(8, 16, 3, padding_mode="circular")
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def _net1(mode, pad):
    def conv(c_in, c_out, stride=1):
        return pyattn.nn.PaddedConv2d(c_in, c_out, 3, stride, pad, bias=False, padding_mode=mode)
    return nn.Sequential(conv(3, 8), nn.ReLU(), conv(8, 8), nn.ReLU(), conv(8, 16), nn.ReLU(),
                         conv(16, 16, 2), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(16, 2))


def test_compile_fullgraph_net1():
    net = _net1("reflect", 2)
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(net, fullgraph=True)
    grad = torch.randn(4, 2)
    eager_out = net(x)
    eager_grads = torch.autograd.grad(eager_out, list(net.parameters()), grad)
    out = compiled(x)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(out, list(net.parameters()), grad), eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call, error, match", [
    (lambda: pyattn.padded_conv2d(torch.randn(8, 8), torch.randn(4, 3, 3, 3)),
     ValueError, "`input` to be a 4-D"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 2, 3, 8, 8), torch.randn(4, 3, 3, 3)),
     ValueError, "`input` to be a 4-D"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3)),
     ValueError, "`weight` to be a 4-D"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3).double()),
     TypeError, "same dtype"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8).half(), torch.randn(4, 3, 3, 3).half()),
     TypeError, "not supported on CPU"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3)),
     ValueError, "expects 2 input channels"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 1, 3, 3), groups=2),
     ValueError, "divisible by `groups`"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), padding=-1),
     ValueError, "`padding` must be >= 0"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), stride=0),
     ValueError, "`stride` must be >= 1"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), padding=8,
                                  padding_mode="reflect"),
     ValueError, "reflect `padding` must be smaller than the input height"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 4), torch.randn(4, 3, 3, 3), padding=5,
                                  padding_mode="circular"),
     ValueError, "circular `padding` must be at most"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 0, 8), torch.randn(4, 3, 3, 3)),
     ValueError, "`input` must have non-empty height and width"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3)),
     ValueError, "smaller than the dilated kernel"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3),
                                  bias=torch.randn(3)),
     ValueError, "`bias` must have shape"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3),
                                  padding_mode="mirror"),
     ValueError, "`padding_mode` must be one of"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), stride=(1, 2, 3)),
     TypeError, "`stride` must be an int or a pair"),
    (lambda: pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), stride=2,
                                  padding="same"),
     ValueError, "needs stride 1"),
    (lambda: torch.ops.pyattn.padded_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None,
                                            [1, 1], [1, 1], [1, 1], 1, "zeros"),
     ValueError, "`padding` must have 4 values"),
    (lambda: torch.ops.pyattn.padded_conv2d_grad_input(
        torch.randn(1, 4, 5, 5), torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3),
        [1, 1], [1, 1, 1, 1], [1, 1], 1, "zeros"),
     ValueError, "`grad_output` must have shape"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _assert_within_twice_torch_error(conv, device, dtype, mode):
    """Forward and the input / weight / bias gradients (random upstream
    gradient) of `conv` in `dtype`: error against a float64 reference within 2x
    (+ a floor) of PyTorch's own conv in the same dtype."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 21, 19, generator=gen, dtype=torch.float64).to(device)
    w = (torch.randn(12, 4, 3, 3, generator=gen, dtype=torch.float64) / 6).to(device)
    b = torch.randn(12, generator=gen, dtype=torch.float64).to(device)
    args = ((2, 1), 2, (1, 2), 2, mode)
    grad = None
    results = []
    for fn, dt in ((conv, dtype), (reference.padded_conv2d, dtype),
                   (reference.padded_conv2d, torch.float64)):
        leaves = [t.to(dt).requires_grad_() for t in (x, w, b)]
        out = fn(*leaves, *args)
        if grad is None:
            grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
        results.append([out.double(), *(g.double() for g in
                                         torch.autograd.grad(out, leaves, grad.to(dt)))])
    for name, ours, theirs, exact in zip(["output", "grad input", "grad weight", "grad bias"],
                                         *results):
        scale = exact.abs().max().item()
        err_ours = (ours - exact).abs().max().item() / scale
        err_torch = (theirs - exact).abs().max().item() / scale
        assert err_ours <= 2 * err_torch + 1e-6, f"{name}: error {err_ours} vs torch {err_torch}"


class _PermutedGradOutput(torch.autograd.Function):
    """pyattn's conv whose backward reads grad_output mirrored along W: a
    deliberately broken kernel that an all-ones upstream gradient cannot see."""
    @staticmethod
    def forward(ctx, x, w, b, *args):
        ctx.save_for_backward(x, w)
        ctx.conv_args = args
        return pyattn.padded_conv2d(x, w, b, *args)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        with torch.enable_grad():
            xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
            out = pyattn.padded_conv2d(xs, ws, None, *ctx.conv_args)
            gx, gw = torch.autograd.grad(out, (xs, ws), grad.flip(-1))
        return (gx, gw, grad.flip(-1).sum((0, 2, 3))) + (None,) * len(ctx.conv_args)


@pytest.mark.parametrize("broken", ["output_x_1.01", "permuted_grad_output"])
def test_accuracy_check_fails_on_a_wrong_kernel(broken):
    # The check of the CUDA tests, run on CPU in float32: it passes pyattn and
    # must fail on each deliberately wrong copy.
    _assert_within_twice_torch_error(pyattn.padded_conv2d, "cpu", torch.float32, "reflect")
    wrong = {"output_x_1.01": lambda *a: pyattn.padded_conv2d(*a) * 1.01,
             "permuted_grad_output": _PermutedGradOutput.apply}[broken]
    with pytest.raises(AssertionError, match="error"):
        _assert_within_twice_torch_error(wrong, "cpu", torch.float32, "reflect")


@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matches_reference(mode, dtype):
    _assert_within_twice_torch_error(pyattn.padded_conv2d, "cuda", dtype, mode)


@requires_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_float64_grid_and_gradcheck(mode):
    for padding, stride, dilation, kernel in itertools.product([0, 1, (3, 2)], [1, 2], [1, 2], [1, 3, 5]):
        x = torch.randn(2, 4, 11, 13, dtype=torch.float64, device="cuda")
        w = torch.randn(6, 2, kernel, kernel, dtype=torch.float64, device="cuda")
        _check(x, w, torch.randn(6, dtype=torch.float64, device="cuda"), stride, padding,
               dilation, 2, mode)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: pyattn.padded_conv2d(x, w, None, 1, 2, 1, 1, mode), (x, w))
    torch.library.opcheck(torch.ops.pyattn.padded_conv2d,
                          (x, w, None, [1, 1], [2, 2, 2, 2], [1, 1], 1, mode))


@requires_cuda
def test_cuda_compile_and_device_errors():
    net = _net1("circular", 2).cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="same device"):
        pyattn.padded_conv2d(x, torch.randn(4, 3, 3, 3))

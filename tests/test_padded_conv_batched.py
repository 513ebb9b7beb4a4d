"""The batched path of padded_conv2d (what the CUDA backend runs), checked on CPU.

``pyattn::padded_conv2d_batched_cpu_twin`` runs the CUDA driver (chunks of
samples, one batched GEMM over the groups per chunk, group-major columns) with
host loops over the very per-element functions the CUDA kernels call
(``BatchedColumns`` in csrc/include/pyattn/conv_geometry.h: 32-bit indices with
multiply-shift divisors). ``pyattn::padded_conv2d_launch_plan`` is the launch
list the driver takes its chunk size from: [chunk, chunks, launches, GEMMs].
"""
import pytest
import torch

from pyattn import reference

MODES = ["zeros", "reflect", "replicate", "circular"]
twin = torch.ops.pyattn.padded_conv2d_batched_cpu_twin
plan = torch.ops.pyattn.padded_conv2d_launch_plan


def _twin_matches_reference(x, w, b, stride, padding, dilation, groups, mode, tol):
    args = (list(stride), list(padding), list(dilation), groups, mode)
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    ref = reference.padded_conv2d(xr, wr, br, *args)
    grad = torch.randn(ref.shape, dtype=x.dtype)
    ref_gx, ref_gw = torch.autograd.grad(ref, (xr, wr), grad.double())
    got = [twin("forward", None, x, w, b, *args), twin("grad_input", grad, x, w, None, *args),
           twin("grad_weight", grad, x, w, None, *args)]
    for name, g, r in zip(["forward", "grad input", "grad weight"], got, [ref, ref_gx, ref_gw]):
        scale = max(r.abs().max().item(), 1.0)
        torch.testing.assert_close(g.double(), r.detach(), rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", [
    ((1, 1), (1, 1, 1, 1), (1, 1), 1, (3, 3)),
    ((2, 1), (2, 1, 0, 2), (1, 2), 2, (3, 2)),
    ((3, 2), (0, 2, 1, 1), (2, 1), 4, (1, 3)),
], ids=["plain", "strided_dilated_grouped", "groups4"])
def test_twin_matches_reference_float64(mode, geometry):
    stride, padding, dilation, groups, kernel = geometry
    x = torch.randn(3, 8, 7, 9, dtype=torch.float64)
    w = torch.randn(8, 8 // groups, *kernel, dtype=torch.float64)
    _twin_matches_reference(x, w, torch.randn(8, dtype=torch.float64), stride, padding,
                            dilation, groups, mode, 1e-10)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 7, 7), (7, 5, 13, 11)])
def test_twin_odd_shapes_float32(shape):
    k = 3 if min(shape[2:]) >= 3 else 1
    x = torch.randn(shape)
    w = torch.randn(4, shape[1], k, k)
    _twin_matches_reference(x, w, torch.randn(4), (1, 1), (1, 1, 1, 1), (1, 1), 1, "circular",
                            3e-5)


def test_twin_several_chunks():
    # 4.7 MB of columns per sample against a 64 MiB workspace: chunks of 14 samples.
    x = torch.randn(15, 32, 64, 64)
    w = torch.randn(4, 32, 3, 3)
    assert plan("forward", x, w, True, [1, 1], [1, 1, 1, 1], [1, 1], 1, "reflect")[:2] == [14, 2]
    _twin_matches_reference(x, w, torch.randn(4), (1, 1), (1, 1, 1, 1), (1, 1), 1, "reflect", 3e-5)


def _gemm_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith(("aten::bmm", "aten::baddbmm")))


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("batch", [1, 9])
def test_gemm_calls_are_the_plan_and_do_not_grow_with_batch_or_groups(batch, groups):
    x = torch.randn(batch, 8, 9, 9)
    w = torch.randn(8, 8 // groups, 3, 3)
    grad = torch.randn(batch, 8, 9, 9)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], groups, "replicate")
    for which in ("forward", "grad_input", "grad_weight"):
        planned = plan(which, x, w, False, *args)
        assert planned[:2] == [batch, 1]  # one chunk
        assert planned[3] == 1  # one batched GEMM per chunk
        assert _gemm_calls(lambda: twin(which, grad, x, w, None, *args)) == planned[3]


# Net1 (strides 1, 2, 2, 2, padding 2) at batch 1 and 200, and the large layer.
NET1 = [(3, 32, 32, 1), (32, 32, 34, 2), (32, 64, 18, 2), (64, 64, 10, 2)]


@pytest.mark.parametrize("layer", NET1, ids=[f"conv{i + 1}" for i in range(4)])
@pytest.mark.parametrize("which", ["forward", "grad_input", "grad_weight"])
def test_launches_per_call_do_not_grow_with_batch(layer, which):
    c_in, c_out, size, stride = layer
    w = torch.empty(c_out, c_in, 3, 3, device="meta", dtype=torch.bfloat16)
    args = ([stride, stride], [2, 2, 2, 2], [1, 1], 1, "reflect")
    fixed = {"forward": 1, "grad_input": 0, "grad_weight": 2}[which]  # bias add / zero + round
    for batch in (1, 200):
        x = torch.empty(batch, c_in, size, size, device="meta", dtype=torch.bfloat16)
        chunk, chunks, launches, gemms = plan(which, x, w, True, *args)
        # at most two 64 MiB workspace chunks for a whole Net1 batch (fp32 grad-input columns)
        assert chunks == -(-batch // chunk) <= 2 and gemms == chunks
        assert launches == fixed + 3 * chunks, (batch, launches)


def test_launches_grow_only_per_workspace_chunk():
    # The large layer (64 -> 64, 128 x 128): 9.4 MB of bf16 columns per sample.
    w = torch.empty(64, 64, 3, 3, device="meta", dtype=torch.bfloat16)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1, "circular")
    for which, fixed in (("forward", 0), ("grad_input", 0), ("grad_weight", 2)):
        for batch in (1, 16, 64):
            x = torch.empty(batch, 64, 128, 128, device="meta", dtype=torch.bfloat16)
            chunk, chunks, launches, gemms = plan(which, x, w, False, *args)
            assert chunks == -(-batch // chunk) and gemms == chunks
            assert launches == fixed + 3 * chunks, (which, batch, launches)

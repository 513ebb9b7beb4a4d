"""pyattn.flash_attention (cpp, triton) against float64 math attention."""
import itertools
import math

import pytest
import torch
from packaging.version import Version
import torch.nn as nn
import torch.nn.functional as F

import pyattn
from pyattn import reference
from pyattn.profiling import peak_memory

SEQLENS = [(1, 1), (7, 7), (113, 113), (128, 128), (203, 203), (1000, 1000),
           (7, 113), (113, 7), (203, 128), (1, 203), (128, 1000)]
HEAD_DIMS = [16, 32, 48, 64, 128]
HEADS = [(1, 1), (4, 2), (8, 1), (6, 6), (3, 3)]  # (heads, kv_heads)


def _inputs(batch, heads, kv_heads, seq_q, seq_k, dim, dtype, device="cpu"):
    q = torch.randn(batch, heads, seq_q, dim, dtype=dtype, device=device)
    k = torch.randn(batch, kv_heads, seq_k, dim, dtype=dtype, device=device)
    v = torch.randn(batch, kv_heads, seq_k, dim, dtype=dtype, device=device)
    return q, k, v


def _run(fn, q, k, v, grad, **kwargs):
    """Forward, lse and (dq, dk, dv) of fn, in float64 for comparison."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    return [t.double() for t in (out, lse, dq, dk, dv)]


def _reference(q, k, v, causal, scale=None):
    return reference.attention(q, k, v, causal, scale)


def _check_against_reference(q, k, v, causal, backend, low_precision_ref=None):
    """Compare with float64 math attention. float64 inputs: tight. Others: the
    error must stay within 2x (+ a small floor) of PyTorch's own math attention
    run in the same dtype (FlashAttention's rule)."""
    grad = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    ours = _run(lambda *a, **kw: pyattn.flash_attention(*a, **kw, return_lse=True, backend=backend),
                q, k, v, grad, causal=causal)
    exact = _run(_reference, q.double(), k.double(), v.double(), grad, causal=causal)
    names = ["out", "lse", "dq", "dk", "dv"]
    if q.dtype == torch.float64:
        for name, a, b in zip(names, ours, exact):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
        return
    low = _run(_math_attention_low, q, k, v, grad, causal=causal)
    for name, a, lo, b in zip(names, ours, low, exact):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: non-finite pattern differs"
        err = (a - b)[finite].abs().max().item() if finite.any() else 0.0
        err_low = (lo - b)[finite].abs().max().item() if finite.any() else 0.0
        scale = b[finite].abs().max().item() if finite.any() else 1.0
        assert err <= 2 * err_low + 1e-5 * max(scale, 1.0), (name, err, err_low, scale)


def _math_attention_low(q, k, v, causal):
    """PyTorch math attention in the inputs' own dtype (the error baseline)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, 1)
    v = v.repeat_interleave(heads // kv_heads, 1)
    seq_q, seq_k = q.shape[2], k.shape[2]
    mask = None
    if causal:
        rows = torch.arange(seq_q, device=q.device)[:, None]
        cols = torch.arange(seq_k, device=q.device)[None, :]
        mask = cols <= rows + (seq_k - seq_q)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float(), -1)
    probs = torch.softmax(scores.float(), -1).nan_to_num(0.0).to(q.dtype)
    return probs @ v, lse


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
def test_cpp_against_reference(seqlens, causal, dtype):
    i = SEQLENS.index(seqlens)
    heads, kv_heads = HEADS[i % len(HEADS)]
    dim = HEAD_DIMS[i % len(HEAD_DIMS)]
    batch = 1 + i % 3
    if seqlens[0] * seqlens[1] >= 10 ** 6:
        batch, heads, kv_heads = 1, 2, 1
    q, k, v = _inputs(batch, heads, kv_heads, *seqlens, dim, dtype)
    _check_against_reference(q, k, v, causal, "cpp")


# FlashAttention-2's float32 rule against PyTorch's own kernel: errors vs float64
# math attention within 2x (plus a floor at float32 resolution) of SDPA's.
FA2_GRID = [(97, 97), (113, 203), (200, 200), (1, 239), (239, 1), (128, 217)]


def _sdpa_error_ratio_check(seq_q, seq_k, dim, causal):
    q, k, v = _inputs(1, 2, 2, seq_q, seq_k, dim, torch.float32)
    grad = torch.randn(q.shape, dtype=torch.float64)

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        return [out, *torch.autograd.grad(out, inputs, grad.to(dtype))]
    exact = run(lambda q, k, v: reference.attention(q, k, v, causal)[0], torch.float64)
    ours = run(lambda q, k, v: pyattn.flash_attention(q, k, v, causal=causal), torch.float32)
    sdpa = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
               torch.float32)
    for name, a, s, e in zip(["out", "dq", "dk", "dv"], ours, sdpa, exact):
        err, err_sdpa = (a.double() - e).abs().max().item(), (s.double() - e).abs().max().item()
        assert err <= 2 * err_sdpa + 1e-6 * max(e.abs().max().item(), 1.0), (name, err, err_sdpa)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", FA2_GRID, ids=[f"{a}x{b}" for a, b in FA2_GRID])
def test_cpp_float32_error_within_2x_of_sdpa(seqlens, causal, dim):
    if causal and seqlens[0] != seqlens[1]:
        pytest.skip("SDPA aligns causal masks top-left, pyattn bottom-right")
    _sdpa_error_ratio_check(*seqlens, dim, causal)


@pytest.mark.slow
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cpp_float32_error_within_2x_of_sdpa_long(causal, dim):
    _sdpa_error_ratio_check(1025, 1025, dim, causal)

@pytest.mark.parametrize("batch, heads, kv_heads", [(1, 4, 1), (2, 4, 2), (3, 6, 3), (8, 2, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpp_backward_both_schedules(batch, heads, kv_heads, causal):
    # batch * kv_heads < 8: two passes over finer tasks; >= 8: one fused pass.
    # 150 x 300: 2 x 3 backward tiles (128 x 128), 2 x 1 forward (128 x 512).
    q, k, v = _inputs(batch, heads, kv_heads, 150, 300, 32, torch.float64)
    _check_against_reference(q, k, v, causal, "cpp")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim", [8, 16, 32, 48, 64, 72, 80, 96, 128, 256])
def test_cpp_head_dims(dim, dtype):
    """Several key tiles; in float32 the backward's K and V tiles are transposed
    in 16 x 16 register blocks where the CPU has AVX-512, and head_dims that are
    not a multiple of 16 (8, 72) and the 700 - 640 = 60 keys of the last tile
    leave partial blocks."""
    q, k, v = _inputs(2, 4, 2, 37, 700, dim, dtype)
    _check_against_reference(q, k, v, True, "cpp")


# Float at head_dim 64 runs pyattn/gemm_avx512.h's loops on CPUs with AVX-512
# (BLAS elsewhere). After register tiles of 6 rows, query tiles of 9, 12, 100,
# 125, 128 and 4 rows leave 3, 0, 4, 5, 2 and 4, and the backward's key tiles
# of 9, 40, 113, 38 and 19 rows (its transposed products) leave 3, 4, 5, 2 and
# 1. The forward's last panels of keys are 9, 40, 49, 38 and 19 wide (1 to 4
# vectors, the last partial). Depth chunks of 64: the forward's P V over up to
# 512 keys, the backward's transposed products over 100 queries (64 + 36) and
# 128. One query: a decode forward (BLAS) and an own-loop backward. Both
# backward schedules (batch * kv_heads 4 and 8), and rows strided by a (batch,
# seq, heads, dim) layout.
@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "seq_major"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q, seq_k", [(9, 9), (12, 40), (100, 113), (125, 550), (132, 1043),
                                          (1, 64)])
def test_cpp_own_tile_products_at_head_dim_64(seq_q, seq_k, causal, layout, batch):
    q, k, v = _inputs(batch, 4, 2, seq_q, seq_k, 64, torch.float32)
    if layout == "seq_major":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    _check_against_reference(q, k, v, causal, "cpp")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seq_q, seq_k", [(1, 300), (1, 4500), (8, 2300), (9, 700), (129, 700)])
def test_cpp_single_query_tiles(dtype, seq_q, seq_k):
    """Few-query tiles: decode (up to 8 queries take tiles of 2048 keys: one,
    three, two of them here), 9 queries (the usual tiles), and the last tile of
    129 queries (tiles of 128), over several key tiles, with grouped heads and
    a head_dim that is not a multiple of 16."""
    q, k, v = _inputs(2, 4, 2, seq_q, seq_k, 72, dtype)
    for causal in (False, True):
        _check_against_reference(q, k, v, causal, "cpp")


@pytest.mark.parametrize("causal", [False, True])
def test_cpp_non_contiguous_inputs_and_grad(causal):
    # (batch, seq, heads, dim) transposed, and a head_dim stride that is not 1.
    q = torch.randn(2, 50, 4, 32, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(2, 2, 32, 61, dtype=torch.float64).transpose(2, 3)
    v = torch.randn(2, 61, 2, 32, dtype=torch.float64).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    grad = torch.randn(2, 4, 32, 50, dtype=torch.float64).transpose(2, 3)
    ours = _run(lambda *a, **kw: pyattn.flash_attention(*a, **kw, return_lse=True), q, k, v, grad,
                causal=causal)
    exact = _run(_reference, q, k, v, grad, causal=causal)
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rows", ["expanded", "overlapping", "single_row_stride_1"])
def test_cpp_rows_that_overlap_in_memory(rows):
    """Row strides below head_dim (a key broadcast along the sequence, rows of an
    as_strided view sharing elements, or one row with stride 1): BLAS refuses
    such a leading dimension (MKL printed an error and left the output zero,
    found by the fuzz); the kernel copies them first."""
    seq_k, dim = (1, 16) if rows == "single_row_stride_1" else (23, 16)
    if rows == "expanded":
        k = torch.randn(2, 2, 1, dim, dtype=torch.float64).expand(2, 2, seq_k, dim)
    else:
        stride = 1 if rows == "single_row_stride_1" else 3
        k = torch.randn(2 * 2 * (seq_k * stride + dim), dtype=torch.float64).as_strided(
            (2, 2, seq_k, dim), (2 * (seq_k * stride + dim), seq_k * stride + dim, stride, 1))
    v = k.flip(-1)
    q = torch.randn(2, 4, 9, dim, dtype=torch.float64)
    grad = torch.randn(2, 4, 9, dim, dtype=torch.float64)
    ours = _run(lambda *a, **kw: pyattn.flash_attention(*a, **kw, return_lse=True), q, k, v, grad,
                causal=True)
    exact = _run(_reference, q, k, v, grad, causal=True)
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_rows_without_visible_key_are_zero_not_nan():
    # seq_q > seq_k with causal alignment: the first 5 queries see no key.
    q, k, v = _inputs(1, 2, 2, 12, 7, 16, torch.float64)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = pyattn.flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :5], torch.zeros_like(q.grad[:, :, :5]))


def test_scale_and_sdpa_convention():
    q, k, v = _inputs(2, 3, 3, 33, 33, 24, torch.float64)
    for causal in (False, True):
        ours = pyattn.flash_attention(q, k, v, causal=causal, scale=0.3)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("causal", [False, True])
def test_cpp_gradcheck(causal):
    q, k, v = _inputs(1, 2, 1, 5, 7, 8, torch.float64)
    for t in (q, k, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v: pyattn.flash_attention(q, k, v, causal=causal), (q, k, v))


def test_cpp_opcheck():
    q, k, v = _inputs(2, 4, 2, 19, 23, 16, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    for causal, dropout_p in ((False, 0.0), (True, 0.0), (True, 0.2)):
        torch.library.opcheck(torch.ops.pyattn.flash_attention_forward,
                              (q, k, v, causal, 0.25, dropout_p, 12345))
        out, lse = torch.ops.pyattn.flash_attention_forward(q, k, v, causal, 0.25, dropout_p, 12345)
        torch.library.opcheck(torch.ops.pyattn.flash_attention_backward,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                               out.detach(), lse, causal, 0.25, dropout_p, 12345))


class _AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
        return pyattn.flash_attention(q, k, v, causal=True)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward scales the gradient: a deliberately wrong backward."""
    @staticmethod
    def forward(x, factor):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _assert_compiled_matches_eager(block, compiled, x):
    """Forward and every parameter's gradient of the compiled module equal eager's."""
    grad = torch.randn(2, 2, 21, 16)
    grads = []
    for fn in (block, compiled):
        block.zero_grad()
        out = fn(x)
        out.backward(grad)
        grads.append([out.detach()] + [p.grad.clone() for p in block.parameters()])
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def test_cpp_compile_fullgraph_module_matches_eager():
    torch.manual_seed(0)
    block, x = _AttentionBlock(), torch.randn(2, 21, 32)
    _assert_compiled_matches_eager(block, torch.compile(block, fullgraph=True), x)


def test_compiled_check_catches_a_wrong_backward():
    # The check above fails when the compiled module's backward is 1% off.
    torch.manual_seed(0)
    block, x = _AttentionBlock(), torch.randn(2, 21, 32)
    wrong = torch.compile(lambda x: _ScaleGrad.apply(block(x), 1.01), fullgraph=True)
    with pytest.raises(AssertionError):
        _assert_compiled_matches_eager(block, wrong, x)


THREAD_COUNTS = (1, 2, 3, 1)  # fixed: the check must not depend on the machine's default


def _assert_same_on_every_thread_count(fn):
    """fn() -> tensors; bitwise equal results for each thread count in THREAD_COUNTS."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in THREAD_COUNTS:
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(threads)
    for n, other in zip(THREAD_COUNTS[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], other)):
            assert torch.equal(a, b), f"result {i} differs between 1 and {n} threads"


@pytest.mark.parametrize("batch, heads, kv_heads", [(2, 4, 2), (8, 2, 1)])  # both backward schedules
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
# 32 and 128: MKL (whose blocking at 128 depended on the thread count); 64: the
# own AVX-512 loops in float (pyattn/gemm_avx512.h).
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_cpp_is_deterministic_across_thread_counts(batch, heads, kv_heads, dropout_p, dim):
    q, k, v = _inputs(batch, heads, kv_heads, 150, 170, dim, torch.float32)
    grad = torch.randn_like(q)
    _assert_same_on_every_thread_count(lambda: _run(
        lambda *a, **kw: pyattn.flash_attention(
            *a, **kw, dropout_p=dropout_p, generator=torch.Generator().manual_seed(7),
            return_lse=True),
        q, k, v, grad, causal=True))


def test_thread_count_check_catches_a_thread_dependent_kernel():
    q, k, v = _inputs(1, 2, 1, 70, 70, 16, torch.float32)

    def thread_dependent():  # a reduction whose result depends on the thread count
        return [pyattn.flash_attention(q, k, v) * (1 + 1e-7 * torch.get_num_threads())]
    with pytest.raises(AssertionError, match="differs between 1 and 2 threads"):
        _assert_same_on_every_thread_count(thread_dependent)


def test_cpp_memory_is_linear_in_seq():
    seq, dim = 8192, 64
    q, k, v = _inputs(1, 1, 1, seq, seq, dim, torch.float32)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    grad = torch.randn_like(q)

    def forward_backward():
        out = pyattn.flash_attention(q, k, v, causal=True)
        out.backward(grad)
        return out

    forward_backward()
    peak = peak_memory(forward_backward)
    square = seq * seq * 4
    # out, lse, delta, dq, dk, dv and per-thread tiles: ~10 MB, against 268 MB.
    assert peak < square / 8, (peak, square)


def test_reference_check_catches_a_wrong_kernel(monkeypatch):
    # _check_against_reference fails on an output 1% off (float64 and float32).
    real = pyattn.flash_attention

    def off_by_one_percent(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.01, lse
    monkeypatch.setattr(pyattn, "flash_attention", off_by_one_percent)
    for dtype in (torch.float64, torch.float32):
        q, k, v = _inputs(1, 2, 1, 37, 37, 16, dtype)
        with pytest.raises(AssertionError):
            _check_against_reference(q, k, v, True, "cpp")


# ------------------------------------------------ NaN / Inf and masked positions

def _check_against_visible_only(q, k, v, causal, grad=None):
    """Forward and gradients equal math attention computed over visible keys only
    (NaN where it has NaN, Inf where it has Inf)."""
    grad = torch.randn(q.shape, dtype=q.dtype) if grad is None else grad
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = pyattn.flash_attention(q, k, v, causal=causal)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    want_out = reference.attention_visible_only(q, k, v, causal)
    want = [want_out, *torch.autograd.grad(want_out, (q, k, v), grad)]
    tol = 1e-9 if q.dtype == torch.float64 else 2e-5
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")


# (tensor, position along seq, value) at seq 600, which spans 5 x 2 forward tiles
# (128 queries x 512 keys) and 5 x 5 backward tiles (128 x 128): the masked
# positions sit in tiles that straddle the causal diagonal, and the tiles of
# later keys are skipped for earlier queries.
SEQ = 600
POISON = [("v", 266, "nan"), ("v", 30, "inf"), ("k", 140, "nan"), ("k", 266, "-inf"),
          ("q", 10, "nan"), ("q", 265, "inf"), ("v", 0, "nan"), ("k", 299, "inf"),
          ("k", 560, "nan"), ("v", 590, "inf")]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name, pos, value", POISON, ids=[f"{n}{p}{v}" for n, p, v in POISON])
def test_cpp_nan_inf_match_visible_only_reference(name, pos, value, causal):
    dtype = (torch.float64, torch.float32)[POISON.index((name, pos, value)) % 2]
    tensors = dict(zip("qkv", _inputs(1, 2, 1, SEQ, SEQ, 16, dtype)))
    tensors[name][:, :, pos, 3] = float(value)
    _check_against_visible_only(tensors["q"], tensors["k"], tensors["v"], causal)


# 300 queries x 700 keys: the causal diagonal is offset by 400, so tiles hold
# rows that see no key of the tile (forward: queries 0-111 in keys 512-699;
# backward: queries 0-111 in keys 512-639, 128-239 in keys 640-699) next to
# rows that see some; a NaN / Inf there must stay out of those rows.
RECTANGULAR_POISON = [("v", 520, "nan"), ("k", 530, "inf"), ("v", 450, "-inf"), ("k", 640, "nan"),
                      ("v", 690, "nan")]


@pytest.mark.parametrize("name, pos, value", RECTANGULAR_POISON,
                         ids=[f"{n}{p}{v}" for n, p, v in RECTANGULAR_POISON])
def test_cpp_nan_inf_in_tiles_with_fully_masked_rows(name, pos, value):
    dtype = (torch.float64, torch.float32)[RECTANGULAR_POISON.index((name, pos, value)) % 2]
    tensors = dict(zip("qkv", _inputs(1, 2, 1, 300, 700, 16, dtype)))
    tensors[name][:, :, pos, 3] = float(value)
    _check_against_visible_only(tensors["q"], tensors["k"], tensors["v"], True)


def test_cpp_future_nan_does_not_leak_into_earlier_rows():
    q, k, v = _inputs(1, 1, 1, SEQ, SEQ, 16, torch.float32)
    v[:, :, 266] = float("nan")
    k[:, :, 267] = float("nan")
    out = pyattn.flash_attention(q, k, v, causal=True)
    assert torch.isfinite(out[:, :, :266]).all() and torch.isnan(out[:, :, 266:]).all()
    q[:, :, 5] = float("nan")  # a NaN query gives a NaN row, as PyTorch's math attention
    out = pyattn.flash_attention(q, k, v, causal=True)
    assert torch.isnan(out[:, :, 5]).all() and torch.isfinite(out[:, :, 6:266]).all()


def test_cpp_nan_in_upstream_gradient_stays_in_its_rows():
    q, k, v = _inputs(1, 2, 1, SEQ, SEQ, 16, torch.float64)
    grad = torch.randn(q.shape, dtype=torch.float64)
    grad[:, :, 140, 1] = float("nan")  # reaches keys 0..140 only
    _check_against_visible_only(q, k, v, True, grad)


def test_visible_only_check_catches_a_leaking_kernel(monkeypatch):
    # The plain GEMM over a whole diagonal tile (0 * NaN) fails the check.
    q, k, v = _inputs(1, 2, 1, SEQ, SEQ, 16, torch.float64)
    v[:, :, 266, 3] = float("nan")
    leaking = lambda q, k, v, causal: reference.attention(q, k, v, causal)[0]
    monkeypatch.setattr(pyattn, "flash_attention", leaking)
    with pytest.raises(AssertionError):
        _check_against_visible_only(q, k, v, True)


# ----------------------------------------------------- empty and degenerate shapes

EMPTY = [((0, 2, 5), (2, 5)), ((1, 0, 5), (0, 5)), ((2, 2, 0), (1, 5)), ((2, 2, 5), (1, 0)),
         ((1, 2, 0), (2, 0))]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_shape, kv_shape", EMPTY, ids=[str(e) for e in EMPTY])
def test_cpp_empty_shapes_match_sdpa(q_shape, kv_shape, causal):
    q = torch.randn(*q_shape, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(q_shape[0], *kv_shape, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(q_shape[0], *kv_shape, 16, dtype=torch.float64, requires_grad=True)
    out, lse = pyattn.flash_attention(q, k, v, causal=causal, return_lse=True)
    # what SDPA returns in torch >= 2.13: empty, or zeros when there is no key;
    # torch 2.11's CPU SDPA dies with SIGFPE on some of these shapes (make rehearsal)
    want = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    if Version(torch.__version__.split("+")[0]) >= Version("2.13"):
        heads = q.shape[1] // max(k.shape[1], 1)
        sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(heads, 1),
                                              v.repeat_interleave(heads, 1))
        assert torch.equal(sdpa, want)
    assert out.shape == want.shape and lse.shape == q.shape[:3]
    assert torch.equal(out, want) and torch.isneginf(lse).all() == (k.shape[2] == 0 or lse.numel() == 0)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out), allow_unused=True)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))


# ------------------------------------------- what autograd cannot do: clear errors

def test_cpp_double_backward_raises_naming_the_op():
    q, k, v = _inputs(1, 1, 1, 3, 3, 8, torch.float64)
    for t in (q, k, v):
        t.requires_grad_()
    out = pyattn.flash_attention(q, k, v, causal=True)
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported.*flash_attention_backward"):
        torch.autograd.grad(dq.sum(), (q, k, v))
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.gradgradcheck(lambda q, k, v: pyattn.flash_attention(q, k, v), (q, k, v))


def test_cpp_forward_mode_ad_raises():
    q, k, v = _inputs(1, 2, 1, 9, 9, 8, torch.float64)
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda q: pyattn.flash_attention(q, k, v), (q,), (torch.randn_like(q),))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        pyattn.flash_attention(q, fwAD.make_dual(k, torch.randn_like(k)), v)


@pytest.mark.parametrize("op", ["flash_attention_forward", "flash_attention_triton_forward"])
def test_forward_mode_ad_raises_at_the_raw_op_and_under_compile(op):
    """Not only the Python wrapper: the op itself (its Autograd kernel) refuses a
    tangent, so raw torch.ops calls and compiled graphs never return an output
    without one (torch.func.jvp used to report zeros)."""
    import torch.autograd.forward_ad as fwAD
    q, k, v = _inputs(1, 2, 1, 9, 9, 8, torch.float32)
    raw = getattr(torch.ops.pyattn, op)
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda q: raw(q, k, v, True, 0.5, 0.0, 0)[0], (q,), (torch.randn_like(q),))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        raw(q, k, fwAD.make_dual(v, torch.randn_like(v)), False, 0.5, 0.0, 0)
    if op != "flash_attention_forward":
        return  # compiling the triton backend needs a GPU (the interpreter runs on fake tensors)
    compiled = torch.compile(lambda q: pyattn.flash_attention(q, k, v), fullgraph=True)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        compiled(fwAD.make_dual(q, torch.randn_like(q)))


# ------------------------------------------------------------------------ dropout

def _dropout_keep_from_output(seed, p, batch, heads, seq_q, seq_k):
    """The kernel's keep mask, read off its output: with q = 0 every probability
    is 1 / seq_k, so with v = I the output is keep / (seq_k (1 - p))."""
    q = torch.zeros(batch, heads, seq_q, seq_k, dtype=torch.float64)
    v = torch.eye(seq_k, dtype=torch.float64).expand(batch, heads, seq_k, seq_k)
    out, _ = torch.ops.pyattn.flash_attention_forward(q, q[:, :, :seq_k], v, False, 1.0, p, seed)
    scaled = out * seq_k * (1 - p)
    keep = scaled.round()
    assert torch.allclose(scaled, keep) and ((keep == 0) | (keep == 1)).all()
    return keep.bool()


def test_dropout_mask_is_the_reference_philox_mask_at_the_right_rate():
    p, shape = 0.3, (2, 3, 200, 128)
    keep = _dropout_keep_from_output(2 ** 61 + 12345, p, *shape)
    assert torch.equal(keep, reference.flash_dropout_keep(2 ** 61 + 12345, p, *shape))
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate
    # no structure along rows, columns or heads: each slice keeps about 1 - p
    for dims, count in (((0, 1, 3), shape[2]), ((0, 1, 2), shape[3]), ((2, 3), 6)):
        rates = keep.double().mean(dims).flatten()
        m = n // count
        assert (rates - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / m), dims
    other = _dropout_keep_from_output(2 ** 61 + 12346, p, *shape)
    assert 0.3 < (keep != other).double().mean() < 0.5  # seeds give independent masks


def test_reference_philox_known_answers():
    # Random123's known-answer vectors for Philox4x32-10.
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((2 ** 32 - 1,) * 4, (2 ** 32 - 1,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        got = reference.philox4x32([torch.tensor(c) for c in counter], key)
        assert [int(w) for w in got] == list(want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_cpp_dropout_against_reference_mask(dropout_p, causal):
    # 700 keys: two forward key tiles (512 wide), six backward ones (128), so
    # the mask of a tile that starts after key 0 is checked too
    q, k, v = _inputs(2, 4, 2, 77, 700, 32, torch.float64)
    grad = torch.randn(q.shape, dtype=torch.float64)
    seed = 987654321987
    op = lambda q, k, v, causal: torch.ops.pyattn.flash_attention_forward(
        q, k, v, causal, 32 ** -0.5, dropout_p, seed)
    ours = _run(op, q, k, v, grad, causal=causal)
    exact = _run(lambda q, k, v, causal: reference.attention(q, k, v, causal, None, dropout_p, seed),
                 q, k, v, grad, causal=causal)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], ours, exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    # float32 against the float64 reference with the same mask
    ours32 = _run(op, q.float(), k.float(), v.float(), grad, causal=causal)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], ours32, exact):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True])
def test_cpp_dropout_in_decode_tiles(causal):
    """3 queries against 2100 keys: two decode tiles (2048 keys, then 52), the
    second's mask drawn from key 2048 on."""
    q, k, v = _inputs(1, 2, 1, 3, 2100, 16, torch.float64)
    seed = 1234567
    out, lse = torch.ops.pyattn.flash_attention_forward(q, k, v, causal, 0.25, 0.3, seed)
    want, want_lse = reference.attention(q, k, v, causal, 0.25, 0.3, seed)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, want_lse, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_cpp_dropout_gradcheck(causal):
    q, k, v = _inputs(1, 1, 1, 4, 6, 8, torch.float64)
    for t in (q, k, v):
        t.requires_grad_()
    fn = lambda q, k, v: pyattn.flash_attention(q, k, v, causal=causal, dropout_p=0.4,
                                                generator=torch.Generator().manual_seed(3))
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dropout_seed_comes_from_the_generator():
    q, k, v = _inputs(1, 2, 2, 20, 20, 16, torch.float32)
    run = lambda **kw: pyattn.flash_attention(q, k, v, dropout_p=0.5, **kw)
    a = run(generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, run(generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a, run(generator=torch.Generator().manual_seed(2)))
    torch.manual_seed(5)
    b = run()  # the default generator: torch.manual_seed reproduces
    assert not torch.equal(b, run())
    torch.manual_seed(5)
    assert torch.equal(b, run())
    seed = int(torch.randint(0, 2 ** 62, (), generator=torch.Generator().manual_seed(1)))
    want, _ = reference.attention(q, k, v, False, None, 0.5, seed)
    torch.testing.assert_close(a, want.float(), rtol=1e-5, atol=1e-5)


def test_dropout_zero_is_exactly_no_dropout_and_draws_nothing():
    q, k, v = _inputs(2, 4, 2, 90, 90, 32, torch.float32)
    grad = torch.randn_like(q)
    plain = _run(lambda *a, **kw: pyattn.flash_attention(*a, **kw, return_lse=True),
                 q, k, v, grad, causal=True)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    zero = _run(lambda *a, **kw: pyattn.flash_attention(*a, **kw, dropout_p=0.0,
                                                        generator=generator, return_lse=True),
                q, k, v, grad, causal=True)
    for a, b in zip(plain, zero):
        assert torch.equal(a, b)
    assert torch.equal(generator.get_state(), state)
    # the seed is ignored at p = 0
    a, _ = torch.ops.pyattn.flash_attention_forward(q, k, v, True, 0.2, 0.0, 0)
    b, _ = torch.ops.pyattn.flash_attention_forward(q, k, v, True, 0.2, 0.0, 99)
    assert torch.equal(a, b)


def test_gpt_attn_pdrop_only_in_training():
    from pyattn.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    config = dict(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    model, plain = GPT(GPTConfig(**config, attn_pdrop=0.3)), GPT(GPTConfig(**config))
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 11, (2, 16))
    model.eval()
    plain.eval()
    assert torch.equal(model(idx)[0], plain(idx)[0])
    model.train()
    plain.train()
    assert not torch.equal(model(idx)[0], plain(idx)[0])
    torch.manual_seed(1)
    first = model(idx)[0]
    torch.manual_seed(1)
    assert torch.equal(first, model(idx)[0])


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _inputs(1, 1, 1, 4, 4, 16, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pyattn.flash_attention(q, k, v, backend="triton")


def test_reference_backend_matches_cpp():
    q, k, v = _inputs(2, 4, 1, 30, 41, 32, torch.float64)
    torch.testing.assert_close(pyattn.flash_attention(q, k, v, causal=True, backend="reference"),
                               pyattn.flash_attention(q, k, v, causal=True, backend="cpp"))


@pytest.mark.parametrize("call, error, match", [
    (lambda: pyattn.flash_attention(torch.randn(2, 3, 16), torch.randn(2, 3, 16),
                                    torch.randn(2, 3, 16)), ValueError, "`q` must be a 4-D"),
    (lambda: pyattn.flash_attention(torch.randn(1, 2, 3, 16), torch.randn(2, 2, 3, 16),
                                    torch.randn(2, 2, 3, 16)), ValueError, "batch of `q`"),
    (lambda: pyattn.flash_attention(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 24),
                                    torch.randn(1, 2, 3, 24)), ValueError, "head_dim of `q`"),
    (lambda: pyattn.flash_attention(torch.randn(1, 3, 3, 16), torch.randn(1, 2, 3, 16),
                                    torch.randn(1, 2, 3, 16)), ValueError, "multiple of kv_heads"),
    (lambda: pyattn.flash_attention(torch.randn(1, 2, 3, 12), torch.randn(1, 2, 3, 12),
                                    torch.randn(1, 2, 3, 12)), ValueError, "multiple of 8"),
    (lambda: pyattn.flash_attention(torch.randn(1, 2, 3, 264), torch.randn(1, 2, 3, 264),
                                    torch.randn(1, 2, 3, 264)), ValueError, "up to 256"),
    (lambda: pyattn.flash_attention(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16).double(),
                                    torch.randn(1, 2, 3, 16)), TypeError, "one dtype"),
    (lambda: pyattn.flash_attention(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 16),
                                    torch.randn(1, 2, 3, 16)), ValueError, "same shape"),
    (lambda: pyattn.flash_attention(torch.randn(1, 2, 3, 16), torch.randn(1, 0, 3, 16),
                                    torch.randn(1, 0, 3, 16)), ValueError, "multiple of kv_heads"),
    (lambda: pyattn.flash_attention(*[torch.randn(1, 2, 3, 16).half()] * 3),
     TypeError, "'cpp' backend supports float32 and float64"),
    (lambda: pyattn.flash_attention(*[torch.randn(1, 2, 3, 16)] * 3, backend="flash"),
     ValueError, "`backend` must be one of"),
    (lambda: torch.ops.pyattn.flash_attention_forward(
        torch.randn(1, 3, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), False, 1.0,
        0.0, 0), ValueError, "multiple of kv_heads"),
    (lambda: torch.ops.pyattn.flash_attention_backward(
        *[torch.randn(1, 2, 3, 16)] * 5, torch.randn(1, 2, 4), False, 1.0, 0.0, 0),
     ValueError, "`lse` must be"),
    *[(lambda p=p: pyattn.flash_attention(*[torch.randn(1, 2, 3, 16)] * 3, dropout_p=p),
       ValueError, r"`dropout_p` must be in \[0, 1\)")
      for p in (1.0, 1.5, -0.1, float("nan"), float("inf"))],
    *[(lambda p=p: torch.ops.pyattn.flash_attention_forward(
        *[torch.randn(1, 2, 3, 16)] * 3, False, 1.0, p, 0),
       ValueError, r"`dropout_p` must be in \[0, 1\)") for p in (1.0, -0.1, float("nan"))],
    (lambda: torch.ops.pyattn.flash_attention_forward(
        *[torch.randn(1, 2, 3, 16)] * 3, False, 1.0, 0.5, -1), ValueError, "`seed` must be in"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()

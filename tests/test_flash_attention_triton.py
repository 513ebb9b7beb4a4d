"""The Triton flash-attention ops against float64 math attention.

Without a GPU the kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set by conftest.py): with the interpreter's own tile
configuration and with every tile configuration the op autotunes over on CUDA
(kernels/flash_attention_configs.py), at small sequence lengths. The ops are
called directly: (q, k, v, causal, scale, dropout_p, seed) forward and
(grad_out, q, k, v, out, lse, causal, scale, dropout_p, seed) backward.
"""
import itertools

import pytest
import torch

import pyattn  # noqa: F401  (registers the ops)
import pyattn.ops.flash_attention as flash_ops
from pyattn import reference
from pyattn.kernels import flash_attention as kernels
from pyattn.kernels import flash_attention_configs as configs
from conftest import CUDA, requires_cuda

interpreter = pytest.mark.skipif(CUDA, reason="the interpreter runs on CPU tensors")
forward_op = torch.ops.pyattn.flash_attention_triton_forward
backward_op = torch.ops.pyattn.flash_attention_triton_backward


def _inputs(batch, heads, kv_heads, seq_q, seq_k, dim, dtype, device="cpu"):
    q = torch.randn(batch, heads, seq_q, dim, dtype=dtype, device=device)
    k = torch.randn(batch, kv_heads, seq_k, dim, dtype=dtype, device=device)
    v = torch.randn(batch, kv_heads, seq_k, dim, dtype=dtype, device=device)
    return q, k, v


def _triton(q, k, v, grad, causal, dropout_p=0.0, seed=0):
    """(out, lse, dq, dk, dv) of the Triton ops, in float64."""
    scale = q.shape[-1] ** -0.5
    out, lse = forward_op(q, k, v, causal, scale, dropout_p, seed)
    grads = backward_op(grad.to(q.dtype), q, k, v, out, lse, causal, scale, dropout_p, seed)
    return [t.double() for t in (out, lse, *grads)]


def _math(q, k, v, grad, causal, keep=None, dropout_p=0.0):
    """(out, lse, dq, dk, dv) of math attention in q's dtype (softmax in float32
    at least), with dropout mask `keep` (batch, heads, seq_q, seq_k) if given."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        seq_q, seq_k = q.shape[2], k.shape[2]
        visible = torch.ones(seq_q, seq_k, dtype=torch.bool).tril(seq_k - seq_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    work = torch.promote_types(q.dtype, torch.float32)
    lse = torch.logsumexp(scores.to(work), -1)
    probs = torch.softmax(scores.to(work), -1).nan_to_num(0.0)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    out = probs.to(q.dtype) @ vv
    grads = torch.autograd.grad(out, (q, k, v), grad.to(q.dtype))
    return [t.detach().double() for t in (out, lse, *grads)]


def _assert_close_to_exact(q, k, v, causal, keep=None, dropout_p=0.0, seed=0):
    """Triton vs float64 math: the error must stay within 2x (+ a small floor) of
    PyTorch's own math attention run in the inputs' dtype (FlashAttention's rule)."""
    grad = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    ours = _triton(q, k, v, grad, causal, dropout_p, seed)
    exact = _math(q.double(), k.double(), v.double(), grad, causal, keep, dropout_p)
    low = _math(q, k, v, grad, causal, keep, dropout_p)
    for name, a, lo, b in zip(["out", "lse", "dq", "dk", "dv"], ours, low, exact):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: non-finite pattern differs"
        if not finite.any():
            continue
        err = (a - b)[finite].abs().max().item()
        err_low = (lo - b)[finite].abs().max().item()
        size = max(b[finite].abs().max().item(), 1.0)
        assert err <= 2 * err_low + 1e-5 * size, (name, err, err_low, size)


# ------------------------------------------------ interpreter: default tiles

CASES = [(1, 1, 1, 1, 1, 16), (1, 2, 2, 7, 7, 16), (1, 4, 2, 37, 53, 48), (2, 2, 1, 53, 37, 32)]


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_interpreter_against_reference(case, causal, dtype):
    _assert_close_to_exact(*_inputs(*case, dtype), causal)


@interpreter
def test_interpreter_non_contiguous_and_no_key_rows():
    # (batch, seq, heads, dim) transposed; causal with seq_q > seq_k: 10 rows see no key.
    q = torch.randn(1, 19, 2, 16).transpose(1, 2)
    k = torch.randn(1, 1, 16, 9).transpose(2, 3)
    v = torch.randn(1, 9, 1, 16).transpose(1, 2)
    grad = torch.randn(1, 2, 16, 19).transpose(2, 3)
    out, lse, dq, dk, dv = _triton(q, k, v, grad, True)
    assert torch.isneginf(lse[:, :, :10]).all() and torch.equal(out[:, :, :10], 0 * out[:, :, :10])
    exact = _math(q.double(), k.double(), v.double(), grad.double(), True)
    for a, b in zip((out, dq, dk, dv), exact[:1] + exact[2:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------- interpreter: the CUDA tile configurations

def _cuda_config_cases():
    """One case per configuration index of each kernel's CUDA list, per BLOCK_D
    and list (float16, float16 with dropout, float32): the forward, dk/dv and dq
    kernels run their i-th configuration together. (BLOCK_D 16 and 32 use the
    tiles of 64; the default-tile tests run those head dims.)"""
    cases = []
    for block_d, (float32, dropout) in itertools.product(
            (64, 128, 256), [(False, False), (False, True), (True, False)]):
        lists = {kernel: configs.configs(kernel, block_d, float32, dropout)
                 for kernel in configs.KERNELS}
        for i in range(max(len(c) for c in lists.values())):
            chosen = {kernel: c[i % len(c)] for kernel, c in lists.items()}
            cases.append((block_d, float32, dropout, chosen))
    return cases


CUDA_CONFIG_CASES = _cuda_config_cases()


@interpreter
@pytest.mark.parametrize("block_d, float32, dropout, chosen", CUDA_CONFIG_CASES, ids=[
    f"d{d}-{'fp32' if f else 'fp16'}{'-dropout' if p else ''}-"
    + "-".join(str(c) for c in chosen.values()) for d, f, p, chosen in CUDA_CONFIG_CASES])
def test_interpreter_with_cuda_tile_configs(block_d, float32, dropout, chosen, monkeypatch):
    monkeypatch.setattr(flash_ops, "_tile_configs", lambda kernel, *args: [chosen[kernel]])
    dtype = torch.float32 if float32 else torch.float16
    largest = max(max(c.BLOCK_M, c.BLOCK_N) for c in chosen.values())
    # Past one tile with ragged tails; causal with seq_q != seq_k runs both loop
    # stages (non-causal tails: test_interpreter_against_reference).
    seq_q, seq_k = largest + 19, largest + 3
    q, k, v = _inputs(1, 2, 1, seq_q, seq_k, block_d - 8 if block_d > 16 else block_d, dtype)
    if dropout:
        p, seed = 0.2, 99
        keep = flash_ops.triton_dropout_keep(1, 2, seq_q, seq_k, p, seed)
        _assert_close_to_exact(q, k, v, True, keep=keep, dropout_p=p, seed=seed)
        return
    _assert_close_to_exact(q, k, v, causal=True)


@interpreter
def test_reference_check_fails_on_a_wrong_kernel(monkeypatch):
    """The comparison above catches a kernel whose softmax scale is 1% off."""
    q, k, v = _inputs(1, 2, 1, 37, 29, 16, torch.float32)
    _assert_close_to_exact(q, k, v, causal=True)
    monkeypatch.setattr(kernels, "LOG2E", type(kernels.LOG2E)(kernels.LOG2E.value * 1.01))
    with pytest.raises(AssertionError):
        _assert_close_to_exact(q, k, v, causal=True)


# ------------------------------------------------------------------ dropout

@interpreter
def test_dropout_keep_rate_and_independence():
    p, n = 0.3, 2 * 3 * 64 * 96
    keep = flash_ops.triton_dropout_keep(2, 3, 64, 96, p, seed=1234)
    rate = keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, (rate, sigma)
    # every (batch, head) and every row draws its own numbers
    flat = keep.reshape(6, 64, 96)
    assert all(not torch.equal(flat[0], flat[i]) for i in range(1, 6))
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    other = flash_ops.triton_dropout_keep(2, 3, 64, 96, p, seed=1235)
    assert 0.3 < (keep != other).float().mean().item() < 0.5  # 2 p (1 - p) = 0.42


@interpreter
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_against_math_with_the_regenerated_mask(causal):
    p, seed = 0.25, 2 ** 40 + 17  # a seed past 32 bits
    q, k, v = _inputs(1, 2, 1, 37, 45, 16, torch.float32)
    keep = flash_ops.triton_dropout_keep(1, 2, 37, 45, p, seed)
    _assert_close_to_exact(q, k, v, causal, keep=keep, dropout_p=p, seed=seed)


@interpreter
def test_dropout_is_reproducible_and_zero_is_no_dropout():
    q, k, v = _inputs(1, 1, 1, 40, 40, 16, torch.float32)
    grad = torch.randn(q.shape, dtype=torch.float64)
    first = _triton(q, k, v, grad, True, 0.2, seed=7)
    again = _triton(q, k, v, grad, True, 0.2, seed=7)
    other = _triton(q, k, v, grad, True, 0.2, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert torch.equal(first[1], other[1])  # lse is that of the undropped probabilities
    plain = _triton(q, k, v, grad, True)  # dropout_p = 0, seed 0
    assert all(torch.equal(a, b) for a, b in zip(plain, _triton(q, k, v, grad, True, 0.0, 7)))


# ----------------------------------------- launch arithmetic (no kernel runs)

def test_grid_keeps_every_axis_within_cuda_limits():
    for num_blocks, batch_heads in [(1, 1), (64, 65_536), (2, 8 * 70_000), (512, 4096)]:
        grid = configs.grid(num_blocks, batch_heads)
        assert grid[0] == num_blocks * batch_heads <= configs.GRID_AXIS0_LIMIT
        assert all(axis <= configs.GRID_AXIS12_LIMIT for axis in grid[1:])
    with pytest.raises(ValueError, match="grid limit"):
        configs.grid(2 ** 16, 2 ** 15)


def test_launcher_grid_for_batch_heads_over_65535(monkeypatch):
    """The op's own grids for batch * heads = 70,000 (no kernel runs)."""
    launched = []

    class Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, kwargs))

    monkeypatch.setattr(flash_ops, "_traceable", Capture)
    q, k, v = _inputs(70_000, 1, 1, 3, 5, 16, torch.float32)
    out, lse = flash_ops._triton_forward(q, k, v, True, 0.25, 0.0, 0)
    flash_ops._triton_backward(out, q, k, v, out, lse, True, 0.25, 0.0, 0)
    assert len(launched) == 4  # forward, preprocess, dk/dv, dq
    for grid, kwargs in launched:
        meta = dict(kwargs, BLOCK_M=kwargs.get("BLOCK_M", 64), BLOCK_N=kwargs.get("BLOCK_N", 64))
        dims = grid(meta)
        assert dims[0] >= 70_000 and dims[0] <= configs.GRID_AXIS0_LIMIT
        assert all(axis <= configs.GRID_AXIS12_LIMIT for axis in dims[1:])


@pytest.mark.parametrize("dropout_p", [1.0, -0.1, 1.5])
def test_bad_dropout_p_is_a_clear_error(dropout_p):
    q, k, v = _inputs(1, 1, 1, 4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="dropout_p"):
        forward_op(q, k, v, False, 0.25, dropout_p, 0)
    with pytest.raises(ValueError, match="dropout_p"):
        backward_op(q, q, k, v, q, q[..., 0], False, 0.25, dropout_p, 0)


def test_float32_dots_are_exact_and_half_dots_use_tensor_cores():
    half = flash_ops._kernel_constexprs(torch.empty(1, 1, 1, 64, dtype=torch.float16), True, 0.0)
    single = flash_ops._kernel_constexprs(torch.empty(1, 1, 1, 64), True, 0.1)
    assert single["DOT_PRECISION"] == "ieee" and half["DOT_PRECISION"] == "tf32"
    assert single["DROPOUT"] and not half["DROPOUT"]


@pytest.mark.parametrize("seq_q, seq_k", [(1, 1), (7, 7), (7, 20), (20, 7), (128, 64), (3, 300)])
@pytest.mark.parametrize("causal", [False, True])
def test_flop_count_matches_counted_pairs(seq_q, seq_k, causal):
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool)
    if causal:
        visible = visible.tril(seq_k - seq_q)
    assert configs.visible_pairs(seq_q, seq_k, causal) == visible.sum().item()
    pairs = visible.sum().item()
    assert configs.attention_flops(2, 3, seq_q, seq_k, 64, causal) == 4 * 2 * 3 * pairs * 64
    assert configs.attention_flops(2, 3, seq_q, seq_k, 64, causal, "backward") == \
        configs.attention_flops(2, 3, seq_q, seq_k, 64, causal, "dkdv") + \
        configs.attention_flops(2, 3, seq_q, seq_k, 64, causal, "dq")


def test_every_configuration_is_a_valid_tile():
    for kernel, block_d, float32, dropout in itertools.product(
            configs.KERNELS, (16, 32, 64, 128, 256), (False, True), (False, True)):
        for c in configs.configs(kernel, block_d, float32, dropout):
            assert c.BLOCK_M in (16, 32, 64, 128) and c.BLOCK_N in (16, 32, 64, 128), c
            assert c.num_warps in (4, 8) and 1 <= c.num_stages <= 5, c
    assert [configs.block_d(d) for d in (8, 16, 24, 64, 72, 200, 256)] == \
        [16, 16, 32, 64, 128, 256, 256]


# --------------------------------------------------------------------- CUDA

SEQLENS = [(1, 1), (7, 7), (113, 113), (128, 128), (203, 203), (1000, 1000),
           (7, 113), (113, 7), (203, 128), (1, 203), (128, 1000)]
HEAD_DIMS = [16, 32, 48, 64, 128, 256, 80, 96]
HEADS = [(1, 1), (4, 2), (8, 1), (6, 6), (3, 3)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_against_reference(causal, dtype):
    for (seq_q, seq_k), dim, (heads, kv_heads) in zip(
            SEQLENS, itertools.cycle(HEAD_DIMS), itertools.cycle(HEADS)):
        _assert_close_to_exact(*_inputs(2, heads, kv_heads, seq_q, seq_k, dim, dtype, "cuda"),
                               causal)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_dropout_against_math_with_the_regenerated_mask(dtype):
    p, seed = 0.1, 2 ** 50 + 3
    q, k, v = _inputs(2, 4, 2, 300, 257, 64, dtype, "cuda")
    keep = flash_ops.triton_dropout_keep(2, 4, 300, 257, p, seed, "cuda")
    assert abs(keep.float().mean().item() - 0.9) < 0.01
    _assert_close_to_exact(q, k, v, True, keep=keep, dropout_p=p, seed=seed)


@requires_cuda
def test_cuda_opcheck_and_determinism():
    q, k, v = _inputs(2, 4, 2, 300, 257, 64, torch.bfloat16, "cuda")
    for args in [(q, k, v, True, 0.125, 0.0, 0), (q, k, v, False, 0.125, 0.1, 99)]:
        torch.library.opcheck(forward_op, args)
    grad = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    first = _triton(q, k, v, grad, True, 0.1, 5)
    second = _triton(q, k, v, grad, True, 0.1, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_cuda_tensors_on_a_second_device():
    q, k, v = _inputs(1, 2, 2, 70, 70, 64, torch.float16, "cuda:1")
    _assert_close_to_exact(q, k, v, True)


@requires_cuda
def test_cuda_large_offsets_do_not_overflow():
    # The last rows of q lie more than 2^31 elements past its start (4.3 GB).
    q = torch.empty(1, 1, 33000, 65536, device="cuda", dtype=torch.float16)[..., :64].normal_()
    k = torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    out, _ = forward_op(q, k, v, False, 0.125, 0.0, 0)
    ref, _ = reference.attention(q[:, :, -3:], k, v, scale=0.125)
    torch.testing.assert_close(out[:, :, -3:].float(), ref.float(), rtol=2e-2, atol=2e-2)


# ------------------------------------- the sm_90 compile check (no compiling here)

def _hopper_check():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "triton_hopper_check.py")
    spec = importlib.util.spec_from_file_location("triton_hopper_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hopper_check_covers_every_configuration_the_op_can_choose():
    check = _hopper_check()
    compiled = {(j.kernel, j.dtype, configs.block_d(j.head_dim), j.dropout, j.config)
                for j in check.jobs()}
    for kernel, dtype, block_d, dropout in itertools.product(
            configs.KERNELS, ("fp16", "fp32"), (16, 32, 64, 128, 256), (False, True)):
        for config in configs.configs(kernel, block_d, dtype == "fp32", dropout):
            assert (kernel, dtype, block_d, dropout, config) in compiled
    for kernel, dropout in itertools.product(configs.KERNELS, (False, True)):
        for block_d in check.WGMMA_REQUIRED_BLOCK_DS:
            for config in configs.configs(kernel, block_d, False, dropout):
                assert (kernel, "bf16", block_d, dropout, config) in compiled


def test_hopper_check_flags_spills_shared_memory_and_missing_wgmma():
    check = _hopper_check()
    job = check.Job("forward", "bf16", 128, True, False, configs.TileConfig(128, 64, 8, 3))
    good = dict(job=job, error=None, shared=131072, spills=0, dots=["128x64x128:wgmma"] * 4)
    assert check.problems(good) == []
    for change, expected in [(dict(shared=check.SMEM_LIMIT + 1), "shared memory"),
                             (dict(spills=8), "spills"), (dict(spills=None), "spills unknown"),
                             (dict(dots=["128x64x128:wgmma", "128x64x128:mma"]), "wgmma"),
                             (dict(error="CompilationError: x"), "CompilationError")]:
        assert any(expected in p for p in check.problems(dict(good, **change))), change

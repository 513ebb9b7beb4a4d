"""pyattn.flash_attention (cpp, triton) against float64 math attention."""

import pytest
import torch
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


@pytest.mark.parametrize("batch, heads, kv_heads", [(1, 4, 1), (2, 4, 2), (3, 6, 3), (8, 2, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpp_backward_both_schedules(batch, heads, kv_heads, causal):
    # batch * kv_heads < 8: two passes over finer tasks; >= 8: one fused pass.
    q, k, v = _inputs(batch, heads, kv_heads, 150, 90, 32, torch.float64)
    _check_against_reference(q, k, v, causal, "cpp")


@pytest.mark.parametrize("dim", [8, 16, 32, 48, 64, 80, 96, 128, 256])
def test_cpp_head_dims(dim):
    q, k, v = _inputs(2, 4, 2, 37, 70, dim, torch.float64)
    _check_against_reference(q, k, v, True, "cpp")


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
    for causal in (False, True):
        torch.library.opcheck(torch.ops.pyattn.flash_attention_forward, (q, k, v, causal, 0.25))
    out, lse = torch.ops.pyattn.flash_attention_forward(q, k, v, True, 0.25)
    torch.library.opcheck(torch.ops.pyattn.flash_attention_backward,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                           out.detach(), lse, True, 0.25))


def test_cpp_compile_fullgraph_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
            return pyattn.flash_attention(q, k, v, causal=True).sum()

    block = Block()
    x = torch.randn(2, 21, 32)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)
    compiled(x).backward()
    assert block.qkv.weight.grad is not None and block.qkv.weight.grad.abs().sum() > 0


def test_cpp_backward_is_deterministic_across_thread_counts():
    q, k, v = _inputs(2, 4, 2, 150, 170, 32, torch.float32)
    grad = torch.randn_like(q)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, threads):
            torch.set_num_threads(n)
            results.append(_run(lambda *a, **kw: pyattn.flash_attention(*a, **kw, return_lse=True),
                                q, k, v, grad, causal=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


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
    (lambda: pyattn.flash_attention(torch.randn(1, 2, 0, 16), torch.randn(1, 2, 3, 16),
                                    torch.randn(1, 2, 3, 16)), ValueError, ">= 1"),
    (lambda: pyattn.flash_attention(*[torch.randn(1, 2, 3, 16).half()] * 3),
     TypeError, "'cpp' backend supports float32 and float64"),
    (lambda: pyattn.flash_attention(*[torch.randn(1, 2, 3, 16)] * 3, backend="flash"),
     ValueError, "`backend` must be one of"),
    (lambda: torch.ops.pyattn.flash_attention_forward(
        torch.randn(1, 3, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), False, 1.0),
     ValueError, "multiple of kv_heads"),
    (lambda: torch.ops.pyattn.flash_attention_backward(
        *[torch.randn(1, 2, 3, 16)] * 5, torch.randn(1, 2, 4), False, 1.0),
     ValueError, "`lse` must be"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()

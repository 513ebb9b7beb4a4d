"""flash_attention vs torch SDPA (each backend it offers here) vs naive attention.

Forward and forward+backward, causal and not, head_dim 64 and 128; CPU: float32,
seq 256 -> 4096 (batch 1, 8 heads); GPU: bfloat16, seq 512, 2048, 8192, 16384 (batch x
seq = 16k tokens, 16 heads at head_dim 64, 8 at 128); plus single-query decode
against a KV cache and grouped-query heads. Records time, TFLOP/s (4 B H Nq Nk D
forward, halved when causal, x3.5 for forward+backward; decode: GB/s of K and V
read, the bound of a matrix-vector product) and peak memory.

    python -m pytest benchmarks/bench_flash_attention.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyattn
from pyattn.reference import naive_attention
from conftest import DEVICE

if DEVICE.type == "cuda":
    DTYPE, SEQS = torch.bfloat16, [512, 2048, 8192, 16384]
    SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                     "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                     "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                     "sdpa_math": SDPBackend.MATH}
else:
    DTYPE, SEQS = torch.float32, [256, 1024, 4096]
    SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_math": SDPBackend.MATH}
IMPLS = ["pyattn", *SDPA_BACKENDS, "naive"]
PARTNER = "sdpa_flash"  # the counterpart the issues' targets name


def attention(impl, q, k, v, causal, dropout_p=0.0):
    if impl == "pyattn":
        return pyattn.flash_attention(q, k, v, causal=causal, dropout_p=dropout_p)
    if impl == "naive":
        return naive_attention(q, k, v, causal, dropout_p)
    with sdpa_kernel(SDPA_BACKENDS[impl]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p,
                                              enable_gqa=q.shape[1] != k.shape[1])


def unavailable(impl, q, k, v, causal, dropout_p=0.0):
    """Call ``impl`` once; return why an SDPA backend does not take these inputs
    here (the case is skipped), else None. A RuntimeError from pyattn or naive
    propagates: it fails the benchmark instead of hiding as a skip."""
    try:
        attention(impl, q, k, v, causal, dropout_p)
    except RuntimeError as error:
        if impl not in SDPA_BACKENDS:
            raise
        return str(error).splitlines()[0][:120]
    return None


def shape(seq, dim):
    if DEVICE.type == "cuda":
        return max(1, 16384 // seq), 16 if dim == 64 else 8
    return 1, 8


def measure_case(measure, impl, seq, dim, passes, causal, dropout_p=0.0):
    batch, heads = shape(seq, dim)
    dropout = f" dropout {dropout_p}" if dropout_p else ""
    measure_shapes(measure, impl, (batch, heads, seq, dim), (batch, heads, seq, dim), passes,
                   causal, f"attention seq {seq} d {dim} {passes} "
                   f"{'causal' if causal else 'full'}{dropout}", dropout_p)


def attention_step(impl, q_shape, kv_shape, passes, causal, dropout_p=0.0):
    """One forward (or forward + backward) of ``impl`` on fresh seeded inputs,
    or the reason the SDPA backend ``impl`` does not take them here."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape_, device=DEVICE, dtype=DTYPE, requires_grad=passes != "forward")
               for shape_ in (q_shape, kv_shape, kv_shape))
    reason = unavailable(impl, q, k, v, causal, dropout_p)
    if reason:
        return reason
    if passes == "forward":
        def step():
            with torch.no_grad():
                return attention(impl, q, k, v, causal, dropout_p)
        return step
    grad = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        attention(impl, q, k, v, causal, dropout_p).backward(grad)
    return step


def measure_shapes(measure, impl, q_shape, kv_shape, passes, causal, group, dropout_p=0.0):
    """Time one (q, k, v) shape; FLOPs from the number of visible (query, key) pairs.
    pyattn's rounds alternate with SDPA flash's (conftest.measure's partner)."""
    (batch, heads, seq_q, dim), seq = q_shape, kv_shape[2]
    step = attention_step(impl, q_shape, kv_shape, passes, causal, dropout_p)
    if isinstance(step, str):
        pytest.skip(f"{impl} unavailable: {step}")
    partner = None
    if impl == "pyattn":
        partner_step = attention_step(PARTNER, q_shape, kv_shape, passes, causal, dropout_p)
        partner = None if isinstance(partner_step, str) else (PARTNER, partner_step)
    if seq_q == 1:  # decode: a matrix-vector product per head, bound by reading K and V
        rate = dict(bytes=2 * kv_shape[0] * kv_shape[1] * seq * dim * DTYPE.itemsize)
    else:
        flops = 4 * batch * heads * seq_q * seq * dim * (0.5 if causal else 1.0)
        rate = dict(flops=flops * (1.0 if passes == "forward" else 3.5))
    rounds = 2 if seq_q >= 4096 else 3 if seq_q > 1 else 20
    measure(step, group, impl, rounds=rounds, partner=partner, **rate)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("seq", SEQS)
def test_attention(measure, seq, dim, passes, causal, impl):
    measure_case(measure, impl, seq, dim, passes, causal)


@pytest.mark.parametrize("impl", ["pyattn", *SDPA_BACKENDS])
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
def test_attention_dropout(measure, passes, impl):
    """Dropout 0.1 on the probabilities (the seed GPT template's attn_pdrop):
    causal, head_dim 64, the second sequence length."""
    measure_case(measure, impl, SEQS[1], 64, passes, True, dropout_p=0.1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq", [SEQS[1], SEQS[-1]])
def test_attention_decode(measure, seq, impl):
    """One new query against a KV cache of `seq` keys (generation): batch 4,
    8 heads, head_dim 64, forward; it sees every cached key (not `causal`: SDPA's
    is_causal aligns the query with the first key)."""
    measure_shapes(measure, impl, (4, 8, 1, 64), (4, 8, seq, 64), "forward", False,
                   f"attention decode 1 x {seq} keys d 64")


@pytest.mark.parametrize("impl", ["pyattn", *SDPA_BACKENDS])
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
def test_attention_gqa(measure, passes, impl):
    """Grouped-query heads: 8 query heads sharing 2 key/value heads, causal,
    head_dim 64, the second sequence length."""
    seq = SEQS[1]
    batch, _ = shape(seq, 64)
    measure_shapes(measure, impl, (batch, 8, seq, 64), (batch, 2, seq, 64), passes, True,
                   f"attention gqa 8/2 heads seq {seq} d 64 {passes} causal")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU headline cases (gpu_check.sh)")
@pytest.mark.parametrize("impl", ["pyattn", "sdpa_flash"])
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["headline", "headline_dropout"])
def test_attention_gpu_headline(measure, dropout_p, passes, impl):
    """bf16, head_dim 128, causal, seq 8192 (2 x 8 heads): issue 13's target shape."""
    measure_case(measure, impl, 8192, 128, passes, True, dropout_p)


def test_only_sdpa_backends_are_skipped(monkeypatch):
    """Not a benchmark (`pytest benchmarks/bench_flash_attention.py -k skipped`):
    a RuntimeError from pyattn fails the run; one from an SDPA backend skips."""
    q = k = v = torch.randn(1, 1, 8, 16)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")
    monkeypatch.setattr(pyattn, "flash_attention", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        unavailable("pyattn", q, k, v, False)
    monkeypatch.setattr(F, "scaled_dot_product_attention", broken)
    assert unavailable("sdpa_math", q, k, v, False) == "kernel failed"

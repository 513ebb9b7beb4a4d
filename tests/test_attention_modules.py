"""pyattn.nn.CausalSelfAttention and RotaryEmbedding against an independent float64
reference: the projections, head split, RoPE (written out from the RoPE paper) and
masked softmax are spelt out here, sharing no code with the modules."""
import math

import pytest
import torch

from pyattn.nn import CausalSelfAttention, RotaryEmbedding

# float64 results agree to ~1e-15 relative; torch's default float64 tolerance (1e-7)
# would let a computation rounded to float32 (~6e-8) through.
FLOAT64 = dict(rtol=1e-10, atol=1e-10)


def rope_reference(x: torch.Tensor, offset: int = 0, theta: float = 10000.0) -> torch.Tensor:
    """RoFormer (Su et al. 2021, eq. 34): the pair (x[2i], x[2i+1]) of the row at
    position m turns by m * theta^(-2i/d); cos / sin tables from Python floats."""
    seq, d = x.shape[-2], x.shape[-1]
    angles = [[(offset + m) * theta ** (-2 * i / d) for i in range(d // 2)] for m in range(seq)]
    cos = torch.tensor([[math.cos(a) for a in row] for row in angles], dtype=torch.float64)
    sin = torch.tensor([[math.sin(a) for a in row] for row in angles], dtype=torch.float64)
    out = torch.empty_like(x, dtype=torch.float64)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out


def attention_reference(module: CausalSelfAttention, x: torch.Tensor, rope: bool) -> torch.Tensor:
    """Causal multi-head (grouped-query) attention from the module's weights only."""
    batch, seq, width = x.shape
    heads, kv_heads = module.num_heads, module.num_kv_heads
    d = width // heads
    qkv = x @ module.qkv.weight.T + module.qkv.bias

    def heads_of(start, count):  # (batch, seq, count * d) -> (batch, count, seq, d)
        columns = qkv[..., start * d:(start + count) * d]
        return columns.reshape(batch, seq, count, d).permute(0, 2, 1, 3)

    q, k, v = heads_of(0, heads), heads_of(heads, kv_heads), heads_of(heads + kv_heads, kv_heads)
    if rope:
        q, k = rope_reference(q), rope_reference(k)
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    y = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
    y = y.permute(0, 2, 1, 3).reshape(batch, seq, width)
    return y @ module.proj.weight.T + module.proj.bias


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("rope", [False, True])
def test_causal_self_attention_matches_float64_reference(kv_heads, rope):
    attn = CausalSelfAttention(64, 4, kv_heads, rope=rope).double()
    x = torch.randn(3, 29, 64, dtype=torch.float64, requires_grad=True)
    got = attn(x)
    expected = attention_reference(attn, x, rope)
    torch.testing.assert_close(got, expected, **FLOAT64)
    assert got.dtype == torch.float64
    upstream = torch.randn_like(got)
    params = [x, *attn.parameters()]
    grads = torch.autograd.grad(got, params, upstream)
    expected_grads = torch.autograd.grad(expected, params, upstream)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, **FLOAT64)


def test_reference_catches_a_float32_rope(monkeypatch):
    """The float64 comparison is sharp enough to see RoPE rounded to float32 (the
    defect this file once had), deep into a sequence."""
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    rope = RotaryEmbedding(16)
    torch.testing.assert_close(rope(x, offset=1000), rope_reference(x, offset=1000), **FLOAT64)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(rope(x.float(), offset=1000).double(),
                                   rope_reference(x, offset=1000), **FLOAT64)
    attn = CausalSelfAttention(64, 4, rope=True).double()
    x = torch.randn(1, 113, 64, dtype=torch.float64)
    torch.testing.assert_close(attn(x), attention_reference(attn, x, rope=True), **FLOAT64)
    float32_rope = attn.rope.forward
    monkeypatch.setattr(attn.rope, "forward",
                        lambda t, offset=0: float32_rope(t.float(), offset).double())
    with pytest.raises(AssertionError):
        torch.testing.assert_close(attn(x), attention_reference(attn, x, rope=True), **FLOAT64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_keeps_dtype_and_matches_the_paper(dtype):
    rope = RotaryEmbedding(16, theta=500.0)
    x = torch.randn(2, 113, 16, dtype=torch.float64)
    out = rope(x.to(dtype), offset=7)
    assert out.dtype == dtype
    expected = rope_reference(x.to(dtype).double(), offset=7, theta=500.0).to(dtype)
    torch.testing.assert_close(out, expected)


def test_rope_preserves_norms_and_depends_on_relative_offset():
    rope = RotaryEmbedding(16)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    for offset in (0, 5, 113):
        torch.testing.assert_close(rope(q, offset).norm(), q.norm())
    dots = [(rope(q, s) * rope(k, t)).sum().item() for s, t in [(3, 1), (10, 8), (102, 100)]]
    assert max(dots) - min(dots) < 1e-12
    assert abs((rope(q, 4) * rope(k, 1)).sum().item() - dots[0]) > 1e-6


def test_rope_rotates_pairs_of_dimensions():
    rope = RotaryEmbedding(4, theta=10000.0)
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    out = rope(x, offset=1)  # pair 0 by angle 1, pair 1 by angle 1 / 100
    expected = torch.tensor([[math.cos(1.0), math.sin(1.0), math.cos(0.01), math.sin(0.01)]],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_bad_configuration():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        CausalSelfAttention(32, 4, 3)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)

"""pyattn.nn.CausalSelfAttention and RotaryEmbedding."""
import pytest
import torch
import torch.nn.functional as F

from pyattn.nn import CausalSelfAttention, RotaryEmbedding


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("rope", [False, True])
def test_causal_self_attention_matches_sdpa(kv_heads, rope):
    attn = CausalSelfAttention(64, 4, kv_heads, rope=rope).double()
    x = torch.randn(3, 29, 64, dtype=torch.float64, requires_grad=True)
    q, k, v = attn.split_heads(x)
    k = k.repeat_interleave(4 // kv_heads, 1)
    v = v.repeat_interleave(4 // kv_heads, 1)
    expected = attn.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))
    got = attn(x)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), [x, *attn.parameters()])
    expected_grads = torch.autograd.grad(expected.sum(), [x, *attn.parameters()])
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_rope_preserves_norms_and_depends_on_relative_offset():
    rope = RotaryEmbedding(16).double()
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    for offset in (0, 5, 113):
        torch.testing.assert_close(rope(q, offset).norm(), q.norm())
    dots = [(rope(q, s) * rope(k, t)).sum().item() for s, t in [(3, 1), (10, 8), (102, 100)]]
    assert max(dots) - min(dots) < 1e-9
    assert abs((rope(q, 4) * rope(k, 1)).sum().item() - dots[0]) > 1e-6


def test_rope_rotates_pairs_of_dimensions():
    rope = RotaryEmbedding(4, theta=10000.0).double()
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    out = rope(x, offset=1)  # pair 0 by angle 1, pair 1 by angle 1 / 100
    expected = torch.tensor([[torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0)),
                              torch.cos(torch.tensor(0.01)), torch.sin(torch.tensor(0.01))]],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def test_bad_configuration():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        CausalSelfAttention(32, 4, 3)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)

"""Attention modules built on :func:`pyattn.flash_attention`."""
from __future__ import annotations

import torch
from torch import nn

from pyattn.ops.flash_attention import flash_attention


class RotaryEmbedding(nn.Module):
    r"""Rotary position embedding (RoPE) on pairs of dimensions.

    Dimension pair :math:`(2i, 2i+1)` of a vector at position :math:`t` is
    rotated by angle :math:`t \theta^{-2i/d}`, so :math:`q_s \cdot k_t` depends
    on positions only through :math:`s - t`, and norms are preserved.

    Args:
        head_dim: even size of the rotated vectors.
        theta: base of the frequencies. Default 10000.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x`` of shape ``(..., seq, head_dim)`` whose first row sits at ``offset``.

        Angles and products are computed in float64 for float64 input, else in
        float32 (half-precision input is rotated in float32 and rounded once).
        The frequencies are made here (in float64, then rounded), not kept as a
        buffer, so ``module.half()`` cannot lower their precision."""
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        seq = x.shape[-2]
        inv_freq = (self.theta ** (-torch.arange(0, self.head_dim, 2, device=x.device,
                                                 dtype=torch.float64) / self.head_dim)).to(compute)
        positions = torch.arange(offset, offset + seq, device=x.device, dtype=compute)
        angles = positions[:, None] * inv_freq[None, :]  # (seq, head_dim / 2)
        cos, sin = angles.cos(), angles.sin()
        pairs = x.to(compute).unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


class CausalSelfAttention(nn.Module):
    r"""Multi-head causal self-attention on :func:`pyattn.flash_attention`.

    .. math::
        \mathrm{proj}\big(\mathrm{concat}_h\,
        \mathrm{softmax}(\mathrm{mask}(q_h k_h^\top / \sqrt{d}))\, v_h\big)

    with ``q, k, v`` from one fused linear projection, optional RoPE on ``q``
    and ``k``, grouped-query heads (``num_kv_heads`` dividing ``num_heads``),
    dropout on the attention probabilities and on the output projection.

    Args:
        embed_dim: model width; ``embed_dim / num_heads`` is the head size.
        num_heads: query heads.
        num_kv_heads: key / value heads (default ``num_heads``).
        dropout: dropout on the output (residual) path.
        attn_dropout: dropout on the attention probabilities (``dropout_p`` of
            :func:`pyattn.flash_attention`), in training mode only. Default 0.
        bias: biases of the projections.
        rope: apply rotary position embeddings to ``q`` and ``k``.
        rope_theta: RoPE base.
        backend: passed to :func:`pyattn.flash_attention`.

    Shapes: ``x`` is ``(batch, seq, embed_dim)``; so is the result.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 dropout: float = 0.0, bias: bool = True, rope: bool = False,
                 rope_theta: float = 10000.0, backend: str = "auto", attn_dropout: float = 0.0):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise ValueError(f"CausalSelfAttention: embed_dim ({embed_dim}) must be divisible "
                             f"by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"CausalSelfAttention: num_heads ({num_heads}) must be a multiple "
                             f"of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout
        self.rope = RotaryEmbedding(self.head_dim, rope_theta) if rope else None

    def split_heads(self, x: torch.Tensor, offset: int = 0):
        """(q, k, v) of shape (batch, heads, seq, head_dim), RoPE applied from ``offset``."""
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).split([self.num_heads * self.head_dim,
                                     self.num_kv_heads * self.head_dim,
                                     self.num_kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        return q, k, v

    def attention_dropout_p(self) -> float:
        """The attention-probability dropout of this call: 0 in eval mode."""
        return self.attn_dropout if self.training else 0.0

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(batch, heads, seq, head_dim) -> output projection of (batch, seq, embed_dim)."""
        batch, _, seq, _ = y.shape
        y = y.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.dropout(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        return self.merge_heads(flash_attention(q, k, v, causal=True, backend=self.backend,
                                                dropout_p=self.attention_dropout_p()))

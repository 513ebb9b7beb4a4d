"""A character-level GPT (seed Q2), readable top to bottom.

Token embedding -> [pre-norm block: RMSNorm, causal self-attention (RoPE on q
and k by default, or learned absolute positions), residual; RMSNorm, MLP
Linear(d, 4d) -> tanh-GELU -> Linear(4d, d) -> dropout, residual] x n_layer ->
RMSNorm -> linear head. Attention runs through ``pyattn.flash_attention``,
torch SDPA or a naive materialised softmax (``attn``), same weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyattn.nn import CausalSelfAttention
from pyattn.ops.flash_attention import flash_attention
from pyattn.reference import naive_attention

ATTENTION = ("pyattn", "sdpa", "naive")
PRESETS = {
    "gpt-nano": dict(n_layer=3, n_head=3, n_embd=48),
    "gpt-micro": dict(n_layer=4, n_head=4, n_embd=128),
    "gpt-mini": dict(n_layer=6, n_head=6, n_embd=384),
    "gopher-44m": dict(n_layer=8, n_head=16, n_embd=512),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
}


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1       # embeddings and residual paths
    # Dropout on the attention probabilities (minGPT's attn_pdrop; the seed's
    # template uses 0.1). 0 by default so that the recorded runs and results,
    # made before attention had dropout, stay reproducible; training only.
    attn_pdrop: float = 0.0
    rope: bool = True          # False: learned absolute position embeddings
    rope_theta: float = 10000.0
    attn: str = "pyattn"       # pyattn | sdpa | naive

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model type {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def __post_init__(self):
        if self.attn not in ATTENTION:
            raise ValueError(f"attn must be one of {ATTENTION}, got {self.attn!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


def new_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (BERT / GPT-2)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class Attention(CausalSelfAttention):
    """Causal self-attention with a choice of kernel and a key/value cache."""

    def __init__(self, config: GPTConfig):
        super().__init__(config.n_embd, config.n_head, dropout=config.dropout, rope=config.rope,
                         rope_theta=config.rope_theta, attn_dropout=config.attn_pdrop)
        self.attn = config.attn

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        """x: (B, T, C). ``cache`` ({'k', 'v', 'pos'} or empty) is extended in place;
        its keys carry RoPE positions from ``cache['pos']`` on."""
        offset = cache.get("pos", 0) if cache is not None else 0
        q, k, v = self.split_heads(x, offset)  # (B, nh, T, hs)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache.update(k=k, v=v, pos=offset + x.shape[1])
        dropout_p = self.attention_dropout_p()
        if self.attn == "pyattn":
            y = flash_attention(q, k, v, causal=True, dropout_p=dropout_p)
        elif self.attn == "sdpa" and q.shape[2] in (1, k.shape[2]):
            # SDPA's causal mask aligns the first query with the first key: use
            # it only where that agrees with ours (no cache, or one new token).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1,
                                               dropout_p=dropout_p)
        else:
            y = naive_attention(q, k, v, causal=True, dropout_p=dropout_p)
        return self.merge_heads(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(new_gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.n_embd)
        self.attn = Attention(config)
        self.norm2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = None if config.rope else nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
        for name, param in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(param, 0.0, 0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                caches: Optional[list] = None):
        """idx: (B, T) token ids -> logits (B, T, vocab) and the mean cross-entropy
        if ``targets`` is given. ``caches``: one dict per block for generation."""
        _, t = idx.shape
        offset = caches[0].get("pos", 0) if caches else 0
        if self.pos_emb is not None and offset + t > self.config.block_size:
            raise ValueError(f"sequence of {offset + t} tokens exceeds block_size "
                             f"{self.config.block_size} (absolute position embeddings)")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(offset, offset + t, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None)
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 greedy: bool = False, generator: Optional[torch.Generator] = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T >= 1).

        Each token is drawn from the logits of the last ``block_size`` tokens,
        encoded as one window (positions 0 .. block_size - 1), as in training.
        Without cache every step re-encodes that window. With the key/value
        cache the prompt (cropped to ``block_size``) is encoded once, then one
        token at a time: the same logits while the text fits in ``block_size``.
        Past it the cache cannot slide: in layers above the first a cached key
        depends on the tokens before it, including ones the window has since
        dropped (RoPE makes the first layer's scores depend on relative positions
        only, not the deeper layers' keys on the window's start), so from there
        on each step re-encodes the window, exactly as without cache.
        """
        from pyattn.models.sampling import next_token

        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"generate: idx must be (batch, seq) with seq >= 1 (a prompt to "
                             f"continue), got shape {tuple(idx.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        block = self.config.block_size
        caches = None
        for _ in range(max_new_tokens):
            if caches is not None and caches[0]["k"].shape[2] < block:  # room in the window
                logits, _ = self(idx[:, -1:], caches=caches)
            else:  # encode the window afresh; cache it only while it can still grow
                caches = [{} for _ in self.blocks] if use_cache and idx.shape[1] < block else None
                logits, _ = self(idx[:, -block:], caches=caches)
            token = next_token(logits[:, -1], temperature, top_k, top_p, greedy, generator)
            idx = torch.cat([idx, token], dim=1)
        return idx

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matmul (Linear) weights only."""
        decay = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        decay_ids = {id(p) for p in decay}
        rest = [p for p in self.parameters() if id(p) not in decay_ids]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": rest, "weight_decay": 0.0}]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

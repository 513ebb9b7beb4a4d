"""GPT training throughput with pyattn vs SDPA vs naive attention, and
generation with and without the key/value cache (tokens/s in extra_info).

    python -m pytest benchmarks/bench_gpt.py --benchmark-only
"""
import pytest
import torch

from pyattn.models.gpt import GPT, GPTConfig
from conftest import DEVICE

MODEL = "gpt-micro" if DEVICE.type == "cpu" else "gpt-mini"
BATCH = 16 if DEVICE.type == "cpu" else 64


def training_step(attn, block_size):
    """One AdamW step of the model with attention ``attn`` on a seeded batch."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(MODEL, vocab_size=86, block_size=block_size, dropout=0.0,
                                 attn=attn)).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 86, (BATCH, block_size), device=DEVICE)
    autocast = torch.autocast(DEVICE.type, torch.bfloat16, enabled=DEVICE.type == "cuda")

    def step():
        with autocast:
            _, loss = model(x, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@pytest.mark.parametrize("block_size", [128, 512])
@pytest.mark.parametrize("attn", ["pyattn", "sdpa", "naive"])
def test_training_step(measure, attn, block_size):
    """pyattn's rounds alternate with SDPA's (conftest.measure's partner)."""
    partner = ("sdpa", training_step("sdpa", block_size)) if attn == "pyattn" else None
    measure(training_step(attn, block_size), f"gpt {MODEL} training step, block {block_size}",
            attn, rounds=5, partner=partner, tokens=BATCH * block_size)


@pytest.mark.parametrize("cache", ["kv-cache", "no-cache"])
def test_generation(measure, cache):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(MODEL, vocab_size=86, block_size=256, dropout=0.0)).to(DEVICE)
    model.eval()
    prompt = torch.randint(0, 86, (4, 32), device=DEVICE)
    new_tokens = 200
    measure(lambda: model.generate(prompt, new_tokens, greedy=True, use_cache=cache == "kv-cache"),
            f"gpt {MODEL} generation of {new_tokens} tokens x 4", cache, rounds=3,
            tokens=4 * new_tokens)

"""Text generation from a trained GPT checkpoint (``examples/gpt/generate.py``)."""
from __future__ import annotations

import argparse
import time

import torch

from pyattn.models.cli import (OneLineParser, nonnegative_int, nucleus_mass, positive_float,
                               positive_int, run_cli, torch_device)
from pyattn.models.gpt import ATTENTION
from pyattn.models.checkpoint import load_checkpoint, model_from_checkpoint

SEPARATOR = "-" * 80


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Sample text from a char-level GPT checkpoint.")
    p.add_argument("--checkpoint", required=True, help="ckpt.pt written by train.py")
    p.add_argument("--prompt", default="Once upon a time",
                   help="non-empty text of characters the model was trained on")
    p.add_argument("--num-samples", type=positive_int, default=5)
    p.add_argument("--max-new-tokens", type=nonnegative_int, default=100)
    p.add_argument("--temperature", type=positive_float, default=1.0)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--top-k", type=positive_int, help="keep the k most likely tokens")
    group.add_argument("--top-p", type=nucleus_mass, help="nucleus: smallest set reaching p")
    group.add_argument("--greedy", action="store_true", help="always the most likely token")
    p.add_argument("--no-cache", action="store_true", help="re-encode the context every token")
    p.add_argument("--attn", choices=ATTENTION, help="override the checkpoint's kernel")
    p.add_argument("--device", type=torch_device,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1337)
    return p


def generate_samples(model, tokenizer, prompt: str, num_samples: int, max_new_tokens: int,
                     temperature: float = 1.0, top_k=None, top_p=None, greedy=False,
                     seed: int = 1337, use_cache: bool = True) -> tuple[list[str], float]:
    """(texts, new tokens per second); each text is prompt + continuation. An empty
    prompt, or one with characters outside the vocabulary, raises UsageError."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode_prompt(prompt)] * num_samples, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    model.eval()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens, temperature, top_k, top_p, greedy, generator,
                         use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = num_samples * max_new_tokens / max(time.perf_counter() - start, 1e-9)
    return [tokenizer.decode(row.tolist()) for row in out], rate


def format_samples(texts: list[str]) -> str:
    """The seed's Q2.8 layout: a dashed line before each sample."""
    return "\n".join(f"{SEPARATOR}\n{text}" for text in texts)


def main(argv=None) -> list[str]:
    """The generation CLI's work; user errors raise (see :func:`cli_main`)."""
    args = build_parser().parse_args(argv)
    model, tokenizer = model_from_checkpoint(load_checkpoint(args.checkpoint), args.device,
                                             args.attn)
    texts, rate = generate_samples(model, tokenizer, args.prompt, args.num_samples,
                                   args.max_new_tokens, args.temperature, args.top_k,
                                   args.top_p, args.greedy, args.seed, not args.no_cache)
    settings = f"temperature: {args.temperature}"
    if args.top_k is not None:
        settings += f", top_k: {args.top_k}"
    if args.top_p is not None:
        settings += f", top_p: {args.top_p}"
    if args.greedy:
        settings = "greedy"
    print(f"Running with prompt: {args.prompt!r}, {settings}")
    print(format_samples(texts))
    print(f"\n({rate:.0f} new tokens/s, {'no ' if args.no_cache else ''}KV cache)")
    return texts


def cli_main(argv=None) -> int:
    """``examples/gpt/generate.py``: exit status 0, or 1 with one stderr line for a user error."""
    return run_cli(main, argv)

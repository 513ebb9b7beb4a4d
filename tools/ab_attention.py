"""Same-process A/B of the CPU attention ops: torch.ops.pyattn (this tree)
against torch.ops.pyattn_base (an earlier commit built by tools/ab_baseline.sh)
and SDPA's flash kernel, calls interleaved (the order alternating per round).
pyattn runs as raw ops (forward op, then backward op); SDPA through autograd.
Prints per case the three medians (ms) and the ratios now / base and SDPA / now.

    python tools/ab_attention.py BASELINE_SO [--seqs 256 1024 4096] [--json FILE]
"""
import argparse
import itertools
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyattn  # noqa: F401  (registers torch.ops.pyattn)


def rounds_for(seq_q, seq_k):
    work = seq_q * seq_k
    return 21 if work <= 256 * 256 else (9 if work <= 1024 * 1024 else 5)


def case(passes, batch, heads, kv_heads, seq_q, seq_k, dim, causal):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, seq_q, dim)
    k, v = (torch.randn(batch, kv_heads, seq_k, dim) for _ in range(2))
    grad = torch.randn_like(q)
    scale = dim ** -0.5

    def raw(ns):
        def run():
            out, lse = ns.flash_attention_forward(q, k, v, causal, scale, 0.0, 0)
            if passes == "forward+backward":
                ns.flash_attention_backward(grad, q, k, v, out, lse, causal, scale, 0.0, 0)
        return run

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if passes == "forward":
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                   enable_gqa=heads != kv_heads)
            else:
                out = F.scaled_dot_product_attention(*leaves, is_causal=causal,
                                                     enable_gqa=heads != kv_heads)
                torch.autograd.grad(out, leaves, grad)

    fns = {"now": raw(torch.ops.pyattn), "base": raw(torch.ops.pyattn_base), "sdpa": sdpa}
    for fn in fns.values():
        fn()  # warm up
    times = {key: [] for key in fns}
    for r in range(rounds_for(seq_q, seq_k)):
        for key in list(fns) if r % 2 else list(fns)[::-1]:
            start = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="library built by tools/ab_baseline.sh")
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--json", help="also write the medians to this file")
    opts = parser.parse_args()
    torch.ops.load_library(opts.baseline)
    cases = [(passes, 1, 8, 8, seq, seq, dim, causal) for passes, seq, dim, causal in
             itertools.product(("forward", "forward+backward"), opts.seqs, (64, 128),
                               (False, True))]
    cases += [("forward", 4, 8, 8, 1, 1024, 64, False), ("forward", 4, 8, 8, 1, 4096, 64, False),
              ("forward", 1, 8, 2, 1024, 1024, 64, True),
              ("forward+backward", 1, 8, 2, 1024, 1024, 64, True)]
    rows = []
    for args in cases:
        passes, batch, heads, kv_heads, seq_q, seq_k, dim, causal = args
        med = case(*args)
        name = (f"{passes} B{batch} H{heads}/{kv_heads} {seq_q}x{seq_k} d{dim} "
                f"{'causal' if causal else 'full'}")
        rows.append(dict(name=name, **med))
        print(f"{name:48s} now {med['now']:8.2f} base {med['base']:8.2f} "
              f"sdpa {med['sdpa']:8.2f} | now/base {med['now'] / med['base']:.2f} "
              f"sdpa/now {med['sdpa'] / med['now']:.2f}", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

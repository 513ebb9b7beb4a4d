"""Same-process A/B of the padded-conv ops: torch.ops.pyattn (this tree)
against torch.ops.pyattn_base (an earlier commit built by tools/ab_baseline.sh),
calls interleaved (the order alternating per round), for Net1's four layers at
batch 200 or the large layer. Prints per pass the median (and min) of both,
the ratio of medians and the largest relative difference of the results.

    python tools/ab_padded_conv.py BASELINE_SO --mode reflect --rounds 21 [--large]
"""
import argparse
import statistics
import time

import torch

import pyattn  # noqa: F401  (registers torch.ops.pyattn)

NET1 = [("conv1", 200, 3, 32, 32, 1), ("conv2", 200, 32, 32, 34, 2),
        ("conv3", 200, 32, 64, 18, 2), ("conv4", 200, 64, 64, 10, 2)]
LARGE = [("large", 64, 64, 64, 128, 1)]


def call(ns, which, x, w, grad, args):
    if which == "forward":
        return ns.padded_conv2d(x, w, None, *args)
    if which == "grad_input":
        return ns.padded_conv2d_grad_input(grad, x, w, *args)
    return ns.padded_conv2d_grad_weight(grad, x, w, *args)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="library built by tools/ab_baseline.sh")
    parser.add_argument("--mode", default="reflect",
                        choices=["zeros", "reflect", "replicate", "circular"])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--large", action="store_true", help="the 64->64, 128x128 layer")
    opts = parser.parse_args()
    torch.ops.load_library(opts.baseline)
    impls = {"new": torch.ops.pyattn, "base": torch.ops.pyattn_base}
    totals = {"new": 0.0, "base": 0.0}
    for name, batch, c_in, c_out, size, stride in LARGE if opts.large else NET1:
        x = torch.randn(batch, c_in, size, size)
        w = torch.randn(c_out, c_in, 3, 3)
        args = ([stride, stride], [2, 2, 2, 2], [1, 1], 1, opts.mode)
        grad = torch.randn_like(call(impls["new"], "forward", x, w, None, args))
        for which in ("forward", "grad_input", "grad_weight"):
            if which == "grad_input" and c_in == 3:  # Net1's input needs no gradient
                continue
            ours, theirs = (call(impls[k], which, x, w, grad, args) for k in ("new", "base"))
            diff = ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1)).item()
            times = {"new": [], "base": []}
            for r in range(opts.rounds):
                for key in ("new", "base") if r % 2 else ("base", "new"):
                    start = time.perf_counter()
                    call(impls[key], which, x, w, grad, args)
                    times[key].append(time.perf_counter() - start)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            low = {k: min(v) * 1e3 for k, v in times.items()}
            for k in totals:
                totals[k] += med[k]
            print(f"{name} {which:11s} base {med['base']:8.2f} (min {low['base']:8.2f})  "
                  f"new {med['new']:8.2f} (min {low['new']:8.2f})  "
                  f"new/base {med['new'] / med['base']:.2f}  rel. diff {diff:.1e}")
    print(f"sum of medians (ms): base {totals['base']:.1f}, new {totals['new']:.1f}, "
          f"new/base {totals['new'] / totals['base']:.2f}")


if __name__ == "__main__":
    main()

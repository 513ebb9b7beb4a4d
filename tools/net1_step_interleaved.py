"""Net1's training step (batch 200, Adadelta) with pyattn.nn.PaddedConv2d
against the same model with nn.Conv2d(padding_mode=...), the two models'
steps alternating in one process (the order alternating per round), so both
see the same machine. Prints per padding mode both medians, their IQR and
torch / pyattn.

    python tools/net1_step_interleaved.py [--rounds 31]
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyattn
from pyattn.studies.cnn_padding import PaddingNet

CONV_TYPE = {"zeros": "fconv", "reflect": "reflect", "replicate": "replicate",
             "circular": "circular"}


def training_step(conv):
    model = PaddingNet("Net1", conv[0], conv[1])
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.9, eps=1e-6,
                                     weight_decay=5e-5)
    x, y = torch.randn(200, 3, 32, 32), torch.randint(0, 2, (200,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=31)
    opts = parser.parse_args()
    for mode, conv_type in CONV_TYPE.items():
        torch.manual_seed(0)
        steps = {impl: training_step((conv_type, conv)) for impl, conv in
                 (("pyattn", pyattn.nn.PaddedConv2d), ("torch", nn.Conv2d))}
        for step in steps.values():
            for _ in range(3):
                step()  # warm up
        times = {impl: [] for impl in steps}
        for r in range(opts.rounds):
            for impl in list(steps) if r % 2 else list(steps)[::-1]:
                start = time.perf_counter()
                steps[impl]()
                times[impl].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        iqr = {k: (lambda q: q[2] - q[0])(statistics.quantiles(v, n=4)) * 1e3 / med[k]
               for k, v in times.items()}
        print(f"{mode:10s} pyattn {med['pyattn']:7.1f} ms (IQR {iqr['pyattn']:.0%})  "
              f"torch {med['torch']:7.1f} ms (IQR {iqr['torch']:.0%})  "
              f"torch/pyattn {med['torch'] / med['pyattn']:.2f}x", flush=True)


if __name__ == "__main__":
    main()

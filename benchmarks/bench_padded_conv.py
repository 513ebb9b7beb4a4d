"""padded_conv2d vs nn.Conv2d(padding_mode=...) (which pads by copying the input).

Net1's layers (batch 200, 32x32 inputs, padding 2; zeros = fconv), Net1's whole
training step, and one larger layer (batch 64, 64->64, 128x128), forward and
forward+backward, time and peak memory.

    python -m pytest benchmarks/bench_padded_conv.py --benchmark-only
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyattn
from pyattn.studies.cnn_padding import PaddingNet
from conftest import DEVICE

MODES = ["zeros", "reflect", "replicate", "circular"]
IMPLS = {"pyattn": pyattn.nn.PaddedConv2d, "torch": nn.Conv2d}
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
# (name, batch, c_in, c_out, size, stride): Net1 at padding 2, then a large layer.
LAYERS = [("net1.conv1", 200, 3, 32, 32, 1), ("net1.conv2", 200, 32, 32, 34, 1),
          ("net1.conv3", 200, 32, 64, 36, 1), ("net1.conv4", 200, 64, 64, 38, 2),
          ("large", 64, 64, 64, 128, 1)]
CONV_TYPE = {"zeros": "fconv", "reflect": "reflect", "replicate": "replicate",
             "circular": "circular"}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("passes", ["forward", "forward+backward"])
@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_layer(measure, layer, passes, mode, impl):
    name, batch, c_in, c_out, size, stride = layer
    torch.manual_seed(0)
    conv = IMPLS[impl](c_in, c_out, 3, stride, 2, bias=False, padding_mode=mode)
    conv = conv.to(DEVICE, DTYPE)
    x = torch.randn(batch, c_in, size, size, device=DEVICE, dtype=DTYPE,
                    requires_grad=passes != "forward" and c_in > 3)
    if passes == "forward":
        def step():
            with torch.no_grad():
                return conv(x)
    else:
        grad = torch.randn_like(conv(x))

        def step():
            conv.weight.grad = None
            conv(x).backward(grad)
    rounds = 3 if name == "large" else 5
    measure(step, f"padded_conv {name} {passes} {mode}", impl, rounds=rounds)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
def test_net1_training_step(measure, mode, impl):
    torch.manual_seed(0)
    model = PaddingNet("Net1", CONV_TYPE[mode], IMPLS[impl]).to(DEVICE)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.9, eps=1e-6,
                                     weight_decay=5e-5)
    x = torch.randn(200, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 2, (200,), device=DEVICE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    measure(step, f"padded_conv Net1 training step {mode}", impl, rounds=5)

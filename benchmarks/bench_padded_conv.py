"""padded_conv2d vs nn.Conv2d(padding_mode=...) (which pads by copying the input).

Net1's layers (batch 200, 32x32 inputs, padding 2, strides 1, 2, 2, 2; zeros =
fconv), Net1's whole training step, and one larger layer (batch 64, 64->64,
128x128), forward and forward+backward, time and peak memory. Each case records
its floating-point operations in extra_info["flops"] (2 N Cout Ho Wo Cin/groups
KH KW per pass; forward+backward = 3 passes, 2 when the input needs no
gradient) so GFLOP/s can be reported. Cases whose id contains ``headline`` are
the few cheap GPU cases of ``benchmarks/gpu_check.sh``. The padding-cost cases
pair pyattn's reflect / replicate / circular modes with its own zeros mode on
Net1's step and the large layer.

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
# Net1: 32x32 -> conv1 (stride 1, pad 2, k 3) 34x34 -> conv2 (stride 2) 18x18 ->
# conv3 (stride 2) 10x10 -> conv4 (stride 2) 6x6; each layer's input size is the
# previous output: (size + 2*2 - 3) // stride + 1.
LAYERS = [("net1.conv1", 200, 3, 32, 32, 1), ("net1.conv2", 200, 32, 32, 34, 2),
          ("net1.conv3", 200, 32, 64, 18, 2), ("net1.conv4", 200, 64, 64, 10, 2),
          ("large", 64, 64, 64, 128, 1)]


def _out_size(size, stride, padding=2, kernel=3):
    return (size + 2 * padding - kernel) // stride + 1


# the chain above is Net1's: every input is the previous layer's output
assert all(_out_size(a[4], a[5]) == b[4] for a, b in zip(LAYERS[:3], LAYERS[1:4]))


def conv_flops(batch, c_in, c_out, size, stride, groups=1, kernel=3):
    """Multiply-adds x 2 of one pass (forward, grad input or grad weight)."""
    out = _out_size(size, stride)
    return 2 * batch * c_out * out * out * c_in // groups * kernel * kernel


def _layer_cases():
    """Every layer x pass x mode; on a GPU the large bf16 layer (fwd+bwd) is a headline case."""
    for layer in LAYERS:
        for passes in ("forward", "forward+backward"):
            for mode in MODES:
                headline = DEVICE.type == "cuda" and layer[0] == "large" and \
                    passes == "forward+backward"
                yield pytest.param(layer, passes, mode,
                                   id=f"{layer[0]}-{passes}-{mode}" + ("-headline" if headline else ""))
CONV_TYPE = {"zeros": "fconv", "reflect": "reflect", "replicate": "replicate",
             "circular": "circular"}


def layer_step(impl, layer, passes, mode):
    """One call of the layer's forward (or forward + backward) with ``impl``'s conv."""
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
        return step
    grad = torch.randn_like(conv(x))

    def step():
        conv.weight.grad = None
        conv(x).backward(grad)
    return step


def partner(impl, make_step):
    """pyattn's rows alternate their rounds with nn.Conv2d's (conftest.measure)."""
    return ("torch", make_step("torch")) if impl == "pyattn" else None


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layer, passes, mode", list(_layer_cases()))
def test_layer(measure, layer, passes, mode, impl):
    name, batch, c_in, c_out, size, stride = layer
    flops = conv_flops(batch, c_in, c_out, size, stride)
    if passes != "forward":
        flops *= 3 if c_in > 3 else 2  # the first layer's input needs no gradient
    make_step = lambda impl_: layer_step(impl_, layer, passes, mode)
    measure(make_step(impl), f"padded_conv {name} {passes} {mode}", impl,
            rounds=3 if name == "large" else 5, partner=partner(impl, make_step),
            flops=flops, dtype=str(DTYPE))


NET1_STEP_FLOPS = sum(conv_flops(*layer[1:]) * (2 if layer[2] == 3 else 3)
                      for layer in LAYERS[:4])  # conv1's input needs no gradient


def net1_step(impl, mode):
    """One Net1 training step (forward, backward, Adadelta) with ``impl``'s convs."""
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
    return step


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", [pytest.param(m, id=m + ("-headline" if DEVICE.type == "cuda"
                                                          else "")) for m in MODES])
def test_net1_training_step(measure, mode, impl):
    make_step = lambda impl_: net1_step(impl_, mode)
    measure(make_step(impl), f"padded_conv Net1 training step {mode}", impl, rounds=5,
            partner=partner(impl, make_step), flops=NET1_STEP_FLOPS)


PADDING_COST_SHAPES = ["Net1 training step", "large forward", "large forward+backward"]


@pytest.mark.parametrize("mode", MODES[1:])
@pytest.mark.parametrize("shape", PADDING_COST_SHAPES)
def test_padding_cost(measure, shape, mode):
    """pyattn in a padding mode paired with pyattn's zeros mode of the same
    shape (issue 12: the padding should cost nothing, i.e. a paired speedup of
    at least 1.0x over "pyattn zeros")."""
    if shape == "Net1 training step":
        make_step = lambda mode_: net1_step("pyattn", mode_)
        info = dict(rounds=5, flops=NET1_STEP_FLOPS)
    else:
        layer, passes = LAYERS[-1], shape.split()[1]
        make_step = lambda mode_: layer_step("pyattn", layer, passes, mode_)
        info = dict(rounds=3, flops=conv_flops(*layer[1:]) * (1 if passes == "forward" else 3),
                    dtype=str(DTYPE))
    measure(make_step(mode), f"padded_conv padding cost {shape} {mode}", "pyattn",
            partner=("pyattn zeros", make_step("zeros")), **info)

"""pyattn.ops.autograd_kernel.call: the Python API's calls skip the Autograd
kernel only where it has nothing to record, and give the same results."""
import pytest
import torch
from torch.autograd import forward_ad

import pyattn
from pyattn.ops import autograd_kernel


def test_records_nothing_only_without_gradients_tangents_or_transforms():
    plain, leaf = torch.randn(3), torch.randn(3, requires_grad=True)
    assert autograd_kernel.records_nothing((plain, "sum", None, 2))
    assert not autograd_kernel.records_nothing((plain, leaf))
    with torch.no_grad():
        assert autograd_kernel.records_nothing((plain, leaf))
    with forward_ad.dual_level():
        assert not autograd_kernel.records_nothing((plain,))
    seen = []
    torch.func.vmap(lambda t: seen.append(autograd_kernel.records_nothing((t,))) or t)(
        torch.randn(2, 3))
    assert seen == [False]


def spmm_problem():
    rowptr = torch.tensor([0, 2, 2, 5])
    col = torch.tensor([0, 2, 1, 1, 0])
    return rowptr, col, torch.randn(3, 4, dtype=torch.float64)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("requires_grad", [True, False], ids=["leaf", "plain"])
def test_api_call_records_exactly_when_autograd_would(grad_mode, requires_grad):
    rowptr, col, x = spmm_problem()
    x.requires_grad_(requires_grad)
    with torch.set_grad_enabled(grad_mode):
        out = pyattn.spmm(rowptr, col, x, reduce="mean")
        raw, _ = torch.ops.pyattn.spmm_csr(rowptr, col, None, x, "mean", True, None, None, None)
    assert torch.equal(out, raw)
    assert out.requires_grad == (grad_mode and requires_grad)
    assert (out.grad_fn is None) == (not (grad_mode and requires_grad))


def test_api_call_keeps_the_tangent_of_a_dual_input():
    rowptr, col, x = spmm_problem()
    dx = torch.randn_like(x)
    with torch.no_grad(), forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(
            pyattn.spmm(rowptr, col, forward_ad.make_dual(x, dx))).tangent
    assert torch.equal(tangent, pyattn.spmm(rowptr, col, dx))


@pytest.mark.parametrize("op", ["attention", "conv"])
def test_api_calls_of_the_other_ops_match_their_raw_ops(op):
    torch.manual_seed(0)
    if op == "attention":
        q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64) for _ in range(3))
        want, _ = torch.ops.pyattn.flash_attention_forward(q, k, v, True, 0.5, 0.0, 0)
        got = pyattn.flash_attention(q, k, v, causal=True, scale=0.5)
    else:
        x, w = torch.randn(2, 3, 7, 7, dtype=torch.float64), torch.randn(4, 3, 3, 3,
                                                                          dtype=torch.float64)
        want = torch.ops.pyattn.padded_conv2d(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1,
                                              "reflect")
        got = pyattn.padded_conv2d(x, w, padding=1, padding_mode="reflect")
    assert torch.equal(got, want)

"""Property-based fuzz of padded_conv2d against F.conv2d(F.pad(...)) (issue 11).

Each drawn case (shape, stride, dilation, groups, per-side padding, mode, dtype,
memory layout of the input incl. expanded / overlapping views, NaN / Inf
values) either matches the float64 reference in forward and all gradients (NaN
positions equal) or raises a Python exception where the reference raises too
(or for a dtype the CPU kernels do not have). Outcomes are counted with
hypothesis.event: run with ``--hypothesis-show-statistics`` to see them.
The ci profile (default) tries 40 cases; HYPOTHESIS_PROFILE=fuzz, 1500.
"""
import pytest
import torch
from hypothesis import event, given, strategies as st

from padded_conv_reference import reference_allowing_empty_channels
from pyattn.ops.padded_conv import padded_conv2d

LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced", "expanded", "overlapping"]
CPU_UNSUPPORTED = (torch.float16, torch.bfloat16)


def _view(base_shape, layout, dtype, draw_seed):
    """A leaf tensor and an input view of shape base_shape laid out as `layout`."""
    gen = torch.Generator().manual_seed(draw_seed)
    n, c, h, w = base_shape
    if layout == "expanded":  # one sample repeated: batch stride 0
        leaf = torch.randn(1, c, h, w, generator=gen, dtype=dtype)
        return leaf, lambda t: t.expand(n, c, h, w)
    if layout == "overlapping":  # consecutive rows share w - 1 elements
        leaf = torch.randn(n * c * (h + w) + 1, generator=gen, dtype=dtype)
        return leaf, lambda t: t.as_strided((n, c, h, w), (c * (h + w), h + w, 1, 1))
    if layout == "transposed":
        leaf = torch.randn(n, c, w, h, generator=gen, dtype=dtype)
        return leaf, lambda t: t.transpose(2, 3)
    if layout == "sliced":
        leaf = torch.randn(n, c, h, 2 * w, generator=gen, dtype=dtype)
        return leaf, lambda t: t[..., ::2]
    leaf = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    if layout == "channels_last":
        return leaf, lambda t: t.contiguous(memory_format=torch.channels_last)
    return leaf, lambda t: t


def _poison(t, which, gen):
    """Put a NaN or +-Inf at one random element (in place, before requires_grad)."""
    if which == "finite" or t.numel() == 0:
        return
    value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[which]
    t.view(-1)[torch.randint(t.numel(), (1,), generator=gen)] = value


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    case = dict(
        batch=draw(st.integers(0, 3)), cin=groups * draw(st.integers(0, 3)),
        cout=groups * draw(st.integers(1, 3)), groups=groups,
        h=draw(st.integers(1, 9)), w=draw(st.integers(1, 9)),
        kernel=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=tuple(draw(st.integers(0, 3)) for _ in range(4)),
        mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.float64, torch.float16])),
        layout=draw(st.sampled_from(LAYOUTS)), bias=draw(st.booleans()),
        poison=draw(st.sampled_from(["finite", "finite", "nan", "inf", "-inf"])),
        poisoned=draw(st.sampled_from(["input", "weight"])), seed=draw(st.integers(0, 2**31)))
    return case


def _run(conv, x, w, b, case):
    return conv(x, w, b, case["stride"], case["padding"], case["dilation"], case["groups"],
                case["mode"])


@pytest.mark.fuzz
@given(case=conv_cases())
def test_fuzz_matches_reference_or_raises(case):
    dtype = case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    leaf, make_view = _view((case["batch"], case["cin"], case["h"], case["w"]), case["layout"],
                            dtype, case["seed"])
    weight = torch.randn(case["cout"], case["cin"] // case["groups"], *case["kernel"],
                         generator=gen, dtype=dtype)
    bias = torch.randn(case["cout"], generator=gen, dtype=dtype) if case["bias"] else None
    _poison(leaf if case["poisoned"] == "input" else weight, case["poison"], gen)
    leaves = [t for t in (leaf, weight, bias) if t is not None]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ours = [t.detach().requires_grad_() for t in leaves]
    try:
        ref = _run(reference_allowing_empty_channels, make_view(exact[0]), exact[1],
                   exact[2] if bias is not None else None, case)
    except (RuntimeError, ValueError) as e:
        ref, ref_error = None, e
    try:
        out = _run(padded_conv2d, make_view(ours[0]), ours[1],
                   ours[2] if bias is not None else None, case)
    except (RuntimeError, ValueError, TypeError) as e:
        assert ref is None or dtype in CPU_UNSUPPORTED, f"pyattn raised, reference did not: {e}"
        event("raised" + (" (dtype not on CPU)" if ref is not None else " like the reference"))
        return
    assert ref is not None, f"reference raised ({ref_error}), pyattn returned {out.shape}"
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    got = [out, *torch.autograd.grad(out, ours, grad)] if out.numel() else [out]
    want = [ref, *torch.autograd.grad(ref, exact, grad.double())] if out.numel() else [ref]
    for name, g, r in zip(["output", "grad input", "grad weight", "grad bias"], got, want):
        finite = r[r.isfinite()]
        scale = max(finite.abs().max().item(), 1.0) if finite.numel() else 1.0
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * scale, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    event(f"matched ({case['poison']})")

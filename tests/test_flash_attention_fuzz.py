"""Property-based fuzz of flash_attention against float64 math attention (issue 11).

Each drawn case (batch, heads / kv_heads incl. grouped-query, seq_q, seq_k incl.
0 and 1, head_dim, causal, scale, dtype, the memory layout of each of q, k, v
incl. expanded and overlapping views, dropout, a NaN / Inf at a random element,
or a malformed argument) either matches the reference in the forward and, for
finite inputs, all three gradients, or raises a Python exception (malformed
arguments must raise). Non-finite inputs are compared with the reference that
only ever touches the keys each query sees (`attention_visible_only`), so a NaN
at a masked-out position must not reach any output. Outcomes are counted with
hypothesis.event (``--hypothesis-show-statistics``). The ci profile (default)
tries 40 cases; HYPOTHESIS_PROFILE=fuzz, 1500.
"""
import pytest
import torch
from hypothesis import event, given, strategies as st

import pyattn
from pyattn import reference
from pyattn.ops.flash_attention import _draw_seed

LAYOUTS = ["contiguous", "seq_major", "sliced", "expanded", "overlapping"]
MALFORMED = ["q_3d", "head_dim_differs", "head_dim_not_multiple_of_8", "heads_not_multiple",
             "batch_differs", "dtype_differs", "integer_dtype", "k_on_meta", "kv_shape_differs",
             "dropout_p_1", "dropout_p_negative", "scale_nan", "backend_unknown"]


def _view(shape, layout, dtype, gen):
    """A leaf tensor and a function giving the (B, H, N, D) input view of it."""
    b, h, n, d = shape
    if layout == "seq_major":  # stored (B, N, H, D), as after a linear projection
        leaf = torch.randn(b, n, h, d, generator=gen, dtype=dtype)
        return leaf, lambda t: t.transpose(1, 2)
    if layout == "sliced":  # every other element of the last dim: stride 2
        leaf = torch.randn(b, h, n, 2 * d, generator=gen, dtype=dtype)
        return leaf, lambda t: t[..., ::2]
    if layout == "expanded":  # one batch entry repeated: batch stride 0
        leaf = torch.randn(1, h, n, d, generator=gen, dtype=dtype)
        return leaf, lambda t: t.expand(b, h, n, d)
    if layout == "overlapping":  # consecutive rows share d - 1 elements
        leaf = torch.randn(b * h * (n + d) + 1, generator=gen, dtype=dtype)
        return leaf, lambda t: t.as_strided((b, h, n, d), (h * (n + d), n + d, 1, 1))
    leaf = torch.randn(b, h, n, d, generator=gen, dtype=dtype)
    return leaf, lambda t: t


@st.composite
def attention_cases(draw):
    kv_heads = draw(st.integers(1, 3))
    backend = draw(st.sampled_from(["cpp", "cpp", "cpp", "triton"]))
    case = dict(
        batch=draw(st.integers(0, 2)), kv_heads=kv_heads,
        heads=kv_heads * draw(st.integers(1, 3)),
        seq_q=draw(st.sampled_from([0, 1, 2, 7, 16, 33])),
        seq_k=draw(st.sampled_from([0, 1, 3, 7, 16, 40])),
        head_dim=draw(st.sampled_from([8, 16, 24, 40, 64])),
        causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        backend=backend,
        dtype=torch.float32 if backend == "triton" else
        draw(st.sampled_from([torch.float32, torch.float64])),
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        # non-finite values on the cpp backend without dropout (the visible-only
        # reference has none); dropout on the cpp backend (the reference rebuilds its mask)
        poison=draw(st.sampled_from(["finite", "finite", "nan", "inf", "-inf"]))
        if backend == "cpp" else "finite",
        poisoned=draw(st.integers(0, 2)),
        malformed=draw(st.sampled_from(MALFORMED)) if draw(st.integers(0, 3)) == 0 else None,
        seed=draw(st.integers(0, 2**31)))
    case["dropout_p"] = draw(st.sampled_from([0.0, 0.0, 0.2, 0.5])) \
        if backend == "cpp" and case["poison"] == "finite" else 0.0
    return case


def _inputs(case, gen):
    """Leaves (q, k, v) and their views, with the case's poison and malformation."""
    b, h, kvh, d = case["batch"], case["heads"], case["kv_heads"], case["head_dim"]
    shapes = [(b, h, case["seq_q"], d), (b, kvh, case["seq_k"], d), (b, kvh, case["seq_k"], d)]
    bad = case["malformed"]
    if bad == "head_dim_differs":
        shapes[0] = (*shapes[0][:3], d + 8)
    elif bad == "head_dim_not_multiple_of_8":
        shapes = [(*s[:3], d + 3) for s in shapes]
    elif bad == "heads_not_multiple":
        shapes[1] = shapes[2] = (b, h + 1, case["seq_k"], d)
    elif bad == "batch_differs":
        shapes[1] = shapes[2] = (b + 1, kvh, case["seq_k"], d)
    elif bad == "kv_shape_differs":
        shapes[2] = (b, kvh, case["seq_k"] + 1, d)
    leaves, views = [], []
    for shape, layout in zip(shapes, case["layouts"]):
        leaf, view = _view(shape, layout, case["dtype"], gen)
        leaves.append(leaf)
        views.append(view)
    poisoned = leaves[case["poisoned"]]
    if case["poison"] != "finite" and poisoned.numel():
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[case["poison"]]
        poisoned.view(-1)[torch.randint(poisoned.numel(), (1,), generator=gen)] = value
    if bad == "dtype_differs":
        leaves[1] = leaves[1].to(torch.float64 if case["dtype"] == torch.float32 else torch.float32)
    elif bad == "integer_dtype":
        leaves = [t.to(torch.int32) for t in leaves]
    elif bad == "k_on_meta":
        leaves[1] = leaves[1].to("meta")
    return leaves, views


def _kwargs(case):
    bad = case["malformed"]
    kwargs = dict(causal=case["causal"], scale=case["scale"], dropout_p=case["dropout_p"],
                  backend=case["backend"])
    if bad == "dropout_p_1":
        kwargs["dropout_p"] = 1.0
    elif bad == "dropout_p_negative":
        kwargs["dropout_p"] = -0.1
    elif bad == "scale_nan":
        kwargs["scale"] = float("nan")
    elif bad == "backend_unknown":
        kwargs["backend"] = "cudnn"
    return kwargs


@pytest.mark.fuzz
@given(case=attention_cases())
def test_fuzz_matches_reference_or_raises(case):
    gen = torch.Generator().manual_seed(case["seed"])
    leaves, views = _inputs(case, gen)
    ours = [t.detach().requires_grad_(t.is_floating_point()) for t in leaves]
    q, k, v = (view(t) for view, t in zip(views, ours))
    if case["malformed"] == "q_3d":
        q = q[0] if q.shape[0] else q.sum(0)
    try:
        out = pyattn.flash_attention(q, k, v, generator=torch.Generator().manual_seed(1),
                                     **_kwargs(case))
    except (RuntimeError, ValueError, TypeError) as e:
        assert case["malformed"] is not None, f"a well-formed case raised: {e!r}"
        event(f"raised ({case['malformed']})")
        return
    assert case["malformed"] is None, f"{case['malformed']}: no exception, output {out.shape}"
    assert out.shape == q.shape and out.dtype == q.dtype

    exact = [t.detach().double().requires_grad_() for t in leaves]
    qd, kd, vd = (view(t) for view, t in zip(views, exact))
    scale = case["scale"]
    if case["poison"] != "finite":
        want = reference.attention_visible_only(qd, kd, vd, case["causal"], scale)
    else:
        seed = _draw_seed(torch.Generator().manual_seed(1)) if case["dropout_p"] else 0
        want, _ = reference.attention(qd, kd, vd, case["causal"], scale, case["dropout_p"], seed)
    tol = 1e-9 if case["dtype"] == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol, equal_nan=True)
    if case["poison"] != "finite" or out.numel() == 0:
        event(f"matched forward ({case['poison']})")
        return
    grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    got = torch.autograd.grad(out, ours, grad)
    expected = torch.autograd.grad(want, exact, grad.double())
    grad_tol = 1e-9 if case["dtype"] == torch.float64 else 2e-4
    for name, g, w in zip("qkv", got, expected):
        torch.testing.assert_close(g.double(), w, rtol=grad_tol, atol=grad_tol,
                                   msg=lambda m: f"d{name}: {m}")
    event(f"matched forward and gradients ({case['backend']}"
          f"{', dropout' if case['dropout_p'] else ''})")

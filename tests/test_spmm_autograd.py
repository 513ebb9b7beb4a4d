"""spmm's higher derivatives and forward mode: gradgradcheck (sum / mean, in x
and values), jvp against finite differences of the reference, a clear error
for what is not supported (max / min second derivative), and the mean's 1/degree
computed in float32 for half dtypes (issue 10)."""
import pytest
import torch
from torch.autograd import forward_ad

import pyattn
from pyattn import reference
from pyattn.ops.spmm import csr_transpose, mean_scale, transposed_weights
from test_spmm import random_csr


@pytest.fixture
def problem():
    rowptr, col = random_csr(9, 7, 0.4, seed=3)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(col.numel(), dtype=torch.float64, requires_grad=True)
    return rowptr, col, x, values


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gradgradcheck(problem, reduce):
    rowptr, col, x, values = problem
    assert torch.autograd.gradgradcheck(
        lambda x, v: pyattn.spmm(rowptr, col, x, v, reduce), (x, values))
    assert torch.autograd.gradgradcheck(
        lambda x: pyattn.spmm(rowptr, col, x, None, reduce), (x,))
    transpose = csr_transpose(rowptr, col, 7)
    assert torch.autograd.gradgradcheck(  # with a cached transpose, and the op itself
        lambda x, v: torch.ops.pyattn.spmm_csr(rowptr, col, v, x, reduce, True, *transpose)[0],
        (x, values))


def test_third_derivative_matches_reference(problem):
    rowptr, col, x, values = problem

    def third(fn):
        out = fn(x, values)
        g, = torch.autograd.grad((out ** 2).sum(), values, create_graph=True)
        h, = torch.autograd.grad((g ** 2).sum(), x, create_graph=True)
        return torch.autograd.grad(h.sum(), values)[0]

    got = third(lambda x, v: pyattn.spmm(rowptr, col, x, v, "mean"))
    want = third(lambda x, v: reference.spmm(rowptr, col, x, v, "mean"))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_max_min_second_derivative_raises(problem, reduce):
    rowptr, col, x, values = problem
    out = pyattn.spmm(rowptr, col, x, values, reduce)
    g, = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="reduce='max' / 'min' supports first derivatives"):
        torch.autograd.grad(g.sum(), values)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("weighted", [False, True])
def test_jvp_matches_reference(problem, reduce, weighted):
    rowptr, col, x, values = problem
    x, values = x.detach(), values.detach()
    dx, dv = torch.randn_like(x), torch.randn_like(values)
    if weighted:
        primals, tangents = (x, values), (dx, dv)
        ours = lambda x, v: pyattn.spmm(rowptr, col, x, v, reduce)
        ref = lambda x, v: reference.spmm(rowptr, col, x, v, reduce)
    else:
        primals, tangents = (x,), (dx,)
        ours = lambda x: pyattn.spmm(rowptr, col, x, None, reduce)
        ref = lambda x: reference.spmm(rowptr, col, x, None, reduce)
    out, tangent = torch.func.jvp(ours, primals, tangents)
    want_out, want_tangent = torch.func.jvp(ref, primals, tangents)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(tangent, want_tangent)
    with forward_ad.dual_level():  # the forward_ad API gives the same tangent
        dual = ours(*[forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)])
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, want_tangent)


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_jvp_of_the_raw_op_and_under_compile(problem, reduce):
    """The tangent comes from the op's own Autograd kernel: a raw torch.ops call
    and a compiled graph get it too, not an output without one."""
    rowptr, col, x, values = problem
    x, values = x.detach(), values.detach()
    dx = torch.randn_like(x)
    _, want = torch.func.jvp(lambda x: reference.spmm(rowptr, col, x, values, reduce), (x,),
                             (dx,))
    raw = lambda x: torch.ops.pyattn.spmm_csr(rowptr, col, values, x, reduce, True,
                                              None, None, None)[0]
    _, got = torch.func.jvp(raw, (x,), (dx,))
    torch.testing.assert_close(got, want)
    compiled = torch.compile(lambda x: pyattn.spmm(rowptr, col, x, values, reduce),
                             fullgraph=True)
    with forward_ad.dual_level():
        dual = compiled(forward_ad.make_dual(x, dx))
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, want)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_forward_over_reverse_matches_reference(problem, reduce):
    """Hessian-vector product in `values` and `x` (forward mode through the
    backward, whose edge-gradient op has its own jvp)."""
    rowptr, col, x, values = problem
    primals = (x.detach(), values.detach())
    tangents = tuple(torch.randn_like(p) for p in primals)

    def hvp(fn):
        def loss(x, v):
            return fn(rowptr, col, x, v, reduce).sin().sum()
        return torch.func.jvp(torch.func.grad(loss, argnums=(0, 1)), primals, tangents)[1]

    with pytest.raises(NotImplementedError, match="nested torch.func transforms"):
        hvp(pyattn.spmm)
    want = hvp(reference.spmm)
    with forward_ad.dual_level():
        x, v = (forward_ad.make_dual(p, t).requires_grad_() for p, t in zip(primals, tangents))
        grads = torch.autograd.grad(pyattn.spmm(rowptr, col, x, v, reduce).sin().sum(), (x, v),
                                    create_graph=True)
        got = tuple(forward_ad.unpack_dual(g).tangent for g in grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_jvp_tangent_is_not_silently_zero(problem, monkeypatch):
    """The jvp check above fails if the rule drops the values tangent."""
    rowptr, col, x, values = problem
    from pyattn.ops import spmm as spmm_module
    real = spmm_module._jvp_impl
    monkeypatch.setattr(spmm_module, "_jvp_impl",
                        lambda *a: real(*a[:6], None, a[7]))  # forget d values
    primals = (x.detach(), values.detach())
    tangents = (torch.randn_like(primals[0]), torch.randn_like(primals[1]))
    _, got = torch.func.jvp(lambda x, v: pyattn.spmm(rowptr, col, x, v, "sum"), primals, tangents)
    _, want = torch.func.jvp(lambda x, v: reference.spmm(rowptr, col, x, v, "sum"), primals,
                             tangents)
    assert not torch.allclose(got, want)


def test_mean_scale_is_float32_for_bfloat16_and_float16_degrees():
    """Issue 10: 1/degree formed in half precision is wrong for bf16 degrees > 256
    (257 rounds to 256) and fp16 degrees > 65504 (inf -> 0). The backward forms
    it in float32 and rounds each edge weight once."""
    lengths = torch.tensor([0, 1, 257, 300, 70000])
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    exact = torch.tensor([0.0] + [1 / n for n in lengths[1:].tolist()], dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        scale = mean_scale(rowptr, dtype)
        assert scale.dtype == torch.float32
        torch.testing.assert_close(scale.double(), exact, rtol=1e-7, atol=0)
    half_way = 1.0 / lengths.to(torch.bfloat16).float()  # the old computation
    assert half_way[2].item() == 1 / 256  # what went wrong before
    # the per-edge weights of the transposed product: 1/length rounded once to bf16
    col = torch.zeros(int(rowptr[-1]), dtype=torch.long)
    weights = transposed_weights(rowptr, csr_transpose(rowptr, col, 1), None, torch.bfloat16,
                                 "mean")
    per_edge = torch.repeat_interleave(exact[1:], lengths[1:]).to(torch.bfloat16)
    assert torch.equal(weights, per_edge)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_edge_grad_opcheck(problem, reduce):
    """The edge-gradient op is itself a differentiable torch op (for double backward)."""
    rowptr, col, x, _ = problem
    grad_out = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.pyattn.spmm_csr_edge_grad,
                          (rowptr, col, x.detach().requires_grad_(), grad_out, reduce))

"""pyattn.spmm against the scatter reference."""
import pytest
import torch

import pyattn
from pyattn import reference
from pyattn.ops.spmm import csr_transpose
from conftest import requires_cuda

REDUCTIONS = ["sum", "mean", "max"]


def random_csr(rows, cols, density, seed=0, empty_rows=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    if empty_rows and rows > 2:
        mask[1] = False  # an isolated node
    counts = mask.sum(1)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    col = mask.nonzero()[:, 1]
    return rowptr.to(device), col.to(device)


def _check(rows, cols, features, reduce, weighted, dtype, device="cpu", tol=None):
    rowptr, col = random_csr(rows, cols, 0.2, seed=rows + cols, device=device)
    x = torch.randn(cols, features, dtype=dtype, device=device, requires_grad=True)
    values = torch.randn(col.numel(), dtype=dtype, device=device, requires_grad=True) \
        if weighted else None
    out = pyattn.spmm(rowptr, col, x, values, reduce)
    xd = x.detach().double().requires_grad_()
    vd = values.detach().double().requires_grad_() if weighted else None
    ref = reference.spmm(rowptr, col, xd, vd, reduce)
    tol = tol or dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else tol or \
        dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn_like(ref)
    inputs = [x] + ([values] if weighted else [])
    ref_inputs = [xd] + ([vd] if weighted else [])
    for g, r in zip(torch.autograd.grad(out, inputs, grad.to(dtype)),
                    torch.autograd.grad(ref, ref_inputs, grad)):
        torch.testing.assert_close(g.double(), r, **tol)


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("features", [1, 3, 7, 64, 1433])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_against_reference(reduce, weighted, features, dtype):
    _check(37, 29, features, reduce, weighted, dtype)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_rectangular_and_single_row(reduce):
    _check(1, 113, 7, reduce, True, torch.float64)
    _check(113, 1, 7, reduce, True, torch.float64)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_empty_rows_give_zero_and_no_edges(reduce):
    rowptr = torch.zeros(5, dtype=torch.long)
    col = torch.zeros(0, dtype=torch.long)
    x = torch.randn(3, 4, requires_grad=True)
    out = pyattn.spmm(rowptr, col, x, reduce=reduce)
    assert torch.equal(out, torch.zeros(4, 4))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gradcheck(reduce):
    rowptr, col = random_csr(9, 7, 0.4, seed=3)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(col.numel(), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: pyattn.spmm(rowptr, col, x, v, reduce), (x, values))
    assert torch.autograd.gradcheck(lambda x: pyattn.spmm(rowptr, col, x, None, reduce), (x,))


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_opcheck(reduce):
    rowptr, col = random_csr(11, 8, 0.3, seed=5)
    x = torch.randn(8, 6, requires_grad=True)
    values = torch.randn(col.numel(), requires_grad=True)
    torch.library.opcheck(torch.ops.pyattn.spmm_csr,
                          (rowptr, col, values, x, reduce, True, None, None, None))
    torch.library.opcheck(torch.ops.pyattn.spmm_csr,
                          (rowptr, col, None, x, reduce, False, *csr_transpose(rowptr, col, 8)))


def test_int32_indices_precomputed_transpose_and_compile():
    rowptr, col = random_csr(20, 15, 0.3, seed=1)
    x = torch.randn(15, 8, requires_grad=True)
    out32 = pyattn.spmm(rowptr.int(), col.int(), x, reduce="mean")
    out = pyattn.spmm(rowptr, col, x, reduce="mean", transpose=csr_transpose(rowptr, col, 15))
    torch.testing.assert_close(out32, out)
    fn = torch.compile(lambda x: pyattn.spmm(rowptr, col, x, reduce="mean").relu().sum(),
                       fullgraph=True)
    torch.testing.assert_close(fn(x), out.relu().sum())
    fn(x).backward()
    assert x.grad is not None


def test_backward_is_deterministic():
    rowptr, col = random_csr(300, 300, 0.05, seed=2)
    x = torch.randn(300, 33, requires_grad=True)
    values = torch.randn(col.numel(), requires_grad=True)
    grads = [torch.autograd.grad(pyattn.spmm(rowptr, col, x, values, "sum").sum(), (x, values))
             for _ in range(3)]
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


@pytest.mark.parametrize("call, error, match", [
    (lambda: pyattn.spmm(torch.tensor([0, 2]), torch.tensor([0, 5]), torch.randn(3, 2)),
     ValueError, r"col` entry must be in \[0, x.size\(0\) = 3\)"),
    (lambda: pyattn.spmm(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.randn(3, 2)),
     ValueError, r"rowptr\[0\]` must be 0"),
    (lambda: pyattn.spmm(torch.tensor([0, 3]), torch.tensor([0, 1]), torch.randn(3, 2)),
     ValueError, r"rowptr\[-1\]"),
    (lambda: pyattn.spmm(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1]), torch.randn(3, 2)),
     ValueError, "non-decreasing"),
    (lambda: pyattn.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.randn(3)),
     ValueError, "`x` must be 2-D"),
    (lambda: pyattn.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.randn(3, 2),
                         torch.randn(2)), ValueError, "one entry per edge"),
    (lambda: pyattn.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.randn(3, 2),
                         torch.randn(1).double()), TypeError, "dtype of `x`"),
    (lambda: pyattn.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.randn(3, 2).half()),
     TypeError, "float32 and float64"),
    (lambda: pyattn.spmm(torch.tensor([0., 1.]), torch.tensor([0]), torch.randn(3, 2)),
     TypeError, "`rowptr` must be int64"),
    (lambda: pyattn.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.randn(3, 2), reduce="min"),
     ValueError, "`reduce` must be one of"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@requires_cuda
@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_against_reference(reduce, dtype):
    tol = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
           torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: None}[dtype]
    for features in (1, 7, 64, 1433):
        _check(53, 41, features, reduce, True, dtype, "cuda", tol)

"""pyattn.spmm against the scatter reference: every reduction, index dtype and
degenerate shape, first derivatives, opcheck, compile, determinism, bad input,
and the CUDA accuracy rule (with mutants that show each check can fail)."""
import pytest
import torch

import pyattn
from pyattn import reference
from pyattn.ops.spmm import csr_transpose
from conftest import requires_cuda

REDUCTIONS = ["sum", "mean", "max", "min"]


def random_csr(rows, cols, density, seed=0, empty_rows=True, device="cpu",
               index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    if empty_rows and rows > 2:
        mask[1] = False  # an isolated node
    counts = mask.sum(1)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    col = mask.nonzero()[:, 1]
    return rowptr.to(device, index_dtype), col.to(device, index_dtype)


def _check(rows, cols, features, reduce, weighted, dtype, device="cpu", tol=None,
           index_dtype=torch.int64):
    rowptr, col = random_csr(rows, cols, 0.2, seed=rows + cols, device=device,
                             index_dtype=index_dtype)
    x = torch.randn(cols, features, dtype=dtype, device=device, requires_grad=True)
    values = torch.randn(col.numel(), dtype=dtype, device=device, requires_grad=True) \
        if weighted else None
    out = pyattn.spmm(rowptr, col, x, values, reduce)
    xd = x.detach().double().requires_grad_()
    vd = values.detach().double().requires_grad_() if weighted else None
    ref = reference.spmm(rowptr, col, xd, vd, reduce)
    if tol is None:
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn_like(ref)
    inputs = [x] + ([values] if weighted else [])
    ref_inputs = [xd] + ([vd] if weighted else [])
    for g, r in zip(torch.autograd.grad(out, inputs, grad.to(dtype)),
                    torch.autograd.grad(ref, ref_inputs, grad)):
        torch.testing.assert_close(g.double(), r, **tol)


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
# 300 float32 features: two 8-vector register blocks of the CPU kernel, a
# 2-vector block and a 12-column tail (float64: blocks of 8, 8, 8, 8, 5 and 4 columns)
@pytest.mark.parametrize("features", [1, 7, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_against_reference(reduce, weighted, features, dtype):
    _check(37, 29, features, reduce, weighted, dtype)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_cora_width_and_int32_indices(reduce):
    _check(23, 19, 1433, reduce, True, torch.float64)
    _check(37, 29, 7, reduce, True, torch.float64, index_dtype=torch.int32)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_rectangular_and_single_row(reduce):
    _check(1, 113, 7, reduce, True, torch.float64)
    _check(113, 1, 7, reduce, True, torch.float64)


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("shape", [(4, 3, 4, 0), (0, 3, 4, 0), (4, 0, 4, 0), (4, 3, 0, 5),
                                   (0, 0, 0, 0)], ids=["no-edges", "no-rows", "no-nodes",
                                                       "F0", "all-empty"])
def test_degenerate_shapes_match_reference(reduce, shape):
    rows, nodes, features, edges = shape
    rowptr = torch.zeros(rows + 1, dtype=torch.long)
    if edges:
        rowptr[-1] = edges
    col = torch.zeros(edges, dtype=torch.long)
    x = torch.randn(nodes if edges == 0 else max(nodes, 1), features, requires_grad=True)
    values = torch.randn(edges, requires_grad=True)
    out = pyattn.spmm(rowptr, col, x, values, reduce)
    ref = reference.spmm(rowptr, col, x, values, reduce)
    assert out.shape == ref.shape == (rows, features)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (x, values), allow_unused=True)
    ref_grads = torch.autograd.grad(ref.sum(), (x, values), allow_unused=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r)


def test_max_min_nan_inf_and_ties():
    rowptr = torch.tensor([0, 3, 5, 7])
    col = torch.tensor([0, 1, 2, 0, 1, 1, 2])
    x = torch.tensor([[1.0, -float("inf")], [float("nan"), -float("inf")], [1.0, 2.0]],
                     dtype=torch.float64, requires_grad=True)
    for reduce in ("max", "min"):
        out = pyattn.spmm(rowptr, col, x, reduce=reduce)
        ref = reference.spmm(rowptr, col, x.detach(), reduce=reduce)
        torch.testing.assert_close(out, ref, equal_nan=True)  # NaN and -inf kept, not zeroed
    # ties: the first edge of the row (edge 0, reading node 1) takes the whole gradient
    ones = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
    out = pyattn.spmm(torch.tensor([0, 2]), torch.tensor([1, 0]), ones, reduce="max")
    grad, = torch.autograd.grad(out.sum(), ones)
    assert out.item() == 1.0 and grad.flatten().tolist() == [0.0, 1.0]


def test_min_sends_gradient_to_the_arg_min_edge():
    rowptr, col = torch.tensor([0, 3]), torch.tensor([0, 1, 2])
    x = torch.tensor([[3.0, 1.0], [2.0, 1.0], [5.0, 0.5]], dtype=torch.float64,
                     requires_grad=True)
    values = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = pyattn.spmm(rowptr, col, x, values, "min")  # terms: [3, 1], [2, 1], [10, 1]
    assert out.tolist() == [[2.0, 1.0]]
    gx, gv = torch.autograd.grad(out.sum(), (x, values))
    # feature 0: edge 1; feature 1: the tie of edges 0, 1, 2 goes to the first, edge 0
    assert gx.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    assert gv.tolist() == [1.0, 2.0, 0.0]


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
    r32, c32 = rowptr.int(), col.int()
    torch.library.opcheck(torch.ops.pyattn.spmm_csr,
                          (r32, c32, None, x, reduce, False, *csr_transpose(r32, c32, 8)))


def test_int32_indices_precomputed_transpose_and_compile():
    rowptr, col = random_csr(20, 15, 0.3, seed=1)
    x = torch.randn(15, 8, requires_grad=True)
    out32 = pyattn.spmm(rowptr.int(), col.int(), x, reduce="mean")
    out = pyattn.spmm(rowptr, col, x, reduce="mean", transpose=csr_transpose(rowptr, col, 15))
    torch.testing.assert_close(out32, out)
    fn = torch.compile(lambda x: pyattn.spmm(rowptr, col, x, reduce="mean").relu().sum(),
                       fullgraph=True)
    torch.testing.assert_close(fn(x), out.relu().sum())
    compiled_grad, = torch.autograd.grad(fn(x), x)
    eager_grad, = torch.autograd.grad(out.relu().sum(), x)
    torch.testing.assert_close(compiled_grad, eager_grad)


# -- determinism: bitwise equal results for fixed thread counts ---------------

def _results_per_thread_count(fn, counts=(1, 2, 3)):
    before = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(before)


def _bitwise_equal(results):
    return all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


def _forward_and_grads(rowptr, col, x, values, reduce):
    out = pyattn.spmm(rowptr, col, x, values, reduce)
    return (out.detach(),) + torch.autograd.grad(out, (x, values), torch.ones_like(out) * 0.37)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_deterministic_for_any_thread_count(reduce):
    rowptr, col = random_csr(300, 300, 0.05, seed=2)
    x = torch.randn(300, 33, requires_grad=True)
    values = torch.randn(col.numel(), requires_grad=True)
    results = _results_per_thread_count(
        lambda: _forward_and_grads(rowptr, col, x, values, reduce))
    assert _bitwise_equal(results)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_rows_split_by_cost_cover_every_row(reduce):
    """The CPU kernel splits rows into ranges of equal edge count (up to 4 per
    thread): a hub row of 4000 edges, runs of empty rows and 2999 short rows,
    at 1, 2 and 3 threads, against the reference."""
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 6, (3000,), generator=gen)
    lengths[1000:1200] = 0
    lengths[1500] = 4000
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    col = torch.randint(0, 700, (int(lengths.sum()),), generator=gen)
    x = torch.randn(700, 37, dtype=torch.float64)
    values = torch.randn(col.numel(), dtype=torch.float64)
    ref = reference.spmm(rowptr, col, x, values, reduce)
    for out in _results_per_thread_count(lambda: pyattn.spmm(rowptr, col, x, values, reduce)):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_determinism_check_catches_a_thread_dependent_kernel(monkeypatch):
    rowptr, col = random_csr(50, 50, 0.1, seed=2)
    x = torch.randn(50, 9, requires_grad=True)
    values = torch.randn(col.numel(), requires_grad=True)
    real = pyattn.spmm

    def thread_dependent(*args, **kwargs):  # a reduction order that follows the threads
        out = real(*args, **kwargs)
        return out * (1 + 1e-7 * torch.get_num_threads())

    monkeypatch.setattr(pyattn, "spmm", thread_dependent)
    results = _results_per_thread_count(
        lambda: _forward_and_grads(rowptr, col, x, values, "sum"))
    assert not _bitwise_equal(results)


# -- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda: pyattn.spmm(torch.tensor([0, 2]), torch.tensor([0, 5]), torch.randn(3, 2)),
     ValueError, r"col` entry must be in \[0, x.size\(0\) = 3\)"),
    (lambda: pyattn.spmm(torch.tensor([0, 2]), torch.tensor([0, -1]), torch.randn(3, 2)),
     ValueError, r"col` entry must be in"),
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
     TypeError, "`rowptr` must be int64 or int32"),
    (lambda: pyattn.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.randn(3, 2), reduce="prod"),
     ValueError, "`reduce` must be one of"),
    (lambda: pyattn.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.randn(3, 2, device="meta")),
     RuntimeError, "must be on the device of `x`"),
    (lambda: pyattn.spmm(torch.tensor([0, 1], device="meta"), torch.tensor([0]),
                         torch.randn(3, 2)), RuntimeError, "`rowptr` must be on the device"),
    (lambda: pyattn.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.randn(3, 2),
                         torch.randn(1, device="meta")), RuntimeError, "`values` must be on"),
    (lambda: pyattn.spmm(torch.tensor([0, 1]), torch.tensor([0]), torch.randn(3, 2),
                         transpose=(torch.tensor([0, 1, 1, 1]), torch.tensor([5]),
                                    torch.tensor([0]))),
     ValueError, r"csc_row` entry must be in \[0, num_rows = 1\)"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -- the transposed CSR (CPU: C++ counting sort; reference: stable torch sort) --

@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("rows, cols, density", [(0, 5, 0.0), (1, 1, 1.0), (7, 113, 0.1),
                                                 (113, 7, 0.5), (300, 250, 0.05), (6, 9, 0.0)])
def test_csr_transpose_equals_the_stable_sort(index_dtype, rows, cols, density):
    """Every output bitwise equal to the reference (dtype included), with empty
    rows, columns without edges and no edges at all; num_cols beyond the last
    used column."""
    rowptr, col = random_csr(rows, cols, density, seed=rows, index_dtype=index_dtype)
    for num_cols in (cols, cols + 3):
        ours = csr_transpose(rowptr, col, num_cols)
        expected = reference.csr_transpose(rowptr, col, num_cols)
        for name, a, b in zip(("csc_ptr", "csc_row", "csc_perm"), ours, expected):
            assert a.dtype == b.dtype and torch.equal(a, b), name


def hub_csr(rows, cols, edges, seed, index_dtype=torch.int64):
    """A CSR whose columns follow a power law (column 0 the biggest hub), with
    duplicate edges, as in the spmm benchmarks' graphs."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, cols + 1, dtype=torch.float64)
    col = torch.multinomial(ranks ** -0.8, edges, replacement=True, generator=gen)
    counts = torch.bincount(torch.randint(rows, (edges,), generator=gen), minlength=rows)
    rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return rowptr.to(index_dtype), col.to(index_dtype)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("cols", [1, 5, 4097, 70001])
def test_csr_transpose_in_several_chunks_and_buckets_is_the_stable_sort(index_dtype, cols):
    """About 300k edges: several row chunks in the first pass (one per thread,
    up to 5 here; a run of empty rows among them), buckets of several columns
    (one hub bucket holding a large share of the edges) in the second; every
    thread count gives the stable sort exactly."""
    rowptr, col = hub_csr(997, cols, 300_001, seed=cols, index_dtype=index_dtype)
    rowptr[400:420] = rowptr[400]  # a run of empty rows, where a chunk may start
    expected = reference.csr_transpose(rowptr, col, cols + 2)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            ours = csr_transpose(rowptr, col, cols + 2)
            for name, a, b in zip(("csc_ptr", "csc_row", "csc_perm"), ours, expected):
                assert a.dtype == b.dtype and torch.equal(a, b), (name, n)
    finally:
        torch.set_num_threads(threads)


def test_csr_transpose_reports_the_first_bad_column_whatever_the_chunk():
    """Bad columns in two row chunks: the error names the earlier one."""
    rowptr, col = hub_csr(50, 1000, 200_000, seed=3)
    col[150_000], col[190_000] = 1000, -4
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match=r"got 1000 at position 150000"):
            csr_transpose(rowptr, col, 1000)
        col[100_000] = -7
        with pytest.raises(ValueError, match=r"got -7 at position 100000"):
            csr_transpose(rowptr, col, 1000)
    finally:
        torch.set_num_threads(threads)


def test_csr_transpose_without_columns():
    """num_cols = 0: an empty csc_ptr of one entry; any edge is out of range."""
    for index_dtype in (torch.int64, torch.int32):
        rowptr = torch.zeros(4, dtype=index_dtype)
        csc_ptr, csc_row, csc_perm = csr_transpose(rowptr, rowptr[:0], 0)
        assert csc_ptr.tolist() == [0] and csc_row.numel() == 0 and csc_perm.numel() == 0
        with pytest.raises(ValueError, match=r"num_cols = 0\), got 0 at position 0"):
            csr_transpose(torch.tensor([0, 1], dtype=index_dtype),
                          torch.tensor([0], dtype=index_dtype), 0)


def test_csr_transpose_opcheck():
    rowptr, col = random_csr(11, 8, 0.3, seed=5)
    torch.library.opcheck(torch.ops.pyattn.csr_transpose, (rowptr, col, 8))
    torch.library.opcheck(torch.ops.pyattn.csr_transpose, (rowptr.int(), col.int(), 10))


@pytest.mark.parametrize("args, error, match", [
    ((torch.tensor([0, 2]), torch.tensor([0, 5]), 3), ValueError,
     r"every `col` entry must be in \[0, num_cols = 3\), got 5 at position 1"),
    ((torch.tensor([0, 2]), torch.tensor([-1, 0]), 3), ValueError, r"got -1 at position 0"),
    ((torch.tensor([1, 2]), torch.tensor([0, 1]), 3), ValueError, "`rowptr` must run from 0"),
    ((torch.tensor([0, 3]), torch.tensor([0, 1]), 3), ValueError, r"len\(col\) = 2"),
    ((torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1]), 3), ValueError, "non-decreasing"),
    ((torch.tensor([0, 1]), torch.tensor([0], dtype=torch.int32), 3), TypeError,
     "`col` must have `rowptr`'s dtype"),
    ((torch.tensor([0., 1.]), torch.tensor([0]), 3), TypeError, "`rowptr` must be int64"),
    ((torch.tensor([[0, 1]]), torch.tensor([0]), 3), ValueError, "`rowptr` must be 1-D"),
    ((torch.tensor([0, 1]), torch.tensor([[0]]), 3), ValueError, "`col` must be 1-D"),
    ((torch.tensor([0, 0]), torch.tensor([], dtype=torch.long), -1), ValueError,
     "`num_cols` must be >= 0"),
])
def test_csr_transpose_bad_inputs_raise_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        torch.ops.pyattn.csr_transpose(*args)


# -- the CUDA launch plan, computed on CPU ------------------------------------

def test_cuda_plan_is_one_launch_whatever_the_graph_size():
    plan = pyattn._C.spmm_cuda_plan
    for rows in (1, 7, 113, 10 ** 4, 10 ** 6, 10 ** 9):
        for features in (1, 16, 64, 256, 1433, 5000):
            for element_size in (2, 4, 8):
                for extremum in (False, True):
                    p = plan(rows, features, element_size, True, extremum)
                    assert p["launches"] == 1
                    covered = p["lanes"] * p["vector"] * p["chunks"] * p["feature_passes"]
                    assert covered >= features and p["lanes"] <= 32
                    # grid-stride beyond 2^20 blocks: still one launch
                    assert p["blocks"] == min(-(-rows // p["rows_per_block"]), 2 ** 20)
    # F = 16 floats: 4 lanes of one 16-byte vector, 8 rows per warp; F = 256: one walk
    p16 = plan(1000, 16, 4, True, False)
    assert (p16["lanes"], p16["vector"], p16["chunks"], p16["rows_per_block"]) == (4, 4, 1, 64)
    p256 = plan(1000, 256, 2, True, False)
    assert (p256["lanes"], p256["vector"], p256["chunks"], p256["feature_passes"]) == (32, 8, 1, 1)
    odd = plan(1000, 1433, 4, True, False)  # 1433 % 4 != 0: scalar loads
    assert odd["vector"] == 1 and odd["feature_passes"] == 6
    assert plan(0, 16, 4, True, False)["launches"] == 0


# -- the CUDA accuracy rule (FlashAttention-2's): within 2x PyTorch's own error --

def assert_within_torch_error(got, ref64, torch_same_dtype, name=""):
    """max |got - ref64| <= 2 max |torch - ref64| + floor, the floor half an ulp
    of the dtype at the largest reference value (covers outputs torch gets exactly)."""
    floor = 0.5 * torch.finfo(got.dtype).eps * ref64.abs().max().item() + 1e-12
    err = (got.double() - ref64).abs().max().item()
    torch_err = (torch_same_dtype.double() - ref64).abs().max().item()
    assert err <= 2 * torch_err + floor, \
        f"{name}: error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"


@pytest.mark.parametrize("dtype, wrong_by", [(torch.float16, 0.009), (torch.bfloat16, 0.045)])
def test_tolerance_rule_fails_on_a_slightly_wrong_kernel(dtype, wrong_by):
    """On CPU: a perfect kernel (the float64 product rounded once) passes the rule;
    the same scaled by 1 + wrong_by (0.9% for fp16, 4.5% for bf16: what the old
    fixed tolerances let through) fails it."""
    rowptr, col = random_csr(53, 41, 0.25, seed=7)
    x = torch.randn(41, 64, dtype=torch.float64)
    values = torch.randn(col.numel(), dtype=torch.float64)
    for reduce in ("sum", "mean"):
        ref = reference.spmm(rowptr, col, x, values, reduce)
        torch_low = reference.spmm(rowptr, col, x.to(dtype), values.to(dtype), reduce)
        assert_within_torch_error(ref.to(dtype), ref, torch_low, "exact")
        with pytest.raises(AssertionError, match="error"):
            assert_within_torch_error((ref * (1 + wrong_by)).to(dtype), ref, torch_low, "mutant")


@requires_cuda
@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cuda_against_reference(reduce, dtype, index_dtype):
    for features in (1, 7, 16, 64, 256, 1433):
        rowptr, col = random_csr(53, 41, 0.3, seed=features, device="cuda",
                                 index_dtype=index_dtype)
        x = torch.randn(41, features, dtype=dtype, device="cuda", requires_grad=True)
        values = torch.randn(col.numel(), dtype=dtype, device="cuda", requires_grad=True)
        out = pyattn.spmm(rowptr, col, x, values, reduce)
        xd, vd = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
        ref = reference.spmm(rowptr, col, xd, vd, reduce)
        xl, vl = x.detach().clone().requires_grad_(), values.detach().clone().requires_grad_()
        low = reference.spmm(rowptr, col, xl, vl, reduce)
        assert_within_torch_error(out.detach(), ref.detach(), low.detach(), f"out F{features}")
        grad = torch.randn_like(ref)
        if reduce in ("max", "min") and dtype in (torch.float16, torch.bfloat16):
            continue  # rounding makes ties, which torch splits and pyattn gives to one edge
        got = torch.autograd.grad(out, (x, values), grad.to(dtype))
        want = torch.autograd.grad(ref, (xd, vd), grad)
        torch_low = torch.autograd.grad(low, (xl, vl), grad.to(dtype))
        for name, g, w, t in zip(("grad x", "grad values"), got, want, torch_low):
            assert_within_torch_error(g, w, t, f"{name} F{features}")


@requires_cuda
def test_cuda_deterministic_and_mean_scale_in_float32():
    rowptr, col = random_csr(300, 300, 0.05, seed=2, device="cuda")
    x = torch.randn(300, 33, device="cuda", requires_grad=True)
    values = torch.randn(col.numel(), device="cuda", requires_grad=True)
    runs = [_forward_and_grads(rowptr, col, x, values, "mean") for _ in range(3)]
    assert _bitwise_equal(runs)
    # one row of 300 edges in bfloat16: the mean's 1/300 must not be 1/(300 rounded)
    rp = torch.tensor([0, 300], device="cuda")
    c = torch.arange(300, device="cuda")
    ones = torch.ones(300, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = pyattn.spmm(rp, c, ones, reduce="mean")
    assert torch.equal(out, torch.ones_like(out))
    g, = torch.autograd.grad(out, ones, torch.full_like(out, 300.0))
    torch.testing.assert_close(g.float(), torch.ones(300, 8, device="cuda"), rtol=2 ** -8, atol=0)

"""spmm (sum, mean) vs torch.sparse.mm on a CSR tensor, vs index_add (scatter),
vs dense mm where it fits; csr_transpose vs a stable torch sort; Cora (the
shipped data/planetoid) and synthetic power-law graphs; forward and
forward+backward; time, peak memory and achieved GB/s (bytes of the CSR, the
gathered feature rows and the output; on GPU also as a fraction of the
device's measured copy bandwidth).

Two forward+backward rows per case, so like is compared with like:
``forward+backward`` gives pyattn the transposed CSR built once outside the
timed region (what a cached :class:`pyattn.graph.Graph` pays), while
``forward+backward+transpose`` builds it inside every backward, as
``torch.sparse.mm`` does with its transpose.

Cases whose estimated device memory exceeds ~10 GB skip (the scatter baseline
gathers E x F terms: 51 GB at n = 1e6, degree 50, F = 256). Each graph is built
once per session. ``-k headline``: a few cheap GPU cases for gpu_check.sh;
``-k csr_transpose``: the transpose alone.

    python -m pytest benchmarks/bench_spmm.py --benchmark-only
"""
import functools
import os

import pytest
import torch

import pyattn
from pyattn import reference
from conftest import DEVICE

PLANETOID = os.path.join(os.path.dirname(__file__), "..", "data", "planetoid")
MEMORY_LIMIT = 10e9  # bytes a case may need on the device
IMPLS = ["pyattn", "torch_sparse", "scatter", "dense"]
PASSES = ["forward", "forward+backward", "forward+backward+transpose"]
# (nodes, mean degree, feature width); CPU skips products over ~3e8 multiply-adds
GRAPHS = [(n, d, f) for n in (10_000, 100_000, 1_000_000) for d in (10, 50) for f in (16, 256)]
if DEVICE.type == "cpu":
    GRAPHS = [g for g in GRAPHS if g[0] * g[1] * g[2] <= 3e8]


@functools.lru_cache(maxsize=None)
def power_law_graph(nodes: int, degree: int, seed: int = 0):
    """CSR of nodes * degree edges whose sources follow a Zipf-like law (a few hubs)."""
    gen = torch.Generator().manual_seed(seed)
    edges = nodes * degree
    targets = torch.randint(nodes, (edges,), generator=gen)
    ranks = torch.arange(1, nodes + 1, dtype=torch.float64)
    sources = torch.multinomial(ranks ** -0.8, edges, replacement=True, generator=gen)
    order = torch.argsort(targets * nodes + sources)
    targets, sources = targets[order], sources[order]
    counts = torch.bincount(targets, minlength=nodes)
    rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return rowptr, sources


@functools.lru_cache(maxsize=1)
def copy_bandwidth_gbps() -> float:
    """Device-to-device copy rate (read + write) of a 1 GiB tensor, in GB/s."""
    src = torch.empty(2 ** 28, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * src.numel() * 4 / (start.elapsed_time(end) / 1e3) / 1e9


def cora_graph():
    from pyattn.datasets import load_planetoid
    from pyattn.graph import Graph
    if not os.path.isfile(os.path.join(PLANETOID, "ind.cora.graph")):
        pytest.skip(f"needs {PLANETOID}")
    data = load_planetoid(PLANETOID, "cora")
    g = Graph(data.edge_index, data.num_nodes)
    return g.rowptr, g.col


def device_bytes(impl, nodes, edges, features, passes):
    """Rough peak device memory of a case: features, gradients, and what each
    implementation materialises (scatter: E x F terms and their gradient)."""
    dense_rows = nodes * features * 4 * (2 if passes == "forward" else 4)
    if impl == "scatter":
        return dense_rows + edges * features * 4 * (1 if passes == "forward" else 3)
    if impl == "dense":
        return dense_rows + nodes * nodes * 4
    return dense_rows + edges * 16 * (1 if passes == "forward" else 3)


def case_step(impl, rowptr, col, x, reduce, passes):
    """One product (and its backward) of ``impl``; pytest.skip where it has no row."""
    nodes = rowptr.numel() - 1
    lengths = rowptr.diff()
    mean_weights = (1.0 / lengths.clamp(min=1).float()).repeat_interleave(lengths)
    if impl == "pyattn":
        transpose = None if passes == "forward+backward+transpose" \
            else pyattn.ops.spmm.csr_transpose(rowptr, col, nodes)
        fn = lambda: pyattn.spmm(rowptr, col, x, reduce=reduce, check=False, transpose=transpose)
    elif impl == "torch_sparse":
        values = mean_weights if reduce == "mean" else torch.ones_like(mean_weights)
        matrix = torch.sparse_csr_tensor(rowptr, col, values, (nodes, nodes))
        fn = lambda: torch.sparse.mm(matrix, x)
    elif passes == "forward+backward+transpose":
        pytest.skip("the transpose-in-backward row is pyattn's (the others always pay it)")
    elif impl == "scatter":
        fn = lambda: reference.spmm(rowptr, col, x, reduce=reduce)
    else:
        if nodes * nodes * 4 > 2 ** 31:
            pytest.skip("dense adjacency does not fit")
        values = mean_weights if reduce == "mean" else torch.ones_like(mean_weights)
        dense = torch.sparse_csr_tensor(rowptr, col, values, (nodes, nodes)).to_dense()
        fn = lambda: dense @ x
    if passes == "forward":
        return lambda: fn().detach()
    grad = torch.randn(nodes, x.shape[1], device=DEVICE)

    def step():
        x.grad = None
        fn().backward(grad)
    return step


def run_case(measure, rowptr, col, features, reduce, passes, impl, name):
    """Time one case; pyattn's rounds alternate with torch.sparse.mm's
    (conftest.measure's partner)."""
    nodes = rowptr.numel() - 1
    if DEVICE.type == "cuda" and \
            device_bytes(impl, nodes, col.numel(), features, passes) > MEMORY_LIMIT:
        pytest.skip(f"needs more than {MEMORY_LIMIT / 1e9:.0f} GB")
    rowptr, col = rowptr.to(DEVICE), col.to(DEVICE)
    x = torch.randn(nodes, features, device=DEVICE, requires_grad=passes != "forward")
    step = case_step(impl, rowptr, col, x, reduce, passes)
    partner = None
    if impl == "pyattn":  # its own copy of x: neither side warms the cache for the other
        partner_x = x.detach().clone().requires_grad_(x.requires_grad)
        partner = ("torch_sparse", case_step("torch_sparse", rowptr, col, partner_x, reduce,
                                             passes))
    edges = col.numel()
    moved = edges * (8 + 4) + edges * features * 4 + nodes * features * 4
    moved *= 1 if passes == "forward" else 3  # backward: transposed product + edge reads
    info = dict(bytes=moved)
    if DEVICE.type == "cuda":
        info["copy_bandwidth_gbps"] = copy_bandwidth_gbps()
    measure(step, f"spmm {name} F{features} {reduce} {passes}", impl,
            rounds=3 if edges * features > 5e7 else 5, partner=partner, **info)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("features", [16, 64, 1433])
def test_cora(measure, features, reduce, passes, impl):
    rowptr, col = cora_graph()
    run_case(measure, rowptr, col, features, reduce, passes, impl, "cora")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("graph", GRAPHS, ids=[f"n{n}-d{d}-f{f}" for n, d, f in GRAPHS])
def test_power_law(measure, graph, reduce, passes, impl):
    nodes, degree, features = graph
    rowptr, col = power_law_graph(nodes, degree)
    run_case(measure, rowptr, col, features, reduce, passes, impl,
             f"power-law n={nodes:.0e} deg={degree}")


HEADLINE = [(100_000, 16, 64), (100_000, 16, 256)]


@pytest.mark.parametrize("impl", ["pyattn", "torch_sparse"])
@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("graph", HEADLINE, ids=[f"headline-n{n}-d{d}-f{f}" for n, d, f in HEADLINE])
def test_headline_mean(measure, graph, passes, impl):
    """The issue-14 target shape: mean forward+backward at F = 64 / 256 (cheap: ~1e5 nodes)."""
    nodes, degree, features = graph
    rowptr, col = power_law_graph(nodes, degree)
    run_case(measure, rowptr, col, features, "mean", passes, impl,
             f"headline power-law n={nodes:.0e} deg={degree}")


TRANSPOSE_GRAPHS = [(10_000, 50), (100_000, 16), (1_000_000, 10)]


@pytest.mark.parametrize("impl", ["pyattn", "torch_sort"])
@pytest.mark.parametrize("graph", TRANSPOSE_GRAPHS, ids=[f"n{n}-d{d}" for n, d in TRANSPOSE_GRAPHS])
def test_csr_transpose(measure, graph, impl):
    """csr_transpose (the CPU counting sort; on GPU the torch sort itself) against
    the stable torch sort it replaces (reference.csr_transpose)."""
    nodes, degree = graph
    rowptr, col = (t.to(DEVICE) for t in power_law_graph(nodes, degree))
    builders = {"pyattn": pyattn.ops.spmm.csr_transpose, "torch_sort": reference.csr_transpose}
    build = builders[impl]
    partner = ("torch_sort", lambda: builders["torch_sort"](rowptr, col, nodes)) \
        if impl == "pyattn" else None
    edges = col.numel()
    # reads rowptr and col, writes csc_ptr, csc_row and csc_perm (int64)
    moved = (nodes + 1) * 8 * 2 + edges * (8 + 8 + 8)
    measure(lambda: build(rowptr, col, nodes), f"csr_transpose power-law n={nodes:.0e} deg={degree}",
            impl, rounds=3 if edges > 5e6 else 5, partner=partner, bytes=moved)

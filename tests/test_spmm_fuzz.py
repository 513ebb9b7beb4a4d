"""Property-based fuzzing of pyattn.spmm (issue 11): random shapes, dtypes,
index dtypes, NaN / Inf, non-contiguous x, and malformed arguments (unsorted
rowptr, out-of-range / negative col, mismatched lengths, wrong dtypes, tensors
on another device). Each case either matches the pure-PyTorch reference (NaN
where it has NaN) or raises a Python exception; the process never crashes.
Cases per kind are counted (``pytest --hypothesis-show-statistics``).
"""
import pytest
import torch
from hypothesis import event, given, strategies as st

import pyattn
from pyattn import reference

MALFORMED = ["none", "unsorted_rowptr", "col_out_of_range", "col_negative", "rowptr_end",
             "values_length", "col_float", "values_dtype", "mismatched_index_dtypes",
             "x_on_meta", "rowptr_on_meta", "values_on_meta", "x_1d"]
EXPECTED_ERRORS = (ValueError, TypeError, RuntimeError, IndexError, NotImplementedError)


@st.composite
def spmm_case(draw):
    rows = draw(st.integers(0, 7))
    nodes = draw(st.integers(0, 7))
    features = draw(st.integers(0, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    reduce = draw(st.sampled_from(["sum", "mean", "max", "min"]))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4 if nodes else 1, (rows,), generator=gen)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    edges = int(rowptr[-1])
    col = torch.randint(0, max(nodes, 1), (edges,), generator=gen)
    x = torch.randn(nodes, 2 * features + 1, dtype=dtype, generator=gen)
    if draw(st.booleans()):
        x = x[:, 1::2]  # non-contiguous
    else:
        x = x[:, :features].contiguous()
    special = draw(st.sampled_from(["finite", "nan", "inf", "-inf"]))
    if special != "finite" and x.numel():
        nodes_at = torch.randint(0, nodes, (2,), generator=gen)
        features_at = torch.randint(0, features, (2,), generator=gen)
        x[nodes_at, features_at] = float(special)
    values = torch.randn(edges, dtype=dtype, generator=gen) if draw(st.booleans()) else None
    # half the cases well-formed, so the value comparison gets its share
    malformed = draw(st.sampled_from(MALFORMED[1:])) if draw(st.booleans()) else "none"
    return dict(rowptr=rowptr.to(index_dtype), col=col.to(index_dtype), x=x, values=values,
                reduce=reduce, malformed=malformed, special=special)


def _break(case):
    """Apply the malformation; return (args, applied kind, must_raise)."""
    rowptr, col, x, values = case["rowptr"], case["col"], case["x"], case["values"]
    kind = case["malformed"]
    if kind == "unsorted_rowptr" and rowptr.numel() >= 3:
        rowptr = rowptr.clone()
        rowptr[1] = rowptr[2] + 1
        return (rowptr, col, x, values), kind, True
    if kind == "col_out_of_range" and col.numel():
        col = col.clone()
        col[-1] = x.shape[0] + 3 if x.dim() == 2 else 3
        return (rowptr, col, x, values), kind, True
    if kind == "col_negative" and col.numel():
        col = col.clone()
        col[0] = -1
        return (rowptr, col, x, values), kind, True
    if kind == "rowptr_end":
        rowptr = rowptr.clone()
        rowptr[-1] += 1
        return (rowptr, col, x, values), kind, True
    if kind == "values_length":
        values = torch.randn(col.numel() + 1, dtype=x.dtype)
        return (rowptr, col, x, values), kind, True
    if kind == "col_float":
        return (rowptr, col.float(), x, values), kind, True
    if kind == "values_dtype":
        values = torch.ones(col.numel(), dtype=torch.int64)
        return (rowptr, col, x, values), kind, True
    if kind == "mismatched_index_dtypes":  # widened to int64: must still be right
        return (rowptr.long(), col.int(), x, values), kind, False
    if kind == "x_on_meta":
        return (rowptr, col, x.to("meta"), values), kind, True
    if kind == "rowptr_on_meta":
        return (rowptr.to("meta"), col, x, values), kind, True
    if kind == "values_on_meta":
        values = torch.randn(col.numel(), dtype=x.dtype, device="meta")
        return (rowptr, col, x, values), kind, True
    if kind == "x_1d":
        return (rowptr, col, x.reshape(-1), values), kind, True
    return (rowptr, col, x, values), "none", False


@pytest.mark.fuzz
@given(spmm_case())
def test_fuzz_matches_reference_or_raises(case):
    (rowptr, col, x, values), kind, must_raise = _break(case)
    event(f"malformed={kind}")
    event(f"special={case['special']}")
    try:
        out = pyattn.spmm(rowptr, col, x, values, case["reduce"])
    except EXPECTED_ERRORS as error:
        event("raised")
        assert must_raise, f"valid input raised: {error!r}"
        return
    assert not must_raise, f"{kind}: no error"
    event("matched")
    ref = reference.spmm(rowptr.long(), col.long(), x, values, case["reduce"])
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-5, atol=1e-5)

"""``pyattn.spmm``: CSR sparse x dense products with sum / mean / max reduction.

``torch.ops.pyattn.spmm_csr`` (C++ CPU, CUDA) computes
``out[i] = reduce_{e in row i} values[e] * x[col[e]]``. Its backward is itself
a product with the transposed matrix: ``grad_x = A^T grad_out``, from a CSR of
the transpose (``csr_transpose``; built once per graph and cached by
:class:`pyattn.graph.Graph`), with no atomics, so it is deterministic; for
``max`` the gradient goes to the arg-max edge of each output element.
"""
from __future__ import annotations

from typing import Optional

import torch

REDUCTIONS = ("sum", "mean", "max")


def csr_transpose(rowptr: torch.Tensor, col: torch.Tensor, num_cols: int):
    """CSR of the transpose: (csc_ptr (num_cols + 1), csc_row (E), csc_perm (E)).

    ``csc_perm[k]`` is the original edge of transposed position ``k``; edges of a
    column keep their row order (stable), so results are deterministic.
    """
    rows = torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=rowptr.device),
                                   rowptr.diff())
    perm = torch.sort(col, stable=True).indices
    counts = torch.bincount(col, minlength=num_cols)
    csc_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return csc_ptr, rows[perm], perm


def _as_index(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"spmm: `{name}` must be a tensor, got {type(t).__name__}")
    if t.dtype == torch.int32:
        return t.long()
    if t.dtype != torch.int64:
        raise TypeError(f"spmm: `{name}` must be int64 (or int32), got {t.dtype}")
    return t


def spmm(rowptr: torch.Tensor, col: torch.Tensor, x: torch.Tensor,
         values: Optional[torch.Tensor] = None, reduce: str = "sum", check: bool = True,
         transpose: Optional[tuple] = None) -> torch.Tensor:
    r"""Sparse (CSR) x dense product with a reduction per row.

    .. math::
        \text{out}_i = \mathop{\text{reduce}}_{e \in [\text{rowptr}_i, \text{rowptr}_{i+1})}
        w_e\, x_{\text{col}_e}, \qquad w_e = \text{values}_e \text{ or } 1

    Args:
        rowptr: ``(num_rows + 1,)`` int64 (int32 accepted) row offsets.
        col: ``(E,)`` column of each entry, in ``[0, x.size(0))``.
        x: ``(num_cols, F)`` dense features: float32 / float64 on CPU, plus
            float16 / bfloat16 on CUDA (float32 accumulation).
        values: ``(E,)`` entry weights, or ``None`` for ones.
        reduce: ``'sum'``, ``'mean'`` (divides by the row length) or ``'max'``.
            An empty row gives 0 under every reduction.
        check: validate ``rowptr`` / ``col`` contents (rowptr[0] = 0,
            non-decreasing, rowptr[-1] = E, col in range) before any kernel
            runs; ``False`` skips it for trusted inputs in hot loops.
        transpose: ``csr_transpose(rowptr, col, x.size(0))``, if already built;
            otherwise the backward builds it.

    Returns: ``(num_rows, F)``. Differentiable in ``x`` and ``values``.
    """
    rowptr, col = _as_index("rowptr", rowptr), _as_index("col", col)
    if reduce not in REDUCTIONS:
        raise ValueError(f"spmm: `reduce` must be one of {REDUCTIONS}, got {reduce!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"spmm: `x` must be a tensor, got {type(x).__name__}")
    csc = tuple(transpose) if transpose is not None else (None, None, None)
    out, _ = torch.ops.pyattn.spmm_csr(rowptr, col, values, x, reduce, check, *csc)
    return out


@torch.library.register_fake("pyattn::spmm_csr")
def _spmm_fake(rowptr, col, values, x, reduce, check, csc_ptr, csc_row, csc_perm):
    rows = rowptr.shape[0] - 1
    out = x.new_empty((rows, x.shape[1]))
    arg_shape = (rows, x.shape[1]) if reduce == "max" else (0,)
    return out, rowptr.new_empty(arg_shape)


@torch.library.register_fake("pyattn::spmm_csr_edge_grad")
def _edge_grad_fake(rowptr, col, x, grad_out, reduce):
    return x.new_empty(col.shape)


@torch.library.register_fake("pyattn::spmm_csr_max_backward")
def _max_backward_fake(csc_ptr, csc_row, csc_perm, values, x, arg, grad_out):
    return x.new_empty(x.shape), x.new_empty((csc_row.shape[0] if values is not None else 0,))


def _setup_context(ctx, inputs, output):
    rowptr, col, values, x, reduce, check, csc_ptr, csc_row, csc_perm = inputs
    _, arg = output
    ctx.save_for_backward(rowptr, col, values, x, arg, csc_ptr, csc_row, csc_perm)
    ctx.reduce = reduce
    ctx.mark_non_differentiable(arg)


def _backward(ctx, grad_out, _grad_arg):
    rowptr, col, values, x, arg, csc_ptr, csc_row, csc_perm = ctx.saved_tensors
    if csc_ptr is None:
        csc_ptr, csc_row, csc_perm = csr_transpose(rowptr, col, x.shape[0])
    grad_out = grad_out.contiguous()
    grad_x = grad_values = None
    if ctx.reduce == "max":
        grad_x, grad_values = torch.ops.pyattn.spmm_csr_max_backward(
            csc_ptr, csc_row, csc_perm, values, x, arg, grad_out)
        if values is None:
            grad_values = None
    else:
        if ctx.needs_input_grad[3]:
            # grad_x = A^T grad_out with A's weights (divided by row lengths for mean)
            weights = None if values is None else values[csc_perm]
            if ctx.reduce == "mean":
                lengths = rowptr.diff().to(grad_out.dtype)
                scale = torch.where(lengths > 0, 1.0 / lengths.clamp(min=1), 0.0)[csc_row]
                weights = scale if weights is None else weights * scale
            grad_x, _ = torch.ops.pyattn.spmm_csr(csc_ptr, csc_row, weights, grad_out, "sum",
                                                  False, None, None, None)
        if values is not None and ctx.needs_input_grad[2]:
            grad_values = torch.ops.pyattn.spmm_csr_edge_grad(rowptr, col, x, grad_out,
                                                              ctx.reduce)
    return None, None, grad_values, grad_x, None, None, None, None, None


torch.library.register_autograd("pyattn::spmm_csr", _backward, setup_context=_setup_context)

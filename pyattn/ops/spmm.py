"""``pyattn.spmm``: CSR sparse x dense products with sum / mean / max / min reduction.

``torch.ops.pyattn.spmm_csr`` (C++ CPU, CUDA) computes
``out[i] = reduce_{e in row i} values[e] * x[col[e]]``.

Derivatives:

- **sum / mean** are linear in ``x`` and in ``values`` (bilinear jointly). The
  backward is itself a product with the transposed matrix,
  ``grad_x = A^T diag(s) grad_out`` (``s`` = 1 or 1 / row length), from a CSR
  of the transpose (``csr_transpose``; built once per graph and cached by
  :class:`pyattn.graph.Graph`), with no atomics, so it is deterministic; and
  ``grad_values[e] = s_row(e) <grad_out[row(e)], x[col[e]]>``
  (``spmm_csr_edge_grad``). Both are differentiable ops again, so second and
  higher derivatives work (``gradgradcheck``), and the forward-mode rule
  (``torch.func.jvp``, ``torch.autograd.forward_ad``) is
  ``spmm(A, dx) + spmm(dA, x)``.
- **max / min** send the gradient to the arg-max / arg-min edge of each output
  element (the first edge wins ties). The forward-mode rule follows the same
  edge. A second derivative raises ``RuntimeError`` (it is not implemented;
  it is never returned as zero).
"""
from __future__ import annotations

from typing import Optional

import torch

from pyattn import reference
from pyattn.ops import autograd_kernel

REDUCTIONS = ("sum", "mean", "max", "min")
EXTREMA = ("max", "min")


def csr_transpose(rowptr: torch.Tensor, col: torch.Tensor, num_cols: int):
    """CSR of the transpose: (csc_ptr (num_cols + 1), csc_row (E), csc_perm (E)).

    ``csc_ptr`` / ``csc_row`` keep the index dtype of ``rowptr`` (int32 or
    int64); ``csc_perm[k]`` (int64) is the original edge of transposed position
    ``k``; edges of a column keep their row order (stable), so results are
    deterministic. CPU: a counting sort in C++ (``pyattn::csr_transpose``,
    which also checks the CSR; on large graphs in two cache-sized passes);
    other devices: ``reference.csr_transpose``, a stable torch sort.
    """
    if rowptr.device.type == "cpu":
        return torch.ops.pyattn.csr_transpose(rowptr, col, num_cols)
    return reference.csr_transpose(rowptr, col, num_cols)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean_scale(rowptr: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / row length per row (0 for an empty row), in the accumulation dtype of
    ``dtype`` (float32 for float16 / bfloat16): a bfloat16 length above 256
    would round and a float16 one above 65504 overflow to inf (scale 0)."""
    lengths = rowptr.diff().to(accumulation_dtype(dtype))
    return torch.where(lengths > 0, 1.0 / lengths.clamp(min=1), 0.0)


def _as_index(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"spmm: `{name}` must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"spmm: `{name}` must be int64 or int32, got {t.dtype}")
    return t


def spmm(rowptr: torch.Tensor, col: torch.Tensor, x: torch.Tensor,
         values: Optional[torch.Tensor] = None, reduce: str = "sum", check: bool = True,
         transpose: Optional[tuple] = None) -> torch.Tensor:
    r"""Sparse (CSR) x dense product with a reduction per row.

    .. math::
        \text{out}_i = \mathop{\text{reduce}}_{e \in [\text{rowptr}_i, \text{rowptr}_{i+1})}
        w_e\, x_{\text{col}_e}, \qquad w_e = \text{values}_e \text{ or } 1

    Args:
        rowptr: ``(num_rows + 1,)`` int64 or int32 row offsets.
        col: ``(E,)`` column of each entry, in ``[0, x.size(0))``; int64 or
            int32 (an int32 / int64 mix is widened to int64; two int32 tensors
            stay int32, which the kernels read directly).
        x: ``(num_cols, F)`` dense features: float32 / float64 on CPU, plus
            float16 / bfloat16 on CUDA (float32 accumulation).
        values: ``(E,)`` entry weights of ``x``'s dtype, or ``None`` for ones.
        reduce: ``'sum'``, ``'mean'`` (divides by the row length), ``'max'`` or
            ``'min'`` (NaN propagates as in ``torch.amax``). An empty row gives
            0 under every reduction.
        check: validate ``rowptr`` / ``col`` (and ``transpose``) contents
            (rowptr[0] = 0, non-decreasing, rowptr[-1] = E, col in range)
            before any kernel runs; ``False`` skips it for trusted inputs.
        transpose: ``csr_transpose(rowptr, col, x.size(0))``, if already built;
            otherwise the backward builds it.

    Returns: ``(num_rows, F)``. Differentiable in ``x`` and ``values``, to any
    order for sum / mean (first order for max / min); forward mode too.
    """
    rowptr, col = _as_index("rowptr", rowptr), _as_index("col", col)
    if rowptr.dtype != col.dtype:
        rowptr, col = rowptr.long(), col.long()
    if reduce not in REDUCTIONS:
        raise ValueError(f"spmm: `reduce` must be one of {REDUCTIONS}, got {reduce!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"spmm: `x` must be a tensor, got {type(x).__name__}")
    if values is not None and not isinstance(values, torch.Tensor):
        raise TypeError(f"spmm: `values` must be a tensor or None, got {type(values).__name__}")
    csc = tuple(transpose) if transpose is not None else (None, None, None)
    if len(csc) != 3:
        raise ValueError("spmm: `transpose` must be (csc_ptr, csc_row, csc_perm)")
    args = (rowptr, col, values, x, reduce, check, *csc)
    out, _ = autograd_kernel.call(torch.ops.pyattn.spmm_csr.default, *args)
    return out


def _check_fake_devices(op: str, x, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op}: `{name}` must be on the device of `x` ({x.device}), "
                               f"got {t.device}")


@torch.library.register_fake("pyattn::spmm_csr")
def _spmm_fake(rowptr, col, values, x, reduce, check, csc_ptr, csc_row, csc_perm):
    _check_fake_devices("spmm", x, rowptr=rowptr, col=col, values=values, csc_ptr=csc_ptr,
                        csc_row=csc_row, csc_perm=csc_perm)
    if x.dim() != 2 or rowptr.dim() != 1:
        raise ValueError("spmm: `x` must be 2-D and `rowptr` 1-D")
    rows = rowptr.shape[0] - 1
    out = x.new_empty((rows, x.shape[1]))
    arg_shape = (rows, x.shape[1]) if reduce in EXTREMA else (0,)
    return out, x.new_empty(arg_shape, dtype=torch.int64)


@torch.library.register_fake("pyattn::csr_transpose")
def _csr_transpose_fake(rowptr, col, num_cols):
    edges = col.shape[0]
    return (rowptr.new_empty((num_cols + 1,)), rowptr.new_empty((edges,)),
            rowptr.new_empty((edges,), dtype=torch.int64))


@torch.library.register_fake("pyattn::spmm_csr_edge_grad")
def _edge_grad_fake(rowptr, col, x, grad_out, reduce):
    _check_fake_devices("spmm_csr_edge_grad", x, rowptr=rowptr, col=col, grad_out=grad_out)
    return x.new_empty(col.shape)


@torch.library.register_fake("pyattn::spmm_csr_max_backward")
def _max_backward_fake(csc_ptr, csc_row, csc_perm, values, x, arg, grad_out):
    _check_fake_devices("spmm_csr_max_backward", x, csc_ptr=csc_ptr, csc_row=csc_row,
                        csc_perm=csc_perm, values=values, arg=arg, grad_out=grad_out)
    return x.new_empty(x.shape), x.new_empty((csc_row.shape[0] if values is not None else 0,))


def _spmm_sum(rowptr, col, values, x, reduce="sum"):
    out, _ = torch.ops.pyattn.spmm_csr(rowptr, col, values, x, reduce, False, None, None, None)
    return out


def transposed_weights(rowptr, transpose, edge_weight, dtype, reduce):
    """Per-edge weights of ``A^T diag(s)`` in transposed (csc) order: ``w_e s_row(e)``
    with ``s`` = 1 (sum) or 1 / row length (mean), formed in the accumulation
    dtype and rounded to ``dtype`` once; ``None`` for an unweighted sum."""
    _, csc_row, csc_perm = transpose
    weights = None if edge_weight is None else edge_weight[csc_perm]
    if reduce == "mean":
        scale = mean_scale(rowptr, dtype)[csc_row.long()]
        weights = scale if weights is None else weights.to(scale.dtype) * scale
        weights = weights.to(dtype)
    return weights


def transpose_product(rowptr, col, transpose, edge_weight, grad, reduce):
    """``A_w^T diag(s) grad``: the x-gradient of ``spmm(rowptr, col, x, w, reduce)``
    for sum and mean, as a differentiable spmm over the transposed CSR."""
    weights = transposed_weights(rowptr, transpose, edge_weight, grad.dtype, reduce)
    return _spmm_sum(transpose[0], transpose[1], weights, grad)


def _max_backward(rowptr, col, values, x, arg, transpose, grad_out, needs_values):
    grad_x, grad_values = torch.ops.pyattn.spmm_csr_max_backward(
        *transpose, values, x, arg, grad_out)
    return grad_x, (grad_values if values is not None and needs_values else None)


def _backward_impl(saved, reduce, needs_input_grad, grad_out):
    rowptr, col, values, x, arg, csc_ptr, csc_row, csc_perm = saved
    transpose = (csc_ptr, csc_row, csc_perm) if csc_ptr is not None \
        else csr_transpose(rowptr, col, x.shape[0])
    grad_out = grad_out.contiguous()
    if reduce in EXTREMA:
        grad_x, grad_values = _max_backward(rowptr, col, values, x, arg, transpose, grad_out,
                                            needs_input_grad[2])
        return None, None, grad_values, grad_x, None, None, None, None, None
    grad_x = grad_values = None
    if needs_input_grad[3]:
        grad_x = transpose_product(rowptr, col, transpose, values, grad_out, reduce)
    if values is not None and needs_input_grad[2]:
        grad_values = torch.ops.pyattn.spmm_csr_edge_grad(rowptr, col, x, grad_out, reduce)
    return None, None, grad_values, grad_x, None, None, None, None, None


def _jvp_impl(rowptr, col, values, x, arg, reduce, values_t, x_t):
    """Tangent of out: linear in x and in values (for max / min along the arg edge)."""
    if reduce not in EXTREMA:
        out_t = None
        if x_t is not None:
            out_t = torch.ops.pyattn.spmm_csr(rowptr, col, values, x_t, reduce, False,
                                              None, None, None)[0]
        if values_t is not None and values is not None:
            term = torch.ops.pyattn.spmm_csr(rowptr, col, values_t, x, reduce, False,
                                             None, None, None)[0]
            out_t = term if out_t is None else out_t + term
        return out_t
    valid = arg >= 0
    out_t = torch.zeros(arg.shape, dtype=x.dtype, device=x.device)
    if col.numel() == 0:
        return out_t
    edge = arg.clamp(min=0)
    source = col.long()[edge]  # (rows, F): the node each output element reads
    if x_t is not None:
        weight = values[edge] if values is not None else 1
        out_t = out_t + weight * x_t.gather(0, source)
    if values_t is not None and values is not None:
        out_t = out_t + values_t[edge] * x.gather(0, source)
    return torch.where(valid, out_t, torch.zeros_like(out_t))


def _setup_context(ctx, inputs, output):
    rowptr, col, values, x, reduce, check, csc_ptr, csc_row, csc_perm = inputs
    _, arg = output
    ctx.save_for_backward(rowptr, col, values, x, arg, csc_ptr, csc_row, csc_perm)
    ctx.save_for_forward(rowptr, col, values, x, arg)
    ctx.reduce = reduce
    ctx.mark_non_differentiable(arg)


def _backward(ctx, grad_out, _grad_arg):
    return _backward_impl(ctx.saved_tensors, ctx.reduce, ctx.needs_input_grad, grad_out)


def _jvp(ctx, _rowptr_t, _col_t, values_t, x_t, *_):
    rowptr, col, values, x, arg = ctx.saved_tensors
    return _jvp_impl(rowptr, col, values, x, arg, ctx.reduce, values_t, x_t), None


autograd_kernel.register(autograd_kernel.function_class("spmm_csr", _setup_context, _backward,
                                                        _jvp))


# grad_values[e] = s_i <g_i, x_{col e}> is bilinear in (x, g): its derivatives
# are spmm products again, so the backward above is differentiable to any order.
def _edge_grad_setup(ctx, inputs, output):
    rowptr, col, x, grad_out, reduce = inputs
    ctx.save_for_backward(rowptr, col, x, grad_out)
    ctx.save_for_forward(rowptr, col, x, grad_out)
    ctx.reduce = reduce


def _edge_grad_backward(ctx, grad_edges):
    rowptr, col, x, grad_out = ctx.saved_tensors
    d_x = d_grad_out = None
    if ctx.needs_input_grad[2]:
        d_x = transpose_product(rowptr, col, csr_transpose(rowptr, col, x.shape[0]),
                                grad_edges, grad_out, ctx.reduce)
    if ctx.needs_input_grad[3]:
        d_grad_out = _spmm_sum(rowptr, col, grad_edges.contiguous(), x, ctx.reduce)
    return None, None, d_x, d_grad_out, None


def _edge_grad_jvp(ctx, _rowptr_t, _col_t, x_t, grad_out_t, _reduce_t):
    rowptr, col, x, grad_out = ctx.saved_tensors
    terms = [torch.ops.pyattn.spmm_csr_edge_grad(rowptr, col, a, b, ctx.reduce)
             for a, b in ((x_t, grad_out), (x, grad_out_t)) if a is not None and b is not None]
    if not terms:
        return torch.zeros(col.shape, dtype=x.dtype, device=x.device)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


autograd_kernel.register(autograd_kernel.function_class(
    "spmm_csr_edge_grad", _edge_grad_setup, _edge_grad_backward, _edge_grad_jvp))


def _max_backward_has_no_derivative(ctx, *grads):
    raise RuntimeError(
        "pyattn.spmm: reduce='max' / 'min' supports first derivatives only; the second "
        "derivative (double backward through pyattn::spmm_csr_max_backward) is not "
        "implemented. Use reduce='sum' or 'mean' for higher-order gradients.")


autograd_kernel.register(autograd_kernel.function_class(
    "spmm_csr_max_backward", autograd_kernel.no_context, _max_backward_has_no_derivative,
    autograd_kernel.refuse_jvp(
        "pyattn.spmm: reduce='max' / 'min' has no forward-mode derivative of its backward "
        "(pyattn::spmm_csr_max_backward); use reduce='sum' or 'mean'.")))

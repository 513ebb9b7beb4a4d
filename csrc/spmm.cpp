// Argument checks of pyattn::spmm_csr, shared by the CPU and CUDA kernels.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pyattn/spmm_ops.h"

#include <ATen/ops/all.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/lt.h>
#include <c10/util/Exception.h>

namespace pyattn {

Reduce parse_reduce(std::string_view reduce) {
  if (reduce == "sum") return Reduce::Sum;
  if (reduce == "mean") return Reduce::Mean;
  if (reduce == "max") return Reduce::Max;
  TORCH_CHECK_VALUE(false, "spmm: `reduce` must be 'sum', 'mean' or 'max', got '", reduce, "'");
}

void check_csr(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
               const c10::optional<at::Tensor>& values, const at::Tensor& x,
               bool check_values) {
  TORCH_CHECK_VALUE(rowptr.dim() == 1 && rowptr.size(0) >= 1, op,
                    ": `rowptr` must be a 1-D tensor of num_rows + 1 offsets, got shape ",
                    rowptr.sizes());
  TORCH_CHECK_VALUE(col.dim() == 1, op, ": `col` must be 1-D, got shape ", col.sizes());
  TORCH_CHECK_TYPE(rowptr.scalar_type() == at::kLong && col.scalar_type() == at::kLong, op,
                   ": `rowptr` and `col` must be int64, got ", rowptr.scalar_type(), " and ",
                   col.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": `x` must be 2-D (num_nodes, features), got shape ",
                    x.sizes());
  TORCH_CHECK(rowptr.device() == x.device() && col.device() == x.device(), op,
              ": `rowptr`, `col` and `x` must be on one device, got ", rowptr.device(), ", ",
              col.device(), ", ", x.device());
  if (values.has_value()) {
    TORCH_CHECK_VALUE(values->dim() == 1 && values->size(0) == col.size(0), op,
                      ": `values` must be 1-D with one entry per edge (", col.size(0),
                      "), got shape ", values->sizes());
    TORCH_CHECK_TYPE(values->scalar_type() == x.scalar_type(), op, ": `values` must have ",
                     "the dtype of `x` (", x.scalar_type(), "), got ", values->scalar_type());
    TORCH_CHECK(values->device() == x.device(), op, ": `values` must be on ", x.device(),
                ", got ", values->device());
  }
  if (!check_values) return;
  const at::Tensor ptr = rowptr.contiguous();
  TORCH_CHECK_VALUE(ptr[0].item<int64_t>() == 0, op, ": `rowptr[0]` must be 0, got ",
                    ptr[0].item<int64_t>());
  TORCH_CHECK_VALUE(ptr[-1].item<int64_t>() == col.size(0), op, ": `rowptr[-1]` (",
                    ptr[-1].item<int64_t>(), ") must equal len(col) (", col.size(0), ")");
  if (ptr.size(0) > 1) {
    TORCH_CHECK_VALUE(at::all(at::ge(ptr.narrow(0, 1, ptr.size(0) - 1),
                                     ptr.narrow(0, 0, ptr.size(0) - 1))).item<bool>(),
                      op, ": `rowptr` must be non-decreasing");
  }
  if (col.size(0) > 0) {
    TORCH_CHECK_VALUE(at::all(at::ge(col, 0)).item<bool>() &&
                          at::all(at::lt(col, x.size(0))).item<bool>(),
                      op, ": every `col` entry must be in [0, x.size(0) = ", x.size(0), ")");
  }
}

void check_edge_grad(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
                     const at::Tensor& x, const at::Tensor& grad_out, Reduce reduce) {
  TORCH_CHECK_VALUE(reduce != Reduce::Max, op, ": use spmm_csr_max_backward for reduce='max'");
  check_csr(op, rowptr, col, c10::nullopt, x, false);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == rowptr.size(0) - 1 &&
                        grad_out.size(1) == x.size(1) &&
                        grad_out.scalar_type() == x.scalar_type() &&
                        grad_out.device() == x.device(),
                    op, ": `grad_out` must be (", rowptr.size(0) - 1, ", ", x.size(1),
                    ") of dtype ", x.scalar_type(), " on ", x.device());
}

void check_max_backward(const char* op, const at::Tensor& csc_ptr, const at::Tensor& csc_row,
                        const at::Tensor& csc_perm, const at::Tensor& x, const at::Tensor& arg,
                        const at::Tensor& grad_out) {
  TORCH_CHECK_VALUE(csc_ptr.dim() == 1 && csc_ptr.size(0) == x.size(0) + 1 &&
                        csc_row.dim() == 1 && csc_perm.sizes() == csc_row.sizes() &&
                        csc_ptr.scalar_type() == at::kLong && csc_row.scalar_type() == at::kLong &&
                        csc_perm.scalar_type() == at::kLong,
                    op, ": the transposed CSR (csc_ptr of x.size(0) + 1, csc_row, csc_perm of "
                    "one entry per edge, int64) does not match `x`");
  TORCH_CHECK_VALUE(x.dim() == 2 && arg.sizes() == grad_out.sizes() &&
                        arg.scalar_type() == at::kLong && grad_out.dim() == 2 &&
                        grad_out.size(1) == x.size(1) && grad_out.scalar_type() == x.scalar_type(),
                    op, ": `arg` (int64) and `grad_out` (", x.scalar_type(),
                    ") must both be (rows, ", x.size(1), ")");
  TORCH_CHECK(csc_ptr.device() == x.device() && csc_row.device() == x.device() &&
                  csc_perm.device() == x.device() && arg.device() == x.device() &&
                  grad_out.device() == x.device(),
              op, ": all tensors must be on ", x.device());
}

}  // namespace pyattn

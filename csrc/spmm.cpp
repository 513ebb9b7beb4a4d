// Argument checks of pyattn::spmm_csr, shared by the CPU and CUDA kernels.
// Every tensor's device, dtype and shape is checked before any kernel reads a
// pointer; with `check`, the CSR contents too.
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
  if (reduce == "min") return Reduce::Min;
  TORCH_CHECK_VALUE(false, "spmm: `reduce` must be 'sum', 'mean', 'max' or 'min', got '", reduce,
                    "'");
}

namespace {

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": `", name, "` must be on the device of `x` (",
              x.device(), "), got ", t.device());
}

void check_index(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": `", name, "` must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type() &&
                       (t.scalar_type() == at::kLong || t.scalar_type() == at::kInt),
                   op, ": `", name, "` must be int64 or int32 and match `rowptr` (",
                   like.scalar_type(), "), got ", t.scalar_type());
}

// rowptr: starts at 0, ends at `entries`, never decreases; index in [0, bound).
void check_csr_contents(const char* op, const char* ptr_name, const at::Tensor& rowptr,
                        const char* index_name, const at::Tensor& index, const char* bound_name,
                        int64_t bound) {
  const at::Tensor ptr = rowptr.contiguous();
  const int64_t first = ptr[0].item<int64_t>(), last = ptr[-1].item<int64_t>();
  TORCH_CHECK_VALUE(first == 0, op, ": `", ptr_name, "[0]` must be 0, got ", first);
  TORCH_CHECK_VALUE(last == index.size(0), op, ": `", ptr_name, "[-1]` (", last,
                    ") must equal len(", index_name, ") (", index.size(0), ")");
  if (ptr.size(0) > 1) {
    TORCH_CHECK_VALUE(at::all(at::ge(ptr.narrow(0, 1, ptr.size(0) - 1),
                                     ptr.narrow(0, 0, ptr.size(0) - 1))).item<bool>(),
                      op, ": `", ptr_name, "` must be non-decreasing");
  }
  if (index.size(0) > 0) {
    TORCH_CHECK_VALUE(at::all(at::ge(index, 0)).item<bool>() &&
                          at::all(at::lt(index, bound)).item<bool>(),
                      op, ": every `", index_name, "` entry must be in [0, ", bound_name, " = ", bound,
                      ")");
  }
}

}  // namespace

void check_csr(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
               const c10::optional<at::Tensor>& values, const at::Tensor& x,
               bool check_values) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": `x` must be 2-D (num_nodes, features), got shape ",
                    x.sizes());
  check_device(op, "rowptr", rowptr, x);
  check_device(op, "col", col, x);
  if (values.has_value()) check_device(op, "values", *values, x);
  TORCH_CHECK_VALUE(rowptr.dim() == 1 && rowptr.size(0) >= 1, op,
                    ": `rowptr` must be a 1-D tensor of num_rows + 1 offsets, got shape ",
                    rowptr.sizes());
  TORCH_CHECK_TYPE(rowptr.scalar_type() == at::kLong || rowptr.scalar_type() == at::kInt, op,
                   ": `rowptr` must be int64 or int32, got ", rowptr.scalar_type());
  check_index(op, "col", col, rowptr);
  TORCH_CHECK_VALUE(x.size(0) < (int64_t(1) << 31) || rowptr.scalar_type() == at::kLong, op,
                    ": int32 indices cannot address x.size(0) = ", x.size(0), " rows");
  if (values.has_value()) {
    TORCH_CHECK_VALUE(values->dim() == 1 && values->size(0) == col.size(0), op,
                      ": `values` must be 1-D with one entry per edge (", col.size(0),
                      "), got shape ", values->sizes());
    TORCH_CHECK_TYPE(values->scalar_type() == x.scalar_type(), op, ": `values` must have ",
                     "the dtype of `x` (", x.scalar_type(), "), got ", values->scalar_type());
  }
  if (check_values) check_csr_contents(op, "rowptr", rowptr, "col", col, "x.size(0)", x.size(0));
}

void check_transpose(const char* op, const c10::optional<at::Tensor>& csc_ptr,
                     const c10::optional<at::Tensor>& csc_row,
                     const c10::optional<at::Tensor>& csc_perm, const at::Tensor& rowptr,
                     const at::Tensor& col, const at::Tensor& x, bool check_values) {
  const int given = csc_ptr.has_value() + csc_row.has_value() + csc_perm.has_value();
  if (given == 0) return;
  TORCH_CHECK_VALUE(given == 3, op, ": pass all of `csc_ptr`, `csc_row`, `csc_perm` or none");
  check_device(op, "csc_ptr", *csc_ptr, x);
  check_device(op, "csc_row", *csc_row, x);
  check_device(op, "csc_perm", *csc_perm, x);
  check_index(op, "csc_ptr", *csc_ptr, rowptr);
  check_index(op, "csc_row", *csc_row, rowptr);
  TORCH_CHECK_TYPE(csc_perm->dim() == 1 && csc_perm->scalar_type() == at::kLong, op,
                   ": `csc_perm` must be 1-D int64, got ", csc_perm->scalar_type());
  TORCH_CHECK_VALUE(csc_ptr->size(0) == x.size(0) + 1 && csc_row->size(0) == col.size(0) &&
                        csc_perm->size(0) == col.size(0),
                    op, ": the transposed CSR must have x.size(0) + 1 = ", x.size(0) + 1,
                    " offsets and one entry per edge (", col.size(0), "), got ",
                    csc_ptr->sizes(), ", ", csc_row->sizes(), ", ", csc_perm->sizes());
  if (!check_values) return;
  check_csr_contents(op, "csc_ptr", *csc_ptr, "csc_row", *csc_row, "num_rows",
                     rowptr.size(0) - 1);
  if (col.size(0) > 0) {
    TORCH_CHECK_VALUE(at::all(at::ge(*csc_perm, 0)).item<bool>() &&
                          at::all(at::lt(*csc_perm, col.size(0))).item<bool>(),
                      op, ": every `csc_perm` entry must be in [0, ", col.size(0), ")");
  }
}

void check_edge_grad(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
                     const at::Tensor& x, const at::Tensor& grad_out, Reduce reduce) {
  TORCH_CHECK_VALUE(!is_extremum(reduce), op,
                    ": use spmm_csr_max_backward for reduce='max' or 'min'");
  check_csr(op, rowptr, col, c10::nullopt, x, false);
  check_device(op, "grad_out", grad_out, x);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == rowptr.size(0) - 1 &&
                        grad_out.size(1) == x.size(1) &&
                        grad_out.scalar_type() == x.scalar_type(),
                    op, ": `grad_out` must be (", rowptr.size(0) - 1, ", ", x.size(1),
                    ") of dtype ", x.scalar_type());
}

void check_max_backward(const char* op, const at::Tensor& csc_ptr, const at::Tensor& csc_row,
                        const at::Tensor& csc_perm, const c10::optional<at::Tensor>& values,
                        const at::Tensor& x, const at::Tensor& arg,
                        const at::Tensor& grad_out) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": `x` must be 2-D, got shape ", x.sizes());
  check_device(op, "csc_ptr", csc_ptr, x);
  check_device(op, "csc_row", csc_row, x);
  check_device(op, "csc_perm", csc_perm, x);
  check_device(op, "arg", arg, x);
  check_device(op, "grad_out", grad_out, x);
  if (values.has_value()) check_device(op, "values", *values, x);
  TORCH_CHECK_TYPE(csc_ptr.scalar_type() == at::kLong || csc_ptr.scalar_type() == at::kInt, op,
                   ": `csc_ptr` must be int64 or int32, got ", csc_ptr.scalar_type());
  check_index(op, "csc_row", csc_row, csc_ptr);
  TORCH_CHECK_VALUE(csc_ptr.dim() == 1 && csc_ptr.size(0) == x.size(0) + 1 &&
                        csc_perm.dim() == 1 && csc_perm.sizes() == csc_row.sizes() &&
                        csc_perm.scalar_type() == at::kLong,
                    op, ": the transposed CSR (csc_ptr of x.size(0) + 1, csc_row, and an int64 "
                    "csc_perm of one entry per edge) does not match `x`");
  TORCH_CHECK_VALUE(arg.sizes() == grad_out.sizes() && arg.scalar_type() == at::kLong &&
                        grad_out.dim() == 2 && grad_out.size(1) == x.size(1) &&
                        grad_out.scalar_type() == x.scalar_type(),
                    op, ": `arg` (int64) and `grad_out` (", x.scalar_type(),
                    ") must both be (rows, ", x.size(1), ")");
  if (values.has_value()) {
    TORCH_CHECK_VALUE(values->dim() == 1 && values->size(0) == csc_row.size(0) &&
                          values->scalar_type() == x.scalar_type(),
                      op, ": `values` must be 1-D of one ", x.scalar_type(), " per edge");
  }
  // The kernel reads arg[csc_row[k], f] and values[csc_perm[k]]: bound both.
  check_csr_contents(op, "csc_ptr", csc_ptr, "csc_row", csc_row, "grad_out.size(0)",
                     grad_out.size(0));
  if (csc_perm.size(0) > 0) {
    TORCH_CHECK_VALUE(at::all(at::ge(csc_perm, 0)).item<bool>() &&
                          at::all(at::lt(csc_perm, csc_perm.size(0))).item<bool>(),
                      op, ": every `csc_perm` entry must be in [0, ", csc_perm.size(0), ")");
  }
}

}  // namespace pyattn

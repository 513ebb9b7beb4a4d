#pragma once
// Device-independent checks of pyattn::spmm_csr (csrc/spmm.cpp).
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string_view>

#include "pyattn/spmm.h"

namespace pyattn {

Reduce parse_reduce(std::string_view reduce);

// Shapes, dtypes and devices of a CSR product; with `check_values`, also that
// rowptr starts at 0, ends at len(col), never decreases, and every col is in
// [0, x.size(0)). Throws before any kernel reads memory.
void check_csr(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
               const c10::optional<at::Tensor>& values, const at::Tensor& x,
               bool check_values);

// Arguments of spmm_csr_edge_grad (sum / mean only).
void check_edge_grad(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
                     const at::Tensor& x, const at::Tensor& grad_out, Reduce reduce);

// Arguments of spmm_csr_max_backward: the transposed CSR must match `x`.
void check_max_backward(const char* op, const at::Tensor& csc_ptr, const at::Tensor& csc_row,
                        const at::Tensor& csc_perm, const at::Tensor& x, const at::Tensor& arg,
                        const at::Tensor& grad_out);

}  // namespace pyattn

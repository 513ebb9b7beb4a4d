#pragma once
// Device-independent checks of pyattn::spmm_csr (csrc/spmm.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string_view>

#include "pyattn/spmm.h"

namespace pyattn {

Reduce parse_reduce(std::string_view reduce);

// Shapes, dtypes and devices of a CSR product (rowptr and col both int64 or
// both int32); with `check_values`, also that rowptr starts at 0, ends at
// len(col), never decreases, and every col is in [0, x.size(0)). Throws before
// any kernel reads memory.
void check_csr(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
               const c10::optional<at::Tensor>& values, const at::Tensor& x,
               bool check_values);

// The optional transposed CSR passed to spmm_csr for its backward: all or
// none, on x's device, sized for x; with `check_values`, valid contents.
void check_transpose(const char* op, const c10::optional<at::Tensor>& csc_ptr,
                     const c10::optional<at::Tensor>& csc_row,
                     const c10::optional<at::Tensor>& csc_perm, const at::Tensor& rowptr,
                     const at::Tensor& col, const at::Tensor& x, bool check_values);

// Arguments of spmm_csr_edge_grad (sum / mean only).
void check_edge_grad(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
                     const at::Tensor& x, const at::Tensor& grad_out, Reduce reduce);

// Arguments of spmm_csr_max_backward (max and min): the transposed CSR must
// match `x`, and its contents are bounded (the kernel indexes with them).
void check_max_backward(const char* op, const at::Tensor& csc_ptr, const at::Tensor& csc_row,
                        const at::Tensor& csc_perm, const c10::optional<at::Tensor>& values,
                        const at::Tensor& x, const at::Tensor& arg, const at::Tensor& grad_out);

}  // namespace pyattn


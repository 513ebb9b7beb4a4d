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

}  // namespace pyattn

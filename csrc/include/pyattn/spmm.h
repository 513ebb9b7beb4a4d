#pragma once
// CSR sparse x dense products (pyattn::spmm_csr): per-row reduction rules
// shared by the CPU and CUDA kernels.
//
// out[i, f] = reduce_{e in row i} w_e * x[col[e], f], w_e = values[e] or 1.
//   sum : the sum;  mean : the sum / (row length);  max : the largest term.
// An empty row gives 0 under every reduction (isolated nodes).
#include <cstdint>

#include "pyattn/macros.h"

namespace pyattn {

enum class Reduce : int { Sum = 0, Mean = 1, Max = 2 };

// Factor applied to a row's sum: 1 for sum, 1 / length for mean (0 if empty).
template <typename Acc>
PYATTN_HOST_DEVICE Acc row_scale(int64_t length, Reduce reduce) {
  if (reduce != Reduce::Mean) return Acc(1);
  return length > 0 ? Acc(1) / static_cast<Acc>(length) : Acc(0);
}

// Running max with the index of the edge that holds it (first wins ties).
template <typename Acc>
PYATTN_HOST_DEVICE void max_update(Acc term, int64_t edge, Acc& best, int64_t& best_edge) {
  if (best_edge < 0 || term > best) {
    best = term;
    best_edge = edge;
  }
}

}  // namespace pyattn

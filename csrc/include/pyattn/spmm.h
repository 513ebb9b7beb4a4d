#pragma once
// CSR sparse x dense products (pyattn::spmm_csr): per-row reduction rules and
// the CUDA launch plan, shared by the CPU and CUDA kernels (and tested on CPU).
//
// out[i, f] = reduce_{e in row i} w_e * x[col[e], f], w_e = values[e] or 1.
//   sum : the sum;  mean : the sum / (row length);  max / min : the extreme term
//   (NaN wins, as torch.amax / amin; first edge wins ties).
// An empty row gives 0 under every reduction (isolated nodes).
#include <cstdint>

#include "pyattn/macros.h"

namespace pyattn {

enum class Reduce : int { Sum = 0, Mean = 1, Max = 2, Min = 3 };

PYATTN_HOST_DEVICE bool is_extremum(Reduce reduce) {
  return reduce == Reduce::Max || reduce == Reduce::Min;
}

// Factor applied to a row's sum: 1 for sum, 1 / length for mean (0 if empty),
// computed in the accumulation type (float32 for half inputs, never in half:
// a bfloat16 length above 256 would round, a float16 one above 65504 overflow).
template <typename Acc>
PYATTN_HOST_DEVICE Acc row_scale(int64_t length, Reduce reduce) {
  if (reduce != Reduce::Mean) return Acc(1);
  return length > 0 ? Acc(1) / static_cast<Acc>(length) : Acc(0);
}

// Running max (or min) with the edge that holds it. A NaN term replaces a
// non-NaN best (NaN propagates as in torch.amax); otherwise the first edge
// keeps ties, so the backward sends the gradient to one edge.
template <typename Acc>
PYATTN_HOST_DEVICE void extremum_update(Acc term, int64_t edge, bool is_max, Acc& best,
                                        int64_t& best_edge) {
  const bool term_nan = term != term, best_nan = best != best;
  const bool better = is_max ? term > best : term < best;
  if (best_edge < 0 || (term_nan && !best_nan) || (!best_nan && better)) {
    best = term;
    best_edge = edge;
  }
}

// One edge's contribution to a running reduction.
template <typename Acc>
PYATTN_HOST_DEVICE void reduce_update(Reduce reduce, Acc term, int64_t edge, Acc& acc,
                                      int64_t& best_edge) {
  if (is_extremum(reduce)) {
    extremum_update(term, edge, reduce == Reduce::Max, acc, best_edge);
  } else {
    acc += term;
  }
}

// The output value of a finished reduction (`scale` from row_scale).
template <typename Acc>
PYATTN_HOST_DEVICE Acc reduce_result(Reduce reduce, Acc acc, int64_t best_edge, Acc scale) {
  if (is_extremum(reduce)) return best_edge < 0 ? Acc(0) : acc;
  return acc * scale;
}

// CUDA forward launch plan (computed on the host, used by the launcher in
// csrc/cuda/spmm.cu and exposed to Python for tests): a group of `lanes`
// threads (a power of two <= 32, so 32 / lanes rows share a warp when F is
// small) owns one row; each lane loads `vector` consecutive features at once
// (16 bytes when the rows are 16-byte aligned) and keeps `chunks` such vectors
// in registers, so one walk over the row's edges covers lanes * vector * chunks
// features; wider rows take `feature_passes` walks inside the same kernel.
// Exactly one kernel launch per call, whatever the graph size.
struct SpmmPlan {
  int lanes;
  int vector;
  int chunks;
  int64_t feature_passes;
  int64_t rows_per_block;
  int64_t blocks;
  int launches;
};

constexpr int kSpmmWarp = 32;
constexpr int kSpmmWarpsPerBlock = 8;
constexpr int kSpmmMaxChunks = 8;           // sum / mean: 8 vectors in registers
constexpr int kSpmmMaxExtremumChunks = 2;   // max / min also keep an edge per feature
constexpr int64_t kSpmmMaxBlocks = int64_t(1) << 20;  // grid-stride loop beyond

inline SpmmPlan plan_spmm(int64_t rows, int64_t features, int element_size, bool aligned,
                          bool extremum) {
  SpmmPlan plan{};
  plan.vector = aligned && element_size <= 16 && features % (16 / element_size) == 0
                    ? 16 / element_size
                    : 1;
  const int64_t vectors = (features + plan.vector - 1) / plan.vector;  // per row
  plan.lanes = 1;
  while (plan.lanes < kSpmmWarp && plan.lanes < vectors) plan.lanes *= 2;
  const int64_t per_lane = (vectors + plan.lanes - 1) / plan.lanes;
  plan.chunks = 1;
  const int max_chunks = extremum ? kSpmmMaxExtremumChunks : kSpmmMaxChunks;
  while (plan.chunks < max_chunks && plan.chunks < per_lane) plan.chunks *= 2;
  const int64_t per_pass = int64_t(plan.lanes) * plan.vector * plan.chunks;
  plan.feature_passes = features == 0 ? 0 : (features + per_pass - 1) / per_pass;
  plan.rows_per_block = int64_t(kSpmmWarp / plan.lanes) * kSpmmWarpsPerBlock;
  const int64_t blocks = (rows + plan.rows_per_block - 1) / plan.rows_per_block;
  plan.blocks = blocks < kSpmmMaxBlocks ? blocks : kSpmmMaxBlocks;
  plan.launches = rows > 0 && features > 0 ? 1 : 0;
  return plan;
}

}  // namespace pyattn

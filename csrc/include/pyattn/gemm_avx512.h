#pragma once
// Float tile products of the attention kernels in AVX-512 intrinsics, for CPUs
// that have it: C (m x n) = alpha * op(A) B (+ C), B row-major in panels of 64
// columns. Why: at head_dim 64 MKL's sgemm ran the tiles' products (the
// forward's Q K^T, 128 x 512 x 64, and P V, 128 x 64 x 512) at about half the
// rate a loop of FMAs alone reaches (one thread on the 2-core Xeon of
// benchmarks/RESULTS.md: 62-75 GFLOP/s against 110-131), and packed K again for
// every query tile. With these loops the CPU attention ops took 0.83-0.93x the
// time of the same ops on MKL at seq 1024 / 2048 (forward; forward+backward
// 0.86-0.91x; 2 threads, calls interleaved in one process). At head_dim 128
// they took 0.92-1.09x, no gain, so flash_attention.cpp uses them at 64 only.
//
// Each register tile is 6 rows x 64 columns (24 accumulators; per step of k
// 4 vector loads of B and 6 broadcasts of A for 24 FMAs). The order of every
// sum is fixed by the shape alone: results do not depend on the thread count.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#define PYATTN_GEMM_AVX512 1

// GCC 12 bug 105593: see softmax_avx512.h.
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pyattn::cpu::avx512 {

// Columns per panel of B, and rows of A per register tile.
constexpr int64_t kPanelCols = 64, kTileRows = 6;
// k in chunks, so that a panel of B (64 x 64 floats, 16 KiB) stays in L1 while
// every row tile of A passes over it (P V has k = 512; chunks of 128 ran P V
// at 1.11-1.12x of MKL, of 64 at 1.15-1.19x).
constexpr int64_t kDepthChunk = 64;

// Element (r, kk) of A: row r at a + r * lda with unit stride along k, or
// (TransA) column r of a row-major k x m matrix, at a + kk * lda + r.
template <bool TransA>
__attribute__((always_inline)) inline const float* a_element(const float* a, int64_t lda,
                                                             int64_t r, int64_t kk) {
  return TransA ? a + kk * lda + r : a + r * lda + kk;
}

// C[r][0, 16 NV) = alpha * sum_kk A(r, kk) B[kk][0, 16 NV) (+ C) for r < R;
// the last vector of each row covers the lanes `tail` only.
template <int R, int NV, bool TransA>
__attribute__((target("avx512f"), always_inline)) inline void gemm_register_tile(
    int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
    bool accumulate, float* c, int64_t ldc, __mmask16 tail) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[NV];
    for (int v = 0; v < NV - 1; ++v) bv[v] = _mm512_loadu_ps(b + kk * ldb + 16 * v);
    bv[NV - 1] = _mm512_maskz_loadu_ps(tail, b + kk * ldb + 16 * (NV - 1));
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(*a_element<TransA>(a, lda, r, kk));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 lanes = v == NV - 1 ? tail : __mmask16(0xFFFF);
      float* out = c + r * ldc + 16 * v;
      const __m512 x = accumulate
                           ? _mm512_fmadd_ps(scale, acc[r][v], _mm512_maskz_loadu_ps(lanes, out))
                           : _mm512_mul_ps(scale, acc[r][v]);
      _mm512_mask_storeu_ps(out, lanes, x);
    }
  }
}

// Every row of one panel (NV vectors wide): tiles of kTileRows rows, then the rest.
template <int NV, bool TransA>
__attribute__((target("avx512f"))) inline void gemm_panel(int64_t m, int64_t k, float alpha,
                                                          const float* a, int64_t lda,
                                                          const float* b, int64_t ldb,
                                                          bool accumulate, float* c, int64_t ldc,
                                                          __mmask16 tail) {
  int64_t r = 0;
  for (; r + kTileRows <= m; r += kTileRows) {
    gemm_register_tile<kTileRows, NV, TransA>(k, alpha, a_element<TransA>(a, lda, r, 0), lda, b,
                                              ldb, accumulate, c + r * ldc, ldc, tail);
  }
  a = a_element<TransA>(a, lda, r, 0);
  c += r * ldc;
#define PYATTN_GEMM_ROWS(R) \
  gemm_register_tile<R, NV, TransA>(k, alpha, a, lda, b, ldb, accumulate, c, ldc, tail)
  switch (m - r) {
    case 1: PYATTN_GEMM_ROWS(1); break;
    case 2: PYATTN_GEMM_ROWS(2); break;
    case 3: PYATTN_GEMM_ROWS(3); break;
    case 4: PYATTN_GEMM_ROWS(4); break;
    case 5: PYATTN_GEMM_ROWS(5); break;
    default: break;
  }
#undef PYATTN_GEMM_ROWS
  static_assert(kTileRows == 6, "the switch covers the rows left after whole tiles");
}

template <bool TransA>
__attribute__((target("avx512f"))) inline void gemm_panels(int64_t m, int64_t n, int64_t k,
                                                           float alpha, const float* a,
                                                           int64_t lda, const float* b,
                                                           int64_t ldb, int64_t panel_stride,
                                                           bool accumulate, float* c,
                                                           int64_t ldc) {
  for (int64_t k0 = 0; k0 < k; k0 += kDepthChunk) {
    const int64_t depth = std::min(kDepthChunk, k - k0);
    const bool add = accumulate || k0 > 0;
    const float* a_chunk = a_element<TransA>(a, lda, 0, k0);
    for (int64_t j = 0; j < n; j += kPanelCols) {
      const int64_t width = std::min(kPanelCols, n - j);
      const __mmask16 tail =
          width % 16 == 0 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (width % 16)) - 1);
      const float* panel = b + j / kPanelCols * panel_stride + k0 * ldb;
#define PYATTN_GEMM_PANEL(NV) \
  gemm_panel<NV, TransA>(m, depth, alpha, a_chunk, lda, panel, ldb, add, c + j, ldc, tail)
      switch ((width + 15) / 16) {
        case 1: PYATTN_GEMM_PANEL(1); break;
        case 2: PYATTN_GEMM_PANEL(2); break;
        case 3: PYATTN_GEMM_PANEL(3); break;
        default: PYATTN_GEMM_PANEL(4); break;
      }
#undef PYATTN_GEMM_PANEL
    }
  }
}

// C (m x n, ldc) = alpha * op(A) B + (accumulate ? C : 0), float. op(A) (m x k):
// row r at a + r * lda with unit stride along k, or (trans_a) A is a row-major
// k x m matrix of row stride lda. B (k x n): columns [64 p, 64 p + 64) of row
// kk at b + p * panel_stride + kk * ldb (row-major B: panel_stride 64).
__attribute__((target("avx512f"))) inline void gemm(bool trans_a, int64_t m, int64_t n,
                                                    int64_t k, float alpha, const float* a,
                                                    int64_t lda, const float* b, int64_t ldb,
                                                    int64_t panel_stride, bool accumulate,
                                                    float* c, int64_t ldc) {
  if (k == 0) {  // an empty sum: C = 0 (+ C), as BLAS with beta 0 or 1
    for (int64_t r = 0; r < m && !accumulate; ++r) std::fill(c + r * ldc, c + r * ldc + n, 0.0f);
    return;
  }
  if (trans_a) {
    gemm_panels<true>(m, n, k, alpha, a, lda, b, ldb, panel_stride, accumulate, c, ldc);
  } else {
    gemm_panels<false>(m, n, k, alpha, a, lda, b, ldb, panel_stride, accumulate, c, ldc);
  }
}

}  // namespace pyattn::cpu::avx512

#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#else
#define PYATTN_GEMM_AVX512 0
#endif

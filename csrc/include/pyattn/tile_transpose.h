#pragma once
// dst (dim x rows, row stride ld) = the transpose of src (rows x dim, row
// stride src_stride), for the attention kernels' transposed K and V tiles.
// Float blocks of 16 x 16 go through AVX-512 registers where the CPU has it
// (16 loads, 64 shuffles, 16 stores); the rest element by element in 16 x 16
// blocks, whose reads and writes stay in cache lines.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "pyattn/cpu_vector.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYATTN_TRANSPOSE_AVX512 1
#else
#define PYATTN_TRANSPOSE_AVX512 0
#endif

namespace pyattn::cpu {

#if PYATTN_TRANSPOSE_AVX512
// GCC 12 bug 105593: see softmax_avx512.h.
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// One 16 x 16 float block: rows interleaved in pairs (unpack ps), then in
// fours (unpack pd), then 128-bit lanes gathered in two rounds of shuffle_f32x4.
__attribute__((target("avx512f"))) inline void transpose_16x16(const float* src,
                                                                int64_t src_stride, float* dst,
                                                                int64_t ld) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
  // t[2k], t[2k+1]: rows 2k and 2k+1 interleaved, columns {0,1} / {2,3} of each lane
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  // r[4m + j], lane L: rows 4m..4m+3 of column 4L + j
  for (int m = 0; m < 4; ++m) {
    const __m512d a = _mm512_castps_pd(t[4 * m]), b = _mm512_castps_pd(t[4 * m + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * m + 2]), d = _mm512_castps_pd(t[4 * m + 3]);
    r[4 * m] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * m + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * m + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * m + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // t[j] / t[4 + j]: rows 0-7 of columns {j, 8 + j} / {4 + j, 12 + j}; t[8 + ...]: rows 8-15
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {
    _mm512_storeu_ps(dst + j * ld, _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
    _mm512_storeu_ps(dst + (8 + j) * ld, _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd));
    _mm512_storeu_ps(dst + (4 + j) * ld, _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88));
    _mm512_storeu_ps(dst + (12 + j) * ld, _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd));
  }
}
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

template <typename T>
void transpose_rows(const T* src, int64_t src_stride, int64_t rows, int64_t dim, T* dst,
                    int64_t ld) {
  constexpr int64_t kBlock = 16;
#if PYATTN_TRANSPOSE_AVX512
  const bool registers = std::is_same_v<T, float> && cpu_has_avx512f();
#else
  [[maybe_unused]] constexpr bool registers = false;
#endif
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    for (int64_t c0 = 0; c0 < dim; c0 += kBlock) {
      const int64_t r1 = std::min(r0 + kBlock, rows), c1 = std::min(c0 + kBlock, dim);
#if PYATTN_TRANSPOSE_AVX512
      if constexpr (std::is_same_v<T, float>) {
        if (registers && r1 - r0 == kBlock && c1 - c0 == kBlock) {
          transpose_16x16(src + r0 * src_stride + c0, src_stride, dst + c0 * ld + r0, ld);
          continue;
        }
      }
#endif
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) dst[c * ld + r] = src[r * src_stride + c];
      }
    }
  }
}

}  // namespace pyattn::cpu

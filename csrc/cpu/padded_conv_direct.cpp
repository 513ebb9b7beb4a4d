// Direct forward of pyattn::padded_conv2d on AVX-512 CPUs (float32, float64):
// no column matrix and no GEMM call. Each work item (a sample's block of
// output rows) packs the input rows that block reads, padding resolved through
// padding.h's source_index as im2col resolves it, then register-tiled
// micro-kernels sweep the block: a tile of P output pixels of one row times NB
// vectors of output channels, summed over (input channel, tap) against the
// weight laid out as (C_in, KH*KW, C_out) rows.
//
// Why: Net1's strided layers have small planes (18x18 down to 6x6) and 32-64
// channels. The column matrix of such a layer is 2.5-3.2x its input, written in
// fragments of 6-18 values; im2col took as long as the GEMM itself (perf, Net1
// conv4). Here the packed block is about the input's size, written in whole
// rows, and the micro-kernel reads it by broadcasts.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "pyattn/cpu_vector.h"
#include "pyattn/padded_conv_direct.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYATTN_DIRECT_CONV 1
#else
#define PYATTN_DIRECT_CONV 0
#endif

namespace pyattn {

#if PYATTN_DIRECT_CONV
namespace {

// Packed input rows of one work item stay within this (L2 holds them while
// every tile of the block reads them).
constexpr int64_t kPackBytes = 256 * 1024;

template <typename T>
struct Zmm;

template <>
struct Zmm<float> {
  using V = __m512;
  static constexpr int kLanes = 16;
  __attribute__((target("avx512f"), always_inline)) static V zero() { return _mm512_setzero_ps(); }
  __attribute__((target("avx512f"), always_inline)) static V load(const float* p) {
    return _mm512_loadu_ps(p);
  }
  __attribute__((target("avx512f"), always_inline)) static V broadcast(const float* p) {
    return _mm512_set1_ps(*p);
  }
  __attribute__((target("avx512f"), always_inline)) static V fma(V a, V b, V c) {
    return _mm512_fmadd_ps(a, b, c);
  }
  __attribute__((target("avx512f"), always_inline)) static V add(V a, V b) {
    return _mm512_add_ps(a, b);
  }
  __attribute__((target("avx512f"), always_inline)) static void store(float* p, V v) {
    _mm512_storeu_ps(p, v);
  }
};

template <>
struct Zmm<double> {
  using V = __m512d;
  static constexpr int kLanes = 8;
  __attribute__((target("avx512f"), always_inline)) static V zero() { return _mm512_setzero_pd(); }
  __attribute__((target("avx512f"), always_inline)) static V load(const double* p) {
    return _mm512_loadu_pd(p);
  }
  __attribute__((target("avx512f"), always_inline)) static V broadcast(const double* p) {
    return _mm512_set1_pd(*p);
  }
  __attribute__((target("avx512f"), always_inline)) static V fma(V a, V b, V c) {
    return _mm512_fmadd_pd(a, b, c);
  }
  __attribute__((target("avx512f"), always_inline)) static V add(V a, V b) {
    return _mm512_add_pd(a, b);
  }
  __attribute__((target("avx512f"), always_inline)) static void store(double* p, V v) {
    _mm512_storeu_pd(p, v);
  }
};

// dst[p * dst_row + j * lanes + l] = sum over (c, t) of
//   x[c * channel_stride + tap_offsets[t] + S * p] * w[(c * taps + t) * w_row + j * lanes + l]
// for P pixels (stride S apart in the packed rows) and NB channel vectors:
// P * NB accumulators in registers, one weight row and P broadcasts per step.
// Add: dst += the sums instead (the input gradient's scatter).
template <typename T, int P, int NB, int S, bool Add>
__attribute__((target("avx512f"))) void conv_tile(const T* x, int64_t channels,
                                                  int64_t channel_stride,
                                                  const int32_t* tap_offsets, int64_t taps,
                                                  const T* w, int64_t w_row, T* dst,
                                                  int64_t dst_row) {
  using Z = Zmm<T>;
  typename Z::V acc[P][NB];
  for (int p = 0; p < P; ++p) {
    for (int j = 0; j < NB; ++j) acc[p][j] = Z::zero();
  }
  for (int64_t c = 0; c < channels; ++c) {
    const T* channel = x + c * channel_stride;
    for (int64_t t = 0; t < taps; ++t, w += w_row) {
      const T* tap = channel + tap_offsets[t];
      typename Z::V weights[NB];
      for (int j = 0; j < NB; ++j) weights[j] = Z::load(w + j * Z::kLanes);
      for (int p = 0; p < P; ++p) {
        const typename Z::V value = Z::broadcast(tap + S * p);
        for (int j = 0; j < NB; ++j) acc[p][j] = Z::fma(value, weights[j], acc[p][j]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int j = 0; j < NB; ++j) {
      T* out = dst + p * dst_row + j * Z::kLanes;
      Z::store(out, Add ? Z::add(Z::load(out), acc[p][j]) : acc[p][j]);
    }
  }
}

using TileKernel = void (*)(const void*, int64_t, int64_t, const int32_t*, int64_t, const void*,
                            int64_t, void*, int64_t);

// Most pixels per tile for NB channel vectors: P * NB <= 24 accumulators (of
// 32 registers), P <= 16 for NB = 1 (there one broadcast feeds one FMA).
constexpr int kMaxVectors = 4;
constexpr std::array<int, kMaxVectors + 1> kMaxPixels{0, 16, 12, 8, 6};

template <typename T, int P, int NB, int S, bool Add>
void conv_tile_erased(const void* x, int64_t channels, int64_t channel_stride,
                      const int32_t* tap_offsets, int64_t taps, const void* w, int64_t w_row,
                      void* dst, int64_t dst_row) {
  conv_tile<T, P, NB, S, Add>(static_cast<const T*>(x), channels, channel_stride, tap_offsets, taps,
                         static_cast<const T*>(w), w_row, static_cast<T*>(dst), dst_row);
}

template <typename T, int NB, int S, bool Add, int P = kMaxPixels[NB]>
TileKernel tile_kernel_for_pixels(int pixels) {
  if constexpr (P == 0) {
    return nullptr;
  } else {
    return pixels == P ? &conv_tile_erased<T, P, NB, S, Add>
                       : tile_kernel_for_pixels<T, NB, S, Add, P - 1>(pixels);
  }
}

template <typename T, int S, bool Add = false>
TileKernel tile_kernel(int vectors, int pixels) {
  switch (vectors) {
    case 1: return tile_kernel_for_pixels<T, 1, S, Add>(pixels);
    case 2: return tile_kernel_for_pixels<T, 2, S, Add>(pixels);
    case 3: return tile_kernel_for_pixels<T, 3, S, Add>(pixels);
    default: return tile_kernel_for_pixels<T, 4, S, Add>(pixels);
  }
}

// acc[t][j * lanes + l] += sum over pixels (oh, ow) of `rows` x `width` of
//   x[oh * row_stride + S * ow + tap_offsets[t]] * grad[(oh * width + ow) * grad_row + j * lanes + l]
// for TT taps of one input channel and NB vectors of output channels: the
// weight gradient's products, summed in pixel order, then added to `acc`.
template <typename T, int TT, int NB, int S>
__attribute__((target("avx512f"))) void grad_weight_tile(const T* x, int64_t rows, int64_t width,
                                                         int64_t row_stride,
                                                         const int32_t* tap_offsets,
                                                         const T* grad, int64_t grad_row, T* acc,
                                                         int64_t acc_row) {
  using Z = Zmm<T>;
  typename Z::V sums[TT][NB];
  for (int t = 0; t < TT; ++t) {
    for (int j = 0; j < NB; ++j) sums[t][j] = Z::zero();
  }
  int32_t offsets[TT];
  for (int t = 0; t < TT; ++t) offsets[t] = tap_offsets[t];
  for (int64_t oh = 0; oh < rows; ++oh) {
    const T* pixel = x + oh * row_stride;
    const T* g = grad + oh * width * grad_row;
    for (int64_t ow = 0; ow < width; ++ow, pixel += S, g += grad_row) {
      typename Z::V grads[NB];
      for (int j = 0; j < NB; ++j) grads[j] = Z::load(g + j * Z::kLanes);
      for (int t = 0; t < TT; ++t) {
        const typename Z::V value = Z::broadcast(pixel + offsets[t]);
        for (int j = 0; j < NB; ++j) sums[t][j] = Z::fma(value, grads[j], sums[t][j]);
      }
    }
  }
  for (int t = 0; t < TT; ++t) {
    for (int j = 0; j < NB; ++j) {
      T* dst = acc + t * acc_row + j * Z::kLanes;
      Z::store(dst, Z::add(Z::load(dst), sums[t][j]));
    }
  }
}

using GradTileKernel = void (*)(const void*, int64_t, int64_t, int64_t, const int32_t*,
                                const void*, int64_t, void*, int64_t);

// Most taps per weight-gradient tile for NB channel vectors (TT * NB <= 24).
constexpr std::array<int, kMaxVectors + 1> kMaxTaps{0, 16, 12, 8, 6};

template <typename T, int TT, int NB, int S>
void grad_weight_tile_erased(const void* x, int64_t rows, int64_t width, int64_t row_stride,
                             const int32_t* tap_offsets, const void* grad, int64_t grad_row,
                             void* acc, int64_t acc_row) {
  grad_weight_tile<T, TT, NB, S>(static_cast<const T*>(x), rows, width, row_stride, tap_offsets,
                                 static_cast<const T*>(grad), grad_row, static_cast<T*>(acc),
                                 acc_row);
}

template <typename T, int NB, int S, int TT = kMaxTaps[NB]>
GradTileKernel grad_kernel_for_taps(int taps) {
  if constexpr (TT == 0) {
    return nullptr;
  } else {
    return taps == TT ? &grad_weight_tile_erased<T, TT, NB, S>
                      : grad_kernel_for_taps<T, NB, S, TT - 1>(taps);
  }
}

template <typename T, int S>
GradTileKernel grad_kernel(int vectors, int taps) {
  switch (vectors) {
    case 1: return grad_kernel_for_taps<T, 1, S>(taps);
    case 2: return grad_kernel_for_taps<T, 2, S>(taps);
    case 3: return grad_kernel_for_taps<T, 3, S>(taps);
    default: return grad_kernel_for_taps<T, 4, S>(taps);
  }
}

// Everything a work item needs, fixed per call (shapes only).
struct DirectPlan {
  const ConvGeometry& g;
  int64_t groups, in_per_group, out_per_group, out_padded;  // out_padded: per group, whole vectors
  int64_t taps, packed_width, block_rows, packed_rows, blocks_per_sample;
  std::vector<int32_t> tap_offsets;   // within one packed channel
  std::vector<int64_t> column_source; // source_index per packed column, -1: zero
  int64_t interior_begin, interior_end;  // packed columns [begin, end) read column q - pad
};

// Rows of a packed block (output rows [oh0, oh0 + rows)) read by its taps.
int64_t packed_rows_for(const Axis& a, int64_t rows) {
  return a.stride * (rows - 1) + a.dilation * (a.kernel - 1) + 1;
}

template <typename T>
DirectPlan make_plan(const ConvGeometry& g, int64_t groups, int64_t out_channels) {
  DirectPlan plan{g, groups, g.channels / groups, out_channels / groups, 0, g.h.kernel * g.w.kernel,
                  packed_rows_for(g.w, g.w.out_size), 1, 0, 0, {}, {}, 0, 0};
  constexpr int64_t lanes = Zmm<T>::kLanes;
  plan.out_padded = (plan.out_per_group + lanes - 1) / lanes * lanes;
  // Rows per block: the packed input rows and the block's (pixel, channel)
  // products (or transposed grad output) each within kPackBytes.
  const int64_t row_bytes = g.channels * plan.packed_width * int64_t(sizeof(T));
  const int64_t product_row_bytes = g.w.out_size * groups * plan.out_padded * int64_t(sizeof(T));
  while (plan.block_rows < g.h.out_size &&
         packed_rows_for(g.h, plan.block_rows + 1) * row_bytes <= kPackBytes &&
         (plan.block_rows + 1) * product_row_bytes <= kPackBytes) {
    ++plan.block_rows;
  }
  plan.packed_rows = packed_rows_for(g.h, plan.block_rows);
  plan.blocks_per_sample = (g.h.out_size + plan.block_rows - 1) / plan.block_rows;
  for (int64_t kh = 0; kh < g.h.kernel; ++kh) {
    for (int64_t kw = 0; kw < g.w.kernel; ++kw) {
      plan.tap_offsets.push_back(
          static_cast<int32_t>(kh * g.h.dilation * plan.packed_width + kw * g.w.dilation));
    }
  }
  for (int64_t q = 0; q < plan.packed_width; ++q) {
    plan.column_source.push_back(source_index(q - g.w.pad_before, g.w.size, g.mode));
  }
  plan.interior_begin = std::clamp<int64_t>(g.w.pad_before, 0, plan.packed_width);
  plan.interior_end = std::clamp<int64_t>(g.w.pad_before + g.w.size, plan.interior_begin,
                                          plan.packed_width);
  return plan;
}

// One 16 x 16 float tile: b[j * b_row + i] = a[i * a_row + j] for i < rows,
// j < cols (both <= 16) in 64 in-register shuffles: unpack 32-bit, then
// 64-bit pairs, then two rounds of 128-bit lane shuffles. Lanes past `rows` /
// `cols` are masked off on load and store.
__attribute__((target("avx512f"))) void transpose_tile_16(const float* a, int64_t a_row,
                                                          int64_t rows, int64_t cols, float* b,
                                                          int64_t b_row) {
  // Full-mask maskz forms: the plain intrinsics draw GCC 12's
  // -Wmaybe-uninitialized (their pass-through operand is undefined).
  constexpr __mmask16 kAll16 = 0xFFFF;
  constexpr __mmask8 kAll8 = 0xFF;
  const __mmask16 col_mask = __mmask16((1u << cols) - 1), row_mask = __mmask16((1u << rows) - 1);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = i < rows ? _mm512_maskz_loadu_ps(col_mask, a + i * a_row) : _mm512_setzero_ps();
  }
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_maskz_unpacklo_ps(kAll16, r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_maskz_unpackhi_ps(kAll16, r[2 * k], r[2 * k + 1]);
  }
  // r[4k + m], lane L: rows 4k..4k+3 of column 4L + m.
  for (int k = 0; k < 4; ++k) {
    const __m512d t0 = _mm512_castps_pd(t[4 * k]), t1 = _mm512_castps_pd(t[4 * k + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * k + 2]), t3 = _mm512_castps_pd(t[4 * k + 3]);
    r[4 * k] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(kAll8, t0, t2));
    r[4 * k + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(kAll8, t0, t2));
    r[4 * k + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(kAll8, t1, t3));
    r[4 * k + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(kAll8, t1, t3));
  }
  for (int m = 0; m < 4; ++m) {
    t[m] = _mm512_maskz_shuffle_f32x4(kAll16, r[m], r[4 + m], 0x88);       // lanes 0, 2 of rows 0-7
    t[m + 4] = _mm512_maskz_shuffle_f32x4(kAll16, r[m], r[4 + m], 0xdd);   // lanes 1, 3 of rows 0-7
    t[m + 8] = _mm512_maskz_shuffle_f32x4(kAll16, r[8 + m], r[12 + m], 0x88);
    t[m + 12] = _mm512_maskz_shuffle_f32x4(kAll16, r[8 + m], r[12 + m], 0xdd);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 column[4] = {_mm512_maskz_shuffle_f32x4(kAll16, t[m], t[m + 8], 0x88),
                              _mm512_maskz_shuffle_f32x4(kAll16, t[m + 4], t[m + 12], 0x88),
                              _mm512_maskz_shuffle_f32x4(kAll16, t[m], t[m + 8], 0xdd),
                              _mm512_maskz_shuffle_f32x4(kAll16, t[m + 4], t[m + 12], 0xdd)};
    for (int lane = 0; lane < 4; ++lane) {
      const int j = 4 * lane + m;
      if (j < cols) _mm512_mask_storeu_ps(b + j * b_row, row_mask, column[lane]);
    }
  }
}

// b[j * b_row + i] = a[i * a_row + j] for i < rows, j < cols, in 16 x 16
// tiles: both sides' cache lines of a tile stay in L1 while it is copied (a
// whole-row pass with a strided side missed L1 on every element: 70% of Net1
// conv1's weight gradient). float tiles go through registers (the direct
// kernels run only on AVX-512 CPUs); double (tests, gradcheck) element-wise.
template <typename T>
void transpose(const T* __restrict a, int64_t a_row, int64_t rows, int64_t cols, T* __restrict b,
               int64_t b_row) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      if constexpr (std::is_same_v<T, float>) {
        transpose_tile_16(a + i0 * a_row + j0, a_row, i1 - i0, j1 - j0, b + j0 * b_row + i0, b_row);
      } else {
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) b[j * b_row + i] = a[i * a_row + j];
        }
      }
    }
  }
}

// Packed rows [0, rows) of every input channel of one sample, starting at
// virtual row `first_row`: dst[(c * packed_rows + r) * packed_width + q].
template <typename T>
void pack_block(const DirectPlan& plan, const T* __restrict sample, int64_t first_row,
                int64_t rows, T* __restrict dst) {
  const ConvGeometry& g = plan.g;
  const int64_t width = plan.packed_width, begin = plan.interior_begin, end = plan.interior_end;
  const int64_t* column_source = plan.column_source.data();
  // Rows that read their own input row, [inner_begin, inner_end), come first,
  // and within a row its interior columns: the channels' rows are then read
  // in memory order, one stream across the sample that the hardware
  // prefetcher follows, and the padding rows and columns mostly read rows
  // already in cache (all of them where a block spans the plane, as in
  // Net1). Border reads first broke that stream at every channel (perf: 64%
  // of this function in circular mode, whose first rows wrap to the
  // channel's end); in this order Net1's conv2 forward and weight gradient
  // in circular mode take 0.79-0.88x the time (same-process pairs).
  const int64_t inner_begin = std::clamp<int64_t>(-first_row, 0, rows);
  const int64_t inner_end = std::clamp<int64_t>(g.h.size - first_row, inner_begin, rows);
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* channel = sample + c * g.h.size * g.w.size;
    T* packed_channel = dst + c * plan.packed_rows * width;
    const auto pack_row = [&](int64_t r) {
      T* packed = packed_channel + r * width;
      const int64_t source_row = source_index(first_row + r, g.h.size, g.mode);
      if (source_row < 0) {
        std::fill(packed, packed + width, T(0));
        return;
      }
      // Interior: packed column q reads element q - pad_before (none: no
      // pointer to form).
      const T* row = channel + source_row * g.w.size;
      if (begin < end) {
        std::copy(row + (begin - g.w.pad_before), row + (end - g.w.pad_before), packed + begin);
      }
      for (int64_t q = 0; q < begin; ++q) packed[q] = column_source[q] < 0 ? T(0) : row[column_source[q]];
      for (int64_t q = end; q < width; ++q) packed[q] = column_source[q] < 0 ? T(0) : row[column_source[q]];
    };
    for (int64_t r = inner_begin; r < inner_end; ++r) pack_row(r);
    for (int64_t r = 0; r < inner_begin; ++r) pack_row(r);
    for (int64_t r = inner_end; r < rows; ++r) pack_row(r);
  }
}

template <typename T>
void direct_forward(const at::Tensor& input, const at::Tensor& weight, const ConvGeometry& g,
                    int64_t groups, const at::Tensor& out) {
  const int64_t batch = input.size(0), out_channels = out.size(1);
  const DirectPlan plan = make_plan<T>(g, groups, out_channels);
  constexpr int64_t lanes = Zmm<T>::kLanes;
  // (G, C_in/G, KH*KW, out_padded): each (c, tap) one row of output-channel
  // weights, zero past the group's channels.
  const at::Tensor packed_weight =
      at::zeros({groups, plan.in_per_group, plan.taps, plan.out_padded}, weight.options());
  packed_weight.narrow(3, 0, plan.out_per_group)
      .copy_(weight.reshape({groups, plan.out_per_group, plan.in_per_group, plan.taps})
                 .permute({0, 2, 3, 1}));
  const T* x = input.const_data_ptr<T>();
  const T* w = packed_weight.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  const int64_t plane = g.out_plane(), out_width = g.w.out_size;
  const int64_t product_row = groups * plan.out_padded;  // one pixel's outputs, all groups
  const int64_t packed_channel = plan.packed_rows * plan.packed_width;
  at::parallel_for(0, batch * plan.blocks_per_sample, 1, [&](int64_t begin, int64_t end) {
    // Uninitialised: every element is written before it is read.
    const std::unique_ptr<T[]> packed(new T[g.channels * packed_channel]);
    const std::unique_ptr<T[]> products(new T[plan.block_rows * out_width * product_row]);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / plan.blocks_per_sample;
      const int64_t oh0 = item % plan.blocks_per_sample * plan.block_rows;
      const int64_t rows = std::min(plan.block_rows, g.h.out_size - oh0);
      pack_block(plan, x + n * g.channels * g.h.size * g.w.size,
                 oh0 * g.h.stride - g.h.pad_before, packed_rows_for(g.h, rows), packed.get());
      for (int64_t grp = 0; grp < groups; ++grp) {
        const T* group_input = packed.get() + grp * plan.in_per_group * packed_channel;
        const T* group_weight = w + grp * plan.in_per_group * plan.taps * plan.out_padded;
        for (int64_t o0 = 0; o0 < plan.out_padded; o0 += kMaxVectors * lanes) {
          const int vectors = int(std::min<int64_t>(kMaxVectors, (plan.out_padded - o0) / lanes));
          // Each row in near-equal tiles of at most kMaxPixels[vectors] pixels.
          const int64_t tiles = (out_width + kMaxPixels[vectors] - 1) / kMaxPixels[vectors];
          for (int64_t oh = 0; oh < rows; ++oh) {
            const T* input_row = group_input + oh * g.h.stride * plan.packed_width;
            T* product = products.get() + oh * out_width * product_row + grp * plan.out_padded + o0;
            for (int64_t tile = 0, ow = 0; tile < tiles; ++tile) {
              const int pixels = int((out_width * (tile + 1)) / tiles - ow);
              const TileKernel kernel = g.w.stride == 1 ? tile_kernel<T, 1>(vectors, pixels)
                                                         : tile_kernel<T, 2>(vectors, pixels);
              kernel(input_row + ow * g.w.stride, plan.in_per_group, packed_channel,
                     plan.tap_offsets.data(), plan.taps, group_weight + o0, plan.out_padded,
                     product + ow * product_row, product_row);
              ow += pixels;
            }
          }
        }
      }
      // (pixel, channel) products -> the (channel, pixel) output rows.
      for (int64_t grp = 0; grp < groups; ++grp) {
        transpose(products.get() + grp * plan.out_padded, product_row, rows * out_width,
                  plan.out_per_group,
                  y + (n * out_channels + grp * plan.out_per_group) * plane + oh0 * out_width,
                  plane);
      }
    }
  });
}

// (pixel, G * out_padded) rows of the grad output of one work item (sample n,
// output rows [oh0, oh0 + rows)): the transpose of its (channel, pixel) rows,
// zero in each group's lanes past its channels.
template <typename T>
void transpose_grad_output(const DirectPlan& plan, const T* grad_output, int64_t n,
                           int64_t out_channels, int64_t oh0, int64_t rows, T* dst) {
  const ConvGeometry& g = plan.g;
  const int64_t pixels = rows * g.w.out_size, product_row = plan.groups * plan.out_padded;
  for (int64_t grp = 0; grp < plan.groups; ++grp) {
    T* group_dst = dst + grp * plan.out_padded;
    transpose(grad_output + (n * out_channels + grp * plan.out_per_group) * g.out_plane() +
                  oh0 * g.w.out_size,
              g.out_plane(), plan.out_per_group, pixels, group_dst, product_row);
    for (int64_t p = 0; p < pixels; ++p) {
      std::fill(group_dst + p * product_row + plan.out_per_group,
                group_dst + p * product_row + plan.out_padded, T(0));
    }
  }
}

template <typename T>
at::Tensor direct_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                              const ConvGeometry& g, int64_t groups, int64_t out_channels,
                              int64_t blocks) {
  const int64_t batch = input.size(0);
  const DirectPlan plan = make_plan<T>(g, groups, out_channels);
  constexpr int64_t lanes = Zmm<T>::kLanes;
  // Per block of samples its partial sums as (G, C_in/G, KH*KW, out_padded),
  // added in block order at the end: the same sums for any thread count.
  const at::Tensor partials = at::zeros(
      {blocks, groups, plan.in_per_group, plan.taps, plan.out_padded}, input.options());
  const T* x = input.const_data_ptr<T>();
  const T* go = grad_output.const_data_ptr<T>();
  T* partial_data = partials.mutable_data_ptr<T>();
  const int64_t product_row = groups * plan.out_padded;
  const int64_t packed_channel = plan.packed_rows * plan.packed_width;
  const int64_t partial_size = groups * plan.in_per_group * plan.taps * plan.out_padded;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // Uninitialised: every element is written before it is read.
    const std::unique_ptr<T[]> packed(new T[g.channels * packed_channel]);
    const std::unique_ptr<T[]> grads(new T[plan.block_rows * g.w.out_size * product_row]);
    for (int64_t block = begin; block < end; ++block) {
      T* partial = partial_data + block * partial_size;
      const int64_t last = batch * (block + 1) / blocks;
      for (int64_t item = batch * block / blocks * plan.blocks_per_sample;
           item < last * plan.blocks_per_sample; ++item) {
        const int64_t n = item / plan.blocks_per_sample;
        const int64_t oh0 = item % plan.blocks_per_sample * plan.block_rows;
        const int64_t rows = std::min(plan.block_rows, g.h.out_size - oh0);
        pack_block(plan, x + n * g.channels * g.h.size * g.w.size,
                   oh0 * g.h.stride - g.h.pad_before, packed_rows_for(g.h, rows), packed.get());
        transpose_grad_output(plan, go, n, out_channels, oh0, rows, grads.get());
        for (int64_t grp = 0; grp < groups; ++grp) {
          for (int64_t o0 = 0; o0 < plan.out_padded; o0 += kMaxVectors * lanes) {
            const int vectors = int(std::min<int64_t>(kMaxVectors, (plan.out_padded - o0) / lanes));
            for (int64_t c = 0; c < plan.in_per_group; ++c) {
              const T* channel = packed.get() + (grp * plan.in_per_group + c) * packed_channel;
              T* acc = partial + ((grp * plan.in_per_group + c) * plan.taps) * plan.out_padded + o0;
              for (int64_t t0 = 0; t0 < plan.taps; t0 += kMaxTaps[vectors]) {
                const int taps = int(std::min<int64_t>(kMaxTaps[vectors], plan.taps - t0));
                const GradTileKernel kernel = g.w.stride == 1 ? grad_kernel<T, 1>(vectors, taps)
                                                               : grad_kernel<T, 2>(vectors, taps);
                kernel(channel, rows, g.w.out_size, g.h.stride * plan.packed_width,
                       plan.tap_offsets.data() + t0, grads.get() + grp * plan.out_padded + o0,
                       product_row, acc + t0 * plan.out_padded, plan.out_padded);
              }
            }
          }
        }
      }
    }
  });
  // (G, C_in/G, T, O/G) -> (G, O/G, C_in/G, T) = the weight's layout.
  return partials.sum(0)
      .narrow(3, 0, plan.out_per_group)
      .permute({0, 3, 1, 2})
      .reshape({out_channels, plan.in_per_group, g.h.kernel, g.w.kernel})
      .contiguous();  // (reshape may keep the permuted strides)
}

// The input gradient's packed buffer (padded rows x padded columns x input
// channels of one sample) stays within this, in L2 while it is summed.
constexpr int64_t kGradPackBytes = 1 << 20;

// Packed extent along an axis for the input gradient: every position a tap reads.
int64_t grad_packed_extent(const Axis& a) { return packed_rows_for(a, a.out_size); }

// [begin, end) of packed positions along an axis that are input elements
// (position i reads element i - pad_before).
std::pair<int64_t, int64_t> interior(const Axis& a, int64_t extent) {
  const int64_t begin = std::clamp<int64_t>(a.pad_before, 0, extent);
  return {begin, std::clamp<int64_t>(a.pad_before + a.size, begin, extent)};
}

// dst[i] += src[i] for i < n, n a multiple of the vector's lanes.
template <typename T>
__attribute__((target("avx512f"))) void add_vectors(const T* src, T* dst, int64_t n) {
  using Z = Zmm<T>;
  for (int64_t i = 0; i < n; i += Z::kLanes) {
    Z::store(dst + i, Z::add(Z::load(dst + i), Z::load(src + i)));
  }
}

// Per sample: the grad output's products with the weight, scattered into the
// gradient of the packed input, (row, column, channel) positions (a tile of P
// pixels x NB vectors of input channels summed over the output channels, then
// added at the positions one tap reads), folded into the input's (channel,
// row, column) layout through padding.h's source_index: padding positions
// added to the packed input positions they read, input positions by a
// transpose, then the padding positions whose input element has no packed
// position (rows or columns no tap reads) added to it element by element.
// Samples run in parallel, each sum in one fixed order.
template <typename T>
void direct_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                       const ConvGeometry& g, int64_t groups, const at::Tensor& grad_input) {
  const int64_t batch = grad_output.size(0), out_channels = grad_output.size(1);
  constexpr int64_t lanes = Zmm<T>::kLanes;
  const int64_t in_per_group = g.channels / groups, out_per_group = out_channels / groups;
  const int64_t in_padded = (in_per_group + lanes - 1) / lanes * lanes;
  const int64_t taps = g.h.kernel * g.w.kernel;
  const int64_t rows = grad_packed_extent(g.h), width = grad_packed_extent(g.w);
  const int64_t position = groups * in_padded;  // one packed position's channels
  const int64_t plane = g.out_plane(), input_plane = g.input_plane();
  // (G, KH*KW, C_out/G, in_padded): per (tap, output channel) a row of input
  // channel weights, zero past the group's channels.
  const at::Tensor packed_weight =
      at::zeros({groups, taps, out_per_group, in_padded}, weight.options());
  packed_weight.narrow(3, 0, in_per_group)
      .copy_(weight.reshape({groups, out_per_group, in_per_group, taps}).permute({0, 3, 1, 2}));
  const auto [row_begin, row_end] = interior(g.h, rows);
  const auto [column_begin, column_end] = interior(g.w, width);
  // Each padding position that reads an input element (none in zeros mode),
  // in (row, column) order: `folds` where the element's own packed position
  // is within the packed extent, as (packed position, packed position read);
  // `spills` where it is not (rows or columns no tap reads), as (packed
  // position, offset of the element in its channel).
  std::vector<std::pair<int64_t, int64_t>> folds, spills;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t source_row = source_index(r - g.h.pad_before, g.h.size, g.mode);
    for (int64_t q = 0; q < width; ++q) {
      const int64_t source_column = source_index(q - g.w.pad_before, g.w.size, g.mode);
      const bool inside = r >= row_begin && r < row_end && q >= column_begin && q < column_end;
      if (inside || source_row < 0 || source_column < 0) continue;
      const int64_t read_r = source_row + g.h.pad_before, read_q = source_column + g.w.pad_before;
      if (read_r < rows && read_q < width) {
        folds.emplace_back(r * width + q, read_r * width + read_q);
      } else {
        spills.emplace_back(r * width + q, source_row * g.w.size + source_column);
      }
    }
  }
  const T* go = grad_output.const_data_ptr<T>();
  const T* w = packed_weight.const_data_ptr<T>();
  T* gx = grad_input.mutable_data_ptr<T>();
  const int32_t no_offset = 0;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    const std::unique_ptr<T[]> packed(new T[rows * width * position]);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(packed.get(), packed.get() + rows * width * position, T(0));
      for (int64_t grp = 0; grp < groups; ++grp) {
        const T* group_go = go + (n * out_channels + grp * out_per_group) * plane;
        for (int64_t c0 = 0; c0 < in_padded; c0 += kMaxVectors * lanes) {
          const int vectors = int(std::min<int64_t>(kMaxVectors, (in_padded - c0) / lanes));
          const int64_t tiles = (g.w.out_size + kMaxPixels[vectors] - 1) / kMaxPixels[vectors];
          for (int64_t oh = 0; oh < g.h.out_size; ++oh) {
            for (int64_t t = 0; t < taps; ++t) {
              const int64_t r = oh * g.h.stride + t / g.w.kernel * g.h.dilation;
              const int64_t q0 = t % g.w.kernel * g.w.dilation;
              T* dst = packed.get() + (r * width + q0) * position + grp * in_padded + c0;
              const T* tap_weight = w + (grp * taps + t) * out_per_group * in_padded + c0;
              for (int64_t tile = 0, ow = 0; tile < tiles; ++tile) {
                const int pixels = int((g.w.out_size * (tile + 1)) / tiles - ow);
                tile_kernel<T, 1, true>(vectors, pixels)(
                    group_go + oh * g.w.out_size + ow, out_per_group, plane, &no_offset, 1,
                    tap_weight, in_padded, dst + ow * g.w.stride * position,
                    g.w.stride * position);
                ow += pixels;
              }
            }
          }
        }
      }
      // Padding positions first, into the packed position they read: whole
      // vectors of channels, where adding into the (channel, row, column)
      // layout went element by element, a cache line each (Net1's input
      // gradient took 6-11% longer in a padded mode than in zeros). Each
      // element's sums, and their order, are the same.
      T* const packed_input = packed.get();
      for (const auto& [from, to] : folds) {
        add_vectors(packed_input + from * position, packed_input + to * position, position);
      }
      T* sample = gx + n * g.channels * input_plane;
      std::fill(sample, sample + g.channels * input_plane, T(0));
      // (No interior column: nothing to copy, and no pointer to form.)
      for (int64_t r = row_begin; column_begin < column_end && r < row_end; ++r) {
        for (int64_t grp = 0; grp < groups; ++grp) {
          transpose(packed.get() + (r * width + column_begin) * position + grp * in_padded,
                    position, column_end - column_begin, in_per_group,
                    sample + grp * in_per_group * input_plane +
                        (r - g.h.pad_before) * g.w.size + (column_begin - g.w.pad_before),
                    input_plane);
        }
      }
      for (const auto& [from, offset] : spills) {
        const T* src = packed_input + from * position;
        T* element = sample + offset;
        for (int64_t grp = 0; grp < groups; ++grp) {
          for (int64_t c = 0; c < in_per_group; ++c) {
            element[(grp * in_per_group + c) * input_plane] += src[grp * in_padded + c];
          }
        }
      }
    }
  });
}

}  // namespace

bool direct_grad_weight_applies(at::ScalarType dtype, const ConvGeometry& g, int64_t groups,
                                int64_t out_channels) {
  if (!cpu::cpu_has_avx512f() || (dtype != at::kFloat && dtype != at::kDouble)) return false;
  if (g.w.stride > 2 || g.out_plane() == 0) return false;
  // Enough output channels per group to fill most lanes of a vector.
  if (out_channels / groups < (dtype == at::kFloat ? 16 : 8)) return false;
  // Tap offsets within a packed channel are 32-bit.
  const int64_t width = packed_rows_for(g.w, g.w.out_size);
  return packed_rows_for(g.h, 1) * width < std::numeric_limits<int32_t>::max();
}

bool direct_forward_applies(at::ScalarType dtype, const ConvGeometry& g, int64_t groups,
                            int64_t out_channels) {
  // As the weight gradient's, and enough terms per output to amortise a
  // tile's set-up and store (Net1's first layer, 3 channels x 9 taps, runs
  // faster as one GEMM).
  return direct_grad_weight_applies(dtype, g, groups, out_channels) &&
         (g.channels / groups) * g.h.kernel * g.w.kernel >= kMinDirectTerms;
}

void direct_forward_cpu(const at::Tensor& input, const at::Tensor& weight, const ConvGeometry& g,
                        int64_t groups, const at::Tensor& out) {
  if (input.scalar_type() == at::kFloat) {
    direct_forward<float>(input, weight, g, groups, out);
  } else {
    direct_forward<double>(input, weight, g, groups, out);
  }
}

at::Tensor direct_grad_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                  const ConvGeometry& g, int64_t groups, int64_t blocks) {
  const int64_t out_channels = grad_output.size(1);
  if (input.scalar_type() == at::kFloat) {
    return direct_grad_weight<float>(grad_output, input, g, groups, out_channels, blocks);
  }
  return direct_grad_weight<double>(grad_output, input, g, groups, out_channels, blocks);
}

bool direct_grad_input_applies(at::ScalarType dtype, const ConvGeometry& g, int64_t groups,
                               int64_t out_channels) {
  if (!cpu::cpu_has_avx512f() || (dtype != at::kFloat && dtype != at::kDouble)) return false;
  if (g.out_plane() == 0) return false;
  const int64_t lanes = dtype == at::kFloat ? 16 : 8;
  const int64_t in_per_group = g.channels / groups;
  if (in_per_group < lanes || out_channels / groups < kMinDirectGradInputTerms) return false;
  const int64_t padded = (in_per_group + lanes - 1) / lanes * lanes;
  return grad_packed_extent(g.h) * grad_packed_extent(g.w) * groups * padded *
             int64_t(dtype == at::kFloat ? 4 : 8) <= kGradPackBytes;
}

void direct_grad_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                           const ConvGeometry& g, int64_t groups, const at::Tensor& grad_input) {
  if (grad_output.scalar_type() == at::kFloat) {
    direct_grad_input<float>(grad_output, weight, g, groups, grad_input);
  } else {
    direct_grad_input<double>(grad_output, weight, g, groups, grad_input);
  }
}

#else  // no AVX-512 kernels on this compiler / architecture

bool direct_forward_applies(at::ScalarType, const ConvGeometry&, int64_t, int64_t) {
  return false;
}

void direct_forward_cpu(const at::Tensor&, const at::Tensor&, const ConvGeometry&, int64_t,
                        const at::Tensor&) {
  TORCH_CHECK(false, "padded_conv2d: the direct CPU forward needs AVX-512");
}

bool direct_grad_weight_applies(at::ScalarType, const ConvGeometry&, int64_t, int64_t) {
  return false;
}

at::Tensor direct_grad_weight_cpu(const at::Tensor&, const at::Tensor&, const ConvGeometry&,
                                  int64_t, int64_t) {
  TORCH_CHECK(false, "padded_conv2d_grad_weight: the direct CPU kernel needs AVX-512");
  return at::Tensor();
}

bool direct_grad_input_applies(at::ScalarType, const ConvGeometry&, int64_t, int64_t) {
  return false;
}

void direct_grad_input_cpu(const at::Tensor&, const at::Tensor&, const ConvGeometry&, int64_t,
                           const at::Tensor&) {
  TORCH_CHECK(false, "padded_conv2d_grad_input: the direct CPU kernel needs AVX-512");
}

#endif

}  // namespace pyattn

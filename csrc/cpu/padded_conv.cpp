// CPU kernels of pyattn::padded_conv2d (float32, float64; OpenMP via
// at::parallel_for): im2col, col2im and the weight gradient's fixed-order
// products. Per-axis tables are built with the shared index math of
// pyattn/padding.h, so these loops resolve padding exactly as the CUDA kernels.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "pyattn/cpu_vector.h"
#include "pyattn/padded_conv.h"
#include "pyattn/padded_conv_direct.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYATTN_AVX512_PERMUTE 1
#else
#define PYATTN_AVX512_PERMUTE 0
#endif

namespace pyattn {
namespace {

// source_index of every (tap k, output o) of one axis, at [k * out_size + o].
std::vector<int64_t> source_table(const Axis& a, PadMode mode) {
  std::vector<int64_t> table(a.kernel * a.out_size);
  for (int64_t k = 0; k < a.kernel; ++k) {
    for (int64_t o = 0; o < a.out_size; ++o) {
      table[k * a.out_size + o] = source_index(tap_coordinate(a, o, k), a.size, mode);
    }
  }
  return table;
}

// dst[p] = src[index[p]], or 0 where index[p] < 0 (zero padding): one column
// row of a strided convolution from its tap's plane table (scalar: GCC emits
// no vector gathers for it under generic tuning).
template <typename T>
void gather_plane(const T* src, const int32_t* index, T* dst, int64_t n) {
  for (int64_t p = 0; p < n; ++p) dst[p] = index[p] < 0 ? T(0) : src[index[p]];
}

#if PYATTN_AVX512_PERMUTE
// One column row of im2col for input rows of at most two vectors (32 floats,
// 16 doubles) and output rows of at most one (16 / 8): per output row, its
// input row loaded whole (masked loads), the tap's source columns picked by
// one two-register permute (lanes of padding columns zeroed), one masked
// store. `columns`: the tap's source_table entries of the width axis as lane
// indices, -1 for zero padding, one vector's worth (lanes past out_w: -1).
// Measured on Net1's conv3 / conv4 against AVX-512 gathers through the plane
// tables: a row in three cheap instructions beats a share of a 16-lane gather.
// A copy: bit for bit the other paths' columns.
__attribute__((target("avx512f"))) void im2col_plane_permute(const float* src, int64_t width,
                                                             const int64_t* row_src,
                                                             int64_t out_h, const int32_t* columns,
                                                             int64_t out_w, float* dst) {
  const __m512i idx = _mm512_loadu_si512(columns);
  const __mmask16 keep = _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512());
  const __mmask16 out_lanes = __mmask16((1u << out_w) - 1);
  const __mmask16 low = width >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << width) - 1);
  const __mmask16 high = width > 16 ? __mmask16((1u << (width - 16)) - 1) : __mmask16(0);
  for (int64_t oh = 0; oh < out_h; ++oh, dst += out_w) {
    __m512 values = _mm512_setzero_ps();
    if (row_src[oh] >= 0) {
      const float* row = src + row_src[oh] * width;
      values = _mm512_maskz_permutex2var_ps(keep, _mm512_maskz_loadu_ps(low, row), idx,
                                            _mm512_maskz_loadu_ps(high, row + 16));
    }
    _mm512_mask_storeu_ps(dst, out_lanes, values);
  }
}

__attribute__((target("avx512f"))) void im2col_plane_permute(const double* src, int64_t width,
                                                             const int64_t* row_src,
                                                             int64_t out_h, const int32_t* columns,
                                                             int64_t out_w, double* dst) {
  const __m512i idx = _mm512_maskz_cvtepi32_epi64(  // (maskz: GCC 12 warns on the unmasked form)
      __mmask8(0xFF),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns)));
  const __mmask8 keep = _mm512_cmpge_epi64_mask(idx, _mm512_setzero_si512());
  const __mmask8 out_lanes = __mmask8((1u << out_w) - 1);
  const __mmask8 low = width >= 8 ? __mmask8(0xFF) : __mmask8((1u << width) - 1);
  const __mmask8 high = width > 8 ? __mmask8((1u << (width - 8)) - 1) : __mmask8(0);
  for (int64_t oh = 0; oh < out_h; ++oh, dst += out_w) {
    __m512d values = _mm512_setzero_pd();
    if (row_src[oh] >= 0) {
      const double* row = src + row_src[oh] * width;
      values = _mm512_maskz_permutex2var_pd(keep, _mm512_maskz_loadu_pd(low, row), idx,
                                            _mm512_maskz_loadu_pd(high, row + 8));
    }
    _mm512_mask_storeu_pd(dst, out_lanes, values);
  }
}

// Per tap column kw, im2col_plane_permute's lane indices (16 entries each), or
// empty where it does not apply: no AVX-512, stride 1 along the width (plain
// row copies serve), input rows over two vectors or output rows over one.
template <typename T>
std::vector<int32_t> permute_columns(const ConvGeometry& g, const std::vector<int64_t>& columns) {
  constexpr int64_t lanes = 64 / sizeof(T);
  if (!cpu::cpu_has_avx512f() || g.w.stride == 1 || g.w.size > 2 * lanes ||
      g.w.out_size > lanes) {
    return {};
  }
  std::vector<int32_t> table(g.w.kernel * 16, -1);
  for (int64_t kw = 0; kw < g.w.kernel; ++kw) {
    for (int64_t ow = 0; ow < g.w.out_size; ++ow) {
      table[kw * 16 + ow] = static_cast<int32_t>(columns[kw * g.w.out_size + ow]);
    }
  }
  return table;
}
#endif

// dst[index[p]] += src[p] where index[p] >= 0, in order of p: the transpose.
template <typename T>
void scatter_add_plane(const T* src, const int32_t* index, T* dst, int64_t n) {
  for (int64_t p = 0; p < n; ++p) {
    if (index[p] >= 0) dst[index[p]] += src[p];
  }
}

// For convolutions strided along the width with output rows of at most
// kShortRow (Net1's conv4: 6x6), where the per-row work of the row loops
// dominates (measured: 10-30% faster forward and grad input there; no gain at
// 10 or 18 per row): per tap (kh, kw), the input offset ih * W + iw (or -1)
// read by each output position, at [(kh * KW + kw) * Ho*Wo + oh * Wo + ow].
// Empty otherwise, or when the plane does not fit 32-bit offsets.
constexpr int64_t kShortRow = 8;

// rows / columns: source_table of the height / width axis.
std::vector<int32_t> plane_table(const ConvGeometry& g, const std::vector<int64_t>& rows,
                                 const std::vector<int64_t>& columns) {
  if (g.w.stride == 1 || g.w.out_size > kShortRow ||
      g.input_plane() > std::numeric_limits<int32_t>::max()) {
    return {};
  }
  const int64_t out_h = g.h.out_size, out_w = g.w.out_size;
  std::vector<int32_t> table(g.h.kernel * g.w.kernel * g.out_plane());
  int32_t* entry = table.data();
  for (int64_t kh = 0; kh < g.h.kernel; ++kh) {
    for (int64_t kw = 0; kw < g.w.kernel; ++kw) {
      for (int64_t oh = 0; oh < out_h; ++oh) {
        const int64_t ih = rows[kh * out_h + oh];
        for (int64_t ow = 0; ow < out_w; ++ow) {
          const int64_t iw = columns[kw * out_w + ow];
          *entry++ = ih < 0 || iw < 0 ? -1 : static_cast<int32_t>(ih * g.w.size + iw);
        }
      }
    }
  }
  return table;
}

// Output positions [begin, end) of tap k whose reads lie inside the tensor:
// there source = o * stride + shift, a plain strided read (or write).
struct Interior {
  int64_t begin;
  int64_t end;
  int64_t shift;
};

Interior interior(const Axis& a, int64_t k) {
  const int64_t shift = k * a.dilation - a.pad_before;
  // smallest o with o * stride + shift >= 0; one past the largest with < size
  const int64_t first = shift >= 0 ? 0 : (-shift + a.stride - 1) / a.stride;
  const int64_t last = a.size - shift <= 0 ? 0 : (a.size - shift - 1) / a.stride + 1;
  const int64_t begin = std::clamp<int64_t>(first, 0, a.out_size);
  const int64_t end = std::clamp<int64_t>(last, begin, a.out_size);
  return Interior{begin, end, shift};
}

// interior() of every tap of the axis, computed once per call.
std::vector<Interior> interiors(const Axis& a) {
  std::vector<Interior> all;
  for (int64_t k = 0; k < a.kernel; ++k) all.push_back(interior(a, k));
  return all;
}

// dst[o] = src[2 * o] for o < n, reading only src[0, readable) (readable >=
// 2n - 1): whole vectors where both source vectors of a block are readable (the
// even lanes kept by one shuffle, where the compiler has one), then one by one.
template <typename T>
__attribute__((always_inline)) inline void gather_even(const T* src, T* dst, int64_t n,
                                                       int64_t readable) {
  int64_t o = 0;
#if PYATTN_VECTOR_SHUFFLE
  constexpr int64_t lanes = cpu::kLanes<T>;
  cpu::LaneIndices<T> even;
  for (int64_t l = 0; l < lanes; ++l) even[l] = 2 * l;
  for (; o + lanes <= n && 2 * (o + lanes) <= readable; o += lanes) {
    cpu::Lanes<T> low, high;
    cpu::load_lanes(low, src + 2 * o);
    cpu::load_lanes(high, src + 2 * o + lanes);
    cpu::store_lanes(dst + o, __builtin_shuffle(low, high, even));
  }
#endif
  for (; o < n; ++o) dst[o] = src[2 * o];
}

// One column row of im2col: the out_h x out_w values one (channel, tap,
// sample) contributes, from its input plane `src` (rows of `width`).
// row_src / col_src: the tap's source_table entries of the two axes (-1: zero
// padding); `inside`: the tap's interior range along the width. Compiled per
// ISA so that rows read at stride 2 (Net1's strided layers) move whole
// vectors: the scalar strided loop was the largest cost of their forward
// (twice the GEMM's time in a profile of Net1's second layer).
// kStrideTwo: the rows are read at stride 2 (`stride` is 2), as whole vectors.
template <typename T, bool kStrideTwo>
__attribute__((always_inline)) inline void im2col_plane_body(
    const T* src, int64_t width, const int64_t* row_src, int64_t out_h, const int64_t* col_src,
    int64_t out_w, const Interior& inside, int64_t stride, T* dst) {
  for (int64_t oh = 0; oh < out_h; ++oh, dst += out_w) {
    const int64_t ih = row_src[oh];
    if (ih < 0) {
      std::fill(dst, dst + out_w, T(0));
      continue;
    }
    const T* src_row = src + ih * width;
    for (int64_t ow = 0; ow < inside.begin; ++ow) {
      dst[ow] = col_src[ow] < 0 ? T(0) : src_row[col_src[ow]];
    }
    const int64_t count = inside.end - inside.begin;
    if (count > 0) {  // (else offset may point before the row)
      const int64_t offset = inside.begin * stride + inside.shift;
      if (kStrideTwo) {
        gather_even(src_row + offset, dst + inside.begin, count, width - offset);
      } else if (stride == 1) {
        std::copy(src_row + offset, src_row + offset + count, dst + inside.begin);
      } else {
        for (int64_t o = 0; o < count; ++o) dst[inside.begin + o] = src_row[offset + o * stride];
      }
    }
    for (int64_t ow = inside.end; ow < out_w; ++ow) {
      dst[ow] = col_src[ow] < 0 ? T(0) : src_row[col_src[ow]];
    }
  }
}

// im2col_plane_body of rows read at stride 2, per ISA.
template <typename T>
PYATTN_X86_CLONES void im2col_plane_stride_two(const T* src, int64_t width,
                                               const int64_t* row_src, int64_t out_h,
                                               const int64_t* col_src, int64_t out_w,
                                               const Interior& inside, T* dst) {
  im2col_plane_body<T, true>(src, width, row_src, out_h, col_src, out_w, inside, 2, dst);
}

// cols: (C*KH*KW, batch, Ho*Wo), the layout of conv_geometry.h's batched
// columns, so one GEMM covers every sample of the call.
template <typename T>
void im2col_kernel(const T* input, T* cols, int64_t batch, const ConvGeometry& g) {
  const std::vector<int64_t> rows = source_table(g.h, g.mode);
  const std::vector<int64_t> columns = source_table(g.w, g.mode);
  const int64_t kh_count = g.h.kernel, kw_count = g.w.kernel;
  const int64_t out_h = g.h.out_size, out_w = g.w.out_size;
  const int64_t plane = g.input_plane();
#if PYATTN_AVX512_PERMUTE
  // The permuted rows where they apply, else the plane tables.
  const std::vector<int32_t> permuted = permute_columns<T>(g, columns);
  const std::vector<int32_t> table =
      permuted.empty() ? plane_table(g, rows, columns) : std::vector<int32_t>();
#else
  const std::vector<int32_t> table = plane_table(g, rows, columns);
#endif
  const std::vector<Interior> insides = interiors(g.w);
  const int64_t taps = kh_count * kw_count, out_plane = g.out_plane();
  // Rows read at stride 2 and at least one vector long go through the cloned
  // im2col_plane_stride_two (Net1's 18 outputs per row gain); shorter rows stay
  // inline, where neither the call nor the vector code costs anything.
  const bool vector_rows = g.w.stride == 2 && out_w >= cpu::kLanes<T>;
  // One task per input plane (sample, channel), its taps' column rows (each a
  // contiguous out_h x out_w block, batch planes apart) written one after
  // another while the plane is in L1: taps in the outer loop and samples in
  // the inner one left each plane to be fetched again per tap (the permuted
  // rows' input loads were a third of Net1 conv4's im2col-and-GEMM time).
  at::parallel_for(0, batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / g.channels, channel = task % g.channels;
      const T* src = input + task * plane;
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t kh = tap / kw_count, kw = tap % kw_count;
        T* dst = cols + ((channel * taps + tap) * batch + sample) * out_plane;
#if PYATTN_AVX512_PERMUTE
        if (!permuted.empty()) {
          im2col_plane_permute(src, g.w.size, rows.data() + kh * out_h, out_h,
                               permuted.data() + kw * 16, out_w, dst);
          continue;
        }
#endif
        if (!table.empty()) {
          gather_plane(src, table.data() + tap * out_plane, dst, out_plane);
          continue;
        }
        const int64_t* row_src = rows.data() + kh * out_h;
        const int64_t* col_src = columns.data() + kw * out_w;
        if (vector_rows) {
          im2col_plane_stride_two(src, g.w.size, row_src, out_h, col_src, out_w, insides[kw],
                                  dst);
        } else {
          im2col_plane_body<T, false>(src, g.w.size, row_src, out_h, col_src, out_w,
                                      insides[kw], g.w.stride, dst);
        }
      }
    }
  });
}

// dst[2 * o] += src[o] for o < n, touching only dst[0, writable) (writable
// >= 2n - 1): whole vectors where both destination vectors of a block are
// writable (src spread over their even lanes, -0 in the odd ones, which adds
// nothing: x + -0 is x, -0 included, in the default rounding mode; only with
// denormals-are-zero but not flush-to-zero set could a denormal odd lane read
// back as 0), then one by one (vector blocks as in gather_even).
template <typename T>
__attribute__((always_inline)) inline void scatter_add_even(const T* src, T* dst, int64_t n,
                                                            int64_t writable) {
  int64_t o = 0;
#if PYATTN_VECTOR_SHUFFLE
  constexpr int64_t lanes = cpu::kLanes<T>;
  cpu::LaneIndices<T> low_half, high_half;  // lane 2j: src[j] (or src[lanes / 2 + j]); odd: filler
  for (int64_t l = 0; l < lanes; ++l) {
    low_half[l] = l % 2 ? lanes : l / 2;
    high_half[l] = l % 2 ? lanes : lanes / 2 + l / 2;
  }
  cpu::Lanes<T> filler;
  for (int64_t l = 0; l < lanes; ++l) filler[l] = T(-0.0);
  for (; o + lanes <= n && 2 * (o + lanes) <= writable; o += lanes) {
    cpu::Lanes<T> values, low, high;
    cpu::load_lanes(values, src + o);
    cpu::load_lanes(low, dst + 2 * o);
    cpu::load_lanes(high, dst + 2 * o + lanes);
    cpu::store_lanes(dst + 2 * o, low + __builtin_shuffle(values, filler, low_half));
    cpu::store_lanes(dst + 2 * o + lanes, high + __builtin_shuffle(values, filler, high_half));
  }
#endif
  for (; o < n; ++o) dst[2 * o] += src[o];
}

// One tap's share of col2im for one (sample, channel) plane `dst` (rows of
// `width`): its out_h x out_w column values `src` added to the elements they
// were read from. Arguments as im2col_plane_body's, and the same split between
// cloned stride-2 rows and inline others.
template <typename T, bool kStrideTwo>
__attribute__((always_inline)) inline void col2im_tap_body(
    const T* src, int64_t width, const int64_t* row_src, int64_t out_h, const int64_t* col_src,
    int64_t out_w, const Interior& inside, int64_t stride, T* dst) {
  for (int64_t oh = 0; oh < out_h; ++oh, src += out_w) {
    const int64_t ih = row_src[oh];
    if (ih < 0) continue;
    T* dst_row = dst + ih * width;
    for (int64_t ow = 0; ow < inside.begin; ++ow) {
      if (col_src[ow] >= 0) dst_row[col_src[ow]] += src[ow];
    }
    const T* values = src + inside.begin;
    const int64_t count = inside.end - inside.begin;
    if (count > 0) {  // (else offset may point before the row)
      const int64_t offset = inside.begin * stride + inside.shift;
      if (kStrideTwo) {
        scatter_add_even(values, dst_row + offset, count, width - offset);
      } else if (stride == 1) {
        for (int64_t o = 0; o < count; ++o) dst_row[offset + o] += values[o];
      } else {
        for (int64_t o = 0; o < count; ++o) dst_row[offset + o * stride] += values[o];
      }
    }
    for (int64_t ow = inside.end; ow < out_w; ++ow) {
      if (col_src[ow] >= 0) dst_row[col_src[ow]] += src[ow];
    }
  }
}

// col2im_tap_body of rows read at stride 2, per ISA.
template <typename T>
PYATTN_X86_CLONES void col2im_tap_stride_two(const T* src, int64_t width, const int64_t* row_src,
                                             int64_t out_h, const int64_t* col_src,
                                             int64_t out_w, const Interior& inside, T* dst) {
  col2im_tap_body<T, true>(src, width, row_src, out_h, col_src, out_w, inside, 2, dst);
}

// cols: (C*KH*KW, batch, Ho*Wo) as im2col writes them. The transpose of
// im2col: every column entry is added to the input element it was read from
// (source_table, i.e. source_index), in a fixed order per (sample, channel).
template <typename T>
void col2im_kernel(const T* cols, T* grad_input, int64_t batch, const ConvGeometry& g) {
  const std::vector<int64_t> rows = source_table(g.h, g.mode);
  const std::vector<int64_t> columns = source_table(g.w, g.mode);
  const int64_t out_h = g.h.out_size, out_w = g.w.out_size, plane = g.out_plane();
  const int64_t taps = g.h.kernel * g.w.kernel;
  const int64_t stride = g.w.stride;
  const std::vector<int32_t> table = plane_table(g, rows, columns);
  const std::vector<Interior> insides = interiors(g.w);
  const bool vector_rows = stride == 2 && out_w >= cpu::kLanes<T>;  // as in im2col_kernel
  // One task per (sample, channel) plane: every input element is written by one task.
  at::parallel_for(0, batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t sample = bc / g.channels, channel = bc % g.channels;
      T* dst = grad_input + bc * g.input_plane();
      std::fill(dst, dst + g.input_plane(), T(0));
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t kh = tap / g.w.kernel, kw = tap % g.w.kernel;
        const T* src = cols + ((channel * taps + tap) * batch + sample) * plane;
        if (!table.empty()) {
          scatter_add_plane(src, table.data() + tap * plane, dst, plane);
          continue;
        }
        const int64_t* row_src = rows.data() + kh * out_h;
        const int64_t* col_src = columns.data() + kw * out_w;
        if (vector_rows) {
          col2im_tap_stride_two(src, g.w.size, row_src, out_h, col_src, out_w, insides[kw], dst);
        } else {
          col2im_tap_body<T, false>(src, g.w.size, row_src, out_h, col_src, out_w, insides[kw],
                                    stride, dst);
        }
      }
    }
  });
}

// c (m x n) += a (m x k) . b (n x k)^T, kept transposed (c_t, n x m), every
// c[i][j] summed over k in order within panels of kDepth, panels in order. The
// weight gradient uses this instead of BLAS: MKL plans its sums by the
// process's thread count and, measured, by the thread counts used earlier in
// the process (Net1's conv1, K = 1156: results differed between 1 and 2
// threads, and changed after a 3-thread call), so they could not be reproduced.
//
// Register-blocked outer products: `a` is packed transposed (k x m, m padded to
// whole vectors), and a block of rows of b by up to kVectorsA vectors of a's
// columns is accumulated in registers: per k, V vector loads and R broadcasts
// feed R * V fused multiply-adds. GCC vector types (pyattn/cpu_vector.h): zmm
// in the AVX-512 clone, ymm pairs in the AVX2 one, SSE otherwise; on x86-64 the
// kernel is compiled for each of these ISAs (PYATTN_X86_CLONES).

// 24 accumulators (AVX-512 has 32 vector registers): kVectorsA vectors of a's
// columns by 6 rows of b, or, when a has fewer columns, more rows of b.
constexpr int kAccumulators = 24, kVectorsA = 4;

constexpr int rows_of_b(int vectors) { return std::min(kAccumulators / vectors, 12); }

// c_t[r][i] += sum_k a_packed[k][i] * b[r][k] for R rows r of b and the V
// vectors of columns i at `a_packed` (row stride lda_packed; `columns` of them
// valid). c_t is the transposed product (rows of b by columns of a), so its
// updates are vector loads and stores too.
template <typename T, int R, int V>
__attribute__((always_inline)) inline void outer_block(int64_t k, const T* a_packed,
                                                       int64_t lda_packed, int64_t columns,
                                                       const T* b, int64_t ldb, T* c_t,
                                                       int64_t ldc) {
  constexpr int64_t lanes = cpu::kLanes<T>;
  cpu::Lanes<T> acc[R][V] = {};
  for (int64_t kk = 0; kk < k; ++kk) {
    cpu::Lanes<T> av[V];
    for (int v = 0; v < V; ++v) {
      cpu::load_lanes(av[v], a_packed + kk * lda_packed + v * lanes);
    }
    for (int r = 0; r < R; ++r) {
      const T scalar = b[r * ldb + kk];
      for (int v = 0; v < V; ++v) acc[r][v] += av[v] * scalar;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      T* out = c_t + r * ldc + v * lanes;
      if (columns - v * lanes >= lanes) {
        cpu::Lanes<T> current;
        cpu::load_lanes(current, out);
        cpu::store_lanes(out, current + acc[r][v]);
      } else {
        for (int64_t l = 0; l < columns - v * lanes; ++l) out[l] += acc[r][v][l];
      }
    }
  }
}

// The last `left` (< R) rows of b: one block of exactly that many rows.
template <typename T, int V, int R>
__attribute__((always_inline)) inline void outer_tail(int64_t left, int64_t k, const T* a_packed,
                                                      int64_t lda_packed, int64_t columns,
                                                      const T* b, int64_t ldb, T* c,
                                                      int64_t ldc) {
  if constexpr (R > 0) {
    if (left == R) {
      outer_block<T, R, V>(k, a_packed, lda_packed, columns, b, ldb, c, ldc);
    } else {
      outer_tail<T, V, R - 1>(left, k, a_packed, lda_packed, columns, b, ldb, c, ldc);
    }
  }
}

template <typename T, int V>
__attribute__((always_inline)) inline void outer_rows(int64_t n, int64_t k, const T* a_packed,
                                                      int64_t lda_packed, int64_t columns,
                                                      const T* b, int64_t ldb, T* c,
                                                      int64_t ldc) {
  constexpr int rows = rows_of_b(V);
  int64_t j = 0;
  for (; j + rows <= n; j += rows) {
    outer_block<T, rows, V>(k, a_packed, lda_packed, columns, b + j * ldb, ldb, c + j * ldc,
                            ldc);
  }
  outer_tail<T, V, rows - 1>(n - j, k, a_packed, lda_packed, columns, b + j * ldb, ldb,
                            c + j * ldc, ldc);
}

// c_t (n x m) += (a (m x k) . b (n x k)^T)^T, k in panels of kDepth whose
// packed copy of a (kDepth x 64 floats = 32 KiB) stays in L1.
constexpr int64_t kDepth = 128;

template <typename T>
__attribute__((always_inline)) inline void outer_products(int64_t m, int64_t n, int64_t k,
                                                          const T* a, int64_t lda, const T* b,
                                                          int64_t ldb, T* c_t, int64_t ldc) {
  constexpr int64_t lanes = cpu::kLanes<T>;
  constexpr int64_t group = kVectorsA * lanes;
  const int64_t padded = (m + lanes - 1) / lanes * lanes;
  static thread_local std::vector<T> a_packed;  // one buffer per thread
  a_packed.resize(kDepth * padded);
  for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
    const int64_t depth = std::min(kDepth, k - k0);
    // Row by row of the packed copy: contiguous writes, while the m source
    // rows' cache lines stay in L1 across consecutive kk.
    for (int64_t kk = 0; kk < depth; ++kk) {
      T* row = a_packed.data() + kk * padded;
      for (int64_t i = 0; i < m; ++i) row[i] = a[i * lda + k0 + kk];
      for (int64_t i = m; i < padded; ++i) row[i] = T(0);
    }
    for (int64_t i0 = 0; i0 < m; i0 += group) {
      const int64_t columns = std::min(group, m - i0);
      // (a lambda here would not be inlined into the ISA clones: 15x slower)
      const T* panel = a_packed.data() + i0;
      switch ((columns + lanes - 1) / lanes) {
        case 1:
          outer_rows<T, 1>(n, depth, panel, padded, columns, b + k0, ldb, c_t + i0, ldc);
          break;
        case 2:
          outer_rows<T, 2>(n, depth, panel, padded, columns, b + k0, ldb, c_t + i0, ldc);
          break;
        case 3:
          outer_rows<T, 3>(n, depth, panel, padded, columns, b + k0, ldb, c_t + i0, ldc);
          break;
        default:
          outer_rows<T, 4>(n, depth, panel, padded, columns, b + k0, ldb, c_t + i0, ldc);
      }
    }
  }
}

PYATTN_X86_CLONES void accumulate_outer_products(int64_t m, int64_t n, int64_t k,
                                                 const float* a, int64_t lda, const float* b,
                                                 int64_t ldb, float* c_t, int64_t ldc) {
  outer_products(m, n, k, a, lda, b, ldb, c_t, ldc);
}

PYATTN_X86_CLONES void accumulate_outer_products(int64_t m, int64_t n, int64_t k,
                                                 const double* a, int64_t lda, const double* b,
                                                 int64_t ldb, double* c_t, int64_t ldc) {
  outer_products(m, n, k, a, lda, b, ldb, c_t, ldc);
}

void accumulate_grad_weight_cpu(const at::Tensor& rows, const at::Tensor& cols,
                                const at::Tensor& dst_t) {
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "padded_conv2d_grad_weight_cpu", [&] {
    accumulate_outer_products(dst_t.size(1), dst_t.size(0), rows.size(1),
                              rows.const_data_ptr<scalar_t>(), rows.stride(0),
                              cols.const_data_ptr<scalar_t>(), cols.stride(0),
                              dst_t.mutable_data_ptr<scalar_t>(), dst_t.stride(0));
  });
}

bool cpu_supports(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble;
}

void im2col_cpu(const at::Tensor& input, const at::Tensor& cols, const ConvGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "padded_conv2d_im2col_cpu", [&] {
    im2col_kernel<scalar_t>(input.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(),
                            input.size(0), g);
  });
}

void col2im_cpu(const at::Tensor& cols, const at::Tensor& grad_input, const ConvGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "padded_conv2d_col2im_cpu", [&] {
    col2im_kernel<scalar_t>(cols.const_data_ptr<scalar_t>(),
                            grad_input.mutable_data_ptr<scalar_t>(), grad_input.size(0), g);
  });
}

// The CPU twin of the CUDA kernels: the same per-element functions
// (BatchedColumns), the same 32-/64-bit choice, in host loops.
template <typename Index, typename F>
void for_each_element(Index total, const F& f) {
  at::parallel_for(0, int64_t(total), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) f(Index(e));
  });
}

void im2col_batched_cpu(const at::Tensor& input, const at::Tensor& cols, const ConvGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "padded_conv2d_im2col_batched_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = cols.mutable_data_ptr<scalar_t>();
    with_index_type(g, input.size(0), [&](const auto& layout) {
      for_each_element(layout.column_count(), [&](auto e) { out[e] = layout.im2col(in, e); });
    });
  });
}

void col2im_batched_cpu(const at::Tensor& cols, const at::Tensor& grad_input,
                        const ConvGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "padded_conv2d_col2im_batched_cpu", [&] {
    const scalar_t* in = cols.const_data_ptr<scalar_t>();
    scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
    with_index_type(g, grad_input.size(0), [&](const auto& layout) {
      for_each_element(layout.input_count(),
                       [&](auto e) { out[e] = layout.template col2im<scalar_t>(in, e); });
    });
  });
}

constexpr ConvBackend kCpu{"CPU (float32, float64)", cpu_supports, im2col_cpu, col2im_cpu,
                           im2col_batched_cpu, col2im_batched_cpu, accumulate_grad_weight_cpu,
                           direct_forward_applies, direct_forward_cpu, direct_grad_weight_applies,
                           direct_grad_weight_cpu, direct_grad_input_applies,
                           direct_grad_input_cpu, /*gemm_per_thread=*/true};
constexpr ConvBackend kCpuTwin{"CPU twin of the CUDA path (float32, float64)", cpu_supports,
                               nullptr, nullptr, im2col_batched_cpu, col2im_batched_cpu,
                               nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                               /*gemm_per_thread=*/false};

// One entry point for the tests: which = forward | grad_input | grad_weight.
at::Tensor batched_cpu_twin(c10::string_view which, const c10::optional<at::Tensor>& grad_output,
                            const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            c10::string_view padding_mode) {
  if (which == "forward") {
    return padded_conv2d_forward(kCpuTwin, input, weight, bias, stride, padding, dilation, groups,
                                 padding_mode);
  }
  TORCH_CHECK_VALUE(grad_output.has_value(), "padded_conv2d_batched_cpu_twin: `grad_output` "
                    "is required for ", which);
  if (which == "grad_input") {
    return padded_conv2d_grad_input(kCpuTwin, *grad_output, input, weight, stride, padding,
                                    dilation, groups, padding_mode);
  }
  TORCH_CHECK_VALUE(which == "grad_weight", "padded_conv2d_batched_cpu_twin: `which` must be "
                    "'forward', 'grad_input' or 'grad_weight', got '", which, "'");
  return padded_conv2d_grad_weight(kCpuTwin, *grad_output, input, weight, stride, padding,
                                   dilation, groups, padding_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyattn, CPU, m) { register_padded_conv2d<kCpu>(m); }

// Test-only: the batched (CUDA) driver and kernels' per-element code on CPU,
// and which kernel each CPU pass takes for given shapes.
TORCH_LIBRARY_FRAGMENT(pyattn, m) {
  m.def("padded_conv2d_cpu_path(str which, Tensor input, Tensor weight, int[2] stride, "
        "int[4] padding, int[2] dilation, int groups, str padding_mode) -> str",
        [](c10::string_view which, const at::Tensor& input, const at::Tensor& weight,
           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
           int64_t groups, c10::string_view padding_mode) -> std::string {
          return kernel_path(kCpu, which, input, weight, stride, padding, dilation, groups,
                             padding_mode);
        });
  m.def("padded_conv2d_batched_cpu_twin(str which, Tensor? grad_output, Tensor input, "
        "Tensor weight, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, "
        "int groups, str padding_mode) -> Tensor",
        &batched_cpu_twin);
}

}  // namespace pyattn

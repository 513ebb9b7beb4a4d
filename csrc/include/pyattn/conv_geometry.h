#pragma once
// Per-element im2col / col2im of a padded convolution, shared by the CPU and
// CUDA kernels. No ATen here: this header is compiled for the device too.
//
// Column layout of one sample: row (c * KH + kh) * KW + kw, column oh * Wo + ow,
// i.e. a (C * KH * KW) x (Ho * Wo) matrix, so that the convolution of group g is
// weight[g] (Cout/G x Cg*KH*KW) @ rows of group g. Rows of a group are contiguous.
#include <cstdint>
#include <type_traits>

#include "pyattn/padding.h"

namespace pyattn {

struct ConvGeometry {
  int64_t channels;  // input channels of one sample (all groups)
  Axis h;
  Axis w;
  PadMode mode;

  PYATTN_HOST_DEVICE int64_t out_plane() const { return h.out_size * w.out_size; }
  PYATTN_HOST_DEVICE int64_t col_rows() const { return channels * h.kernel * w.kernel; }
  PYATTN_HOST_DEVICE int64_t cols_per_sample() const { return col_rows() * out_plane(); }
  PYATTN_HOST_DEVICE int64_t input_plane() const { return h.size * w.size; }
};

// Value of column element `index` of one sample; `input` points at that sample.
template <typename T>
PYATTN_HOST_DEVICE T im2col_value(const T* input, const ConvGeometry& g, int64_t index) {
  const int64_t ow = index % g.w.out_size;
  int64_t rest = index / g.w.out_size;
  const int64_t oh = rest % g.h.out_size;
  rest /= g.h.out_size;
  const int64_t kw = rest % g.w.kernel;
  rest /= g.w.kernel;
  const int64_t kh = rest % g.h.kernel;
  const int64_t c = rest / g.h.kernel;
  const int64_t ih = source_index(tap_coordinate(g.h, oh, kh), g.h.size, g.mode);
  const int64_t iw = source_index(tap_coordinate(g.w, ow, kw), g.w.size, g.mode);
  if (ih < 0 || iw < 0) return T(0);
  return input[(c * g.h.size + ih) * g.w.size + iw];
}

// Gradient of input element (c, ih, iw) of one sample: the sum of every column
// entry that read it, directly or through padding. `cols` points at that sample.
template <typename Acc, typename T>
PYATTN_HOST_DEVICE Acc col2im_value(const T* cols, const ConvGeometry& g, int64_t c,
                                    int64_t ih, int64_t iw) {
  Acc acc = Acc(0);
  const int64_t plane = g.out_plane();
  const T* channel_cols = cols + c * g.h.kernel * g.w.kernel * plane;
  for_each_tap(g.h, g.mode, ih, [&](int64_t kh, int64_t oh) {
    for_each_tap(g.w, g.mode, iw, [&](int64_t kw, int64_t ow) {
      acc += static_cast<Acc>(
          channel_cols[(kh * g.w.kernel + kw) * plane + oh * g.w.out_size + ow]);
    });
  });
  return acc;
}

// ---------------------------------------------------------------------------
// The batched (CUDA) layout: all samples of a chunk side by side, group-major.
// Column element (row, n, p) lives at (row * batch + n) * plane + p, so group g's
// rows form a (Cg*KH*KW) x (batch * Ho*Wo) matrix and ONE batched GEMM over the
// groups covers the whole chunk: out_g (Cout/G x batch*plane) = W_g @ cols_g.
// The CPU twin runs these same functions in host loops (cpu/padded_conv.cpp).

// n / d and n % d for a divisor fixed at launch: one multiply-high and a shift
// (Granlund-Montgomery, as ATen's IntDivider) instead of a ~20-instruction
// 32-bit division. Exact for every n < 2^31, the range of the 32-bit path.
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 1, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t(1) << shift) < d) ++shift;
    multiplier = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  PYATTN_HOST_DEVICE uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(n, multiplier);
#else
    const uint32_t high = uint32_t((uint64_t(n) * multiplier) >> 32);
#endif
    return (high + n) >> shift;
  }
  PYATTN_HOST_DEVICE uint32_t mod(uint32_t n, uint32_t quotient) const {
    return n - quotient * divisor;
  }
};

// Plain 64-bit division, for sizes past the 32-bit range.
struct WideDivmod {
  int64_t divisor = 1;
  WideDivmod() = default;
  explicit WideDivmod(int64_t d) : divisor(d) {}
  PYATTN_HOST_DEVICE int64_t div(int64_t n) const { return n / divisor; }
  PYATTN_HOST_DEVICE int64_t mod(int64_t n, int64_t quotient) const {
    return n - quotient * divisor;
  }
};

// Index: uint32_t (FastDivmod, int32_t coordinates) or int64_t (WideDivmod).
template <typename Index>
struct BatchedColumns {
  using Divmod = std::conditional_t<std::is_same<Index, uint32_t>::value, FastDivmod, WideDivmod>;
  using Coord = std::make_signed_t<Index>;
  ConvGeometry g;
  Index batch;
  Divmod out_w, out_h, samples, kernel_w, kernel_h;  // column element -> (row, n, oh, ow)
  Divmod in_w, in_h, channels;                       // input element -> (n, c, ih, iw)

  BatchedColumns(const ConvGeometry& geometry, int64_t count)
      : g(geometry), batch(Index(count)), out_w(Index(g.w.out_size)), out_h(Index(g.h.out_size)),
        samples(Index(count)), kernel_w(Index(g.w.kernel)), kernel_h(Index(g.h.kernel)),
        in_w(Index(g.w.size)), in_h(Index(g.h.size)), channels(Index(g.channels)) {}

  // Whether the 32-bit path holds every column and input index of `count` samples.
  static bool fits_32bit(const ConvGeometry& g, int64_t count) {
    const int64_t limit = int64_t(1) << 31;
    return g.cols_per_sample() * count < limit && g.channels * g.input_plane() * count < limit;
  }

  PYATTN_HOST_DEVICE Index column_count() const {
    return Index(g.col_rows()) * batch * Index(g.out_plane());
  }
  PYATTN_HOST_DEVICE Index input_count() const {
    return batch * Index(g.channels) * Index(g.input_plane());
  }

  // Column element e (batched layout) of the chunk whose input starts at `input`.
  template <typename T>
  PYATTN_HOST_DEVICE T im2col(const T* input, Index e) const {
    Index rest = out_w.div(e);
    const Index ow = out_w.mod(e, rest);
    Index next = out_h.div(rest);
    const Index oh = out_h.mod(rest, next);
    rest = samples.div(next);
    const Index n = samples.mod(next, rest);
    next = kernel_w.div(rest);
    const Index kw = kernel_w.mod(rest, next);
    const Index c = kernel_h.div(next);
    const Index kh = kernel_h.mod(next, c);
    const Coord ih = source_index<Coord>(
        Coord(oh) * Coord(g.h.stride) - Coord(g.h.pad_before) + Coord(kh) * Coord(g.h.dilation),
        Coord(g.h.size), g.mode);
    const Coord iw = source_index<Coord>(
        Coord(ow) * Coord(g.w.stride) - Coord(g.w.pad_before) + Coord(kw) * Coord(g.w.dilation),
        Coord(g.w.size), g.mode);
    if (ih < 0 || iw < 0) return T(0);
    return input[((n * Index(g.channels) + c) * Index(g.h.size) + Index(ih)) * Index(g.w.size) +
                 Index(iw)];
  }

  // Gradient of input element e = (n, c, ih, iw) from batched-layout columns:
  // a gather over the taps that read it (for_each_tap), summed in Acc.
  template <typename Acc, typename T>
  PYATTN_HOST_DEVICE Acc col2im(const T* cols, Index e) const {
    Index rest = in_w.div(e);
    const Index iw = in_w.mod(e, rest);
    Index next = in_h.div(rest);
    const Index ih = in_h.mod(rest, next);
    const Index n = channels.div(next);
    const Index c = channels.mod(next, n);
    const Index plane = Index(g.out_plane());
    const Index taps = Index(g.h.kernel * g.w.kernel);
    const T* sample_cols = cols + (c * taps * batch + n) * plane;  // row c*KH*KW, sample n
    Acc acc = Acc(0);
    for_each_tap(g.h, g.mode, int64_t(ih), [&](int64_t kh, int64_t oh) {
      for_each_tap(g.w, g.mode, int64_t(iw), [&](int64_t kw, int64_t ow) {
        const Index row = Index(kh * g.w.kernel + kw);
        acc += static_cast<Acc>(sample_cols[row * batch * plane + Index(oh * g.w.out_size + ow)]);
      });
    });
    return acc;
  }
};

// Calls f(layout) with the 32-bit BatchedColumns when every index of `count`
// samples fits, else the 64-bit one (host code of both backends).
template <typename F>
void with_index_type(const ConvGeometry& g, int64_t count, const F& f) {
  if (BatchedColumns<uint32_t>::fits_32bit(g, count)) {
    f(BatchedColumns<uint32_t>(g, count));
  } else {
    f(BatchedColumns<int64_t>(g, count));
  }
}

}  // namespace pyattn

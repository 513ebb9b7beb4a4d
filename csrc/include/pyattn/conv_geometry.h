#pragma once
// Per-element im2col / col2im of a padded convolution, shared by the CPU and
// CUDA kernels. No ATen here: this header is compiled for the device too.
//
// Column layout of one sample: row (c * KH + kh) * KW + kw, column oh * Wo + ow,
// i.e. a (C * KH * KW) x (Ho * Wo) matrix, so that the convolution of group g is
// weight[g] (Cout/G x Cg*KH*KW) @ rows of group g. Rows of a group are contiguous.
#include <cstdint>

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

}  // namespace pyattn

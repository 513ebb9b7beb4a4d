#pragma once
// Index math of a padded convolution, shared by the CPU and CUDA kernels.
//
// Coordinates along one axis are "unpadded": i in [-pad_before, size + pad_after)
// addresses the virtual padded signal, and i in [0, size) is the tensor itself.
// The padded signal is never built: source_index() says where each virtual
// element is read from, and for_each_tap() walks the inverse map for gradients.
#include <cstdint>

#include "pyattn/macros.h"

namespace pyattn {

enum class PadMode : int { Zeros = 0, Reflect = 1, Replicate = 2, Circular = 3 };

// Index in [0, size) that virtual element i reads, or -1 for a zero.
// Preconditions (checked by the op): reflect needs pad < size, circular pad <= size.
// I: int64_t, or int32_t in the CUDA kernels' 32-bit path.
template <typename I>
PYATTN_HOST_DEVICE I source_index(I i, I size, PadMode mode) {
  if (i >= 0 && i < size) return i;
  switch (mode) {
    case PadMode::Replicate:
      return i < 0 ? 0 : size - 1;
    case PadMode::Reflect:
      return i < 0 ? -i : 2 * (size - 1) - i;
    case PadMode::Circular:
      return i < 0 ? i + size : i - size;
    default:
      return -1;
  }
}

struct IndexRange {
  int64_t begin;
  int64_t end;
};

// The virtual elements that read source element s, as at most 3 ranges of
// unpadded coordinates (the inverse of source_index). Returns the count.
PYATTN_HOST_DEVICE int preimages(int64_t s, int64_t size, int64_t pad_before,
                                 int64_t pad_after, PadMode mode, IndexRange out[3]) {
  int n = 0;
  out[n++] = IndexRange{s, s + 1};
  switch (mode) {
    case PadMode::Replicate:
      if (s == 0 && pad_before > 0) out[n++] = IndexRange{-pad_before, 0};
      if (s == size - 1 && pad_after > 0) out[n++] = IndexRange{size, size + pad_after};
      break;
    case PadMode::Reflect:
      if (s >= 1 && s <= pad_before) out[n++] = IndexRange{-s, -s + 1};
      if (s <= size - 2 && s >= size - 1 - pad_after) {
        const int64_t i = 2 * (size - 1) - s;
        out[n++] = IndexRange{i, i + 1};
      }
      break;
    case PadMode::Circular:
      if (s >= size - pad_before) out[n++] = IndexRange{s - size, s - size + 1};
      if (s < pad_after) out[n++] = IndexRange{s + size, s + size + 1};
      break;
    default:
      break;
  }
  return n;
}

// One spatial axis of a convolution.
struct Axis {
  int64_t size;       // input extent
  int64_t out_size;   // output extent
  int64_t pad_before;
  int64_t pad_after;
  int64_t kernel;
  int64_t stride;
  int64_t dilation;
};

PYATTN_HOST_DEVICE int64_t conv_out_size(int64_t size, int64_t pad_before, int64_t pad_after,
                                         int64_t kernel, int64_t stride, int64_t dilation) {
  const int64_t span = size + pad_before + pad_after - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// Virtual coordinate read by output position o through kernel tap k.
PYATTN_HOST_DEVICE int64_t tap_coordinate(const Axis& a, int64_t o, int64_t k) {
  return o * a.stride - a.pad_before + k * a.dilation;
}

// Calls f(k, o) for every (kernel tap k, output position o) pair whose read
// resolves to source element s: the terms of the input gradient at s.
template <typename F>
PYATTN_HOST_DEVICE void for_each_tap(const Axis& a, PadMode mode, int64_t s, F&& f) {
  IndexRange ranges[3];
  const int n = preimages(s, a.size, a.pad_before, a.pad_after, mode, ranges);
  for (int r = 0; r < n; ++r) {
    for (int64_t i = ranges[r].begin; i < ranges[r].end; ++i) {
      for (int64_t k = 0; k < a.kernel; ++k) {
        const int64_t t = i + a.pad_before - k * a.dilation;  // = o * stride
        if (t < 0) break;
        if (t % a.stride != 0) continue;
        const int64_t o = t / a.stride;
        if (o < a.out_size) f(k, o);
      }
    }
  }
}

}  // namespace pyattn

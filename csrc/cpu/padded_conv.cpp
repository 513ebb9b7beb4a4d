// CPU im2col / col2im of pyattn::padded_conv2d (float32, float64; OpenMP via
// at::parallel_for). Per-axis tables are built with the shared index math of
// pyattn/padding.h, so these loops resolve padding exactly as the CUDA kernels.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "pyattn/padded_conv.h"

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

// For each source element s of one axis, the column offsets k * tap_stride +
// o * out_stride of every (k, o) that reads it (for_each_tap), in CSR form.
struct TapTable {
  std::vector<int64_t> begin;  // size + 1 offsets into `offset`
  std::vector<int64_t> offset;
};

TapTable tap_table(const Axis& a, PadMode mode, int64_t tap_stride, int64_t out_stride) {
  TapTable t;
  t.begin.reserve(a.size + 1);
  t.begin.push_back(0);
  for (int64_t s = 0; s < a.size; ++s) {
    for_each_tap(a, mode, s, [&](int64_t k, int64_t o) {
      t.offset.push_back(k * tap_stride + o * out_stride);
    });
    t.begin.push_back(static_cast<int64_t>(t.offset.size()));
  }
  return t;
}

// Output positions [begin, end) of tap k whose reads lie inside the tensor and,
// at stride 1, are contiguous: that span is copied as a block.
IndexRange interior(const Axis& a, int64_t k) {
  if (a.stride != 1) return IndexRange{0, 0};
  const int64_t shift = k * a.dilation - a.pad_before;  // source = o + shift
  const int64_t begin = std::clamp<int64_t>(-shift, 0, a.out_size);
  const int64_t end = std::clamp<int64_t>(a.size - shift, begin, a.out_size);
  return IndexRange{begin, end};
}

template <typename T>
void im2col_kernel(const T* input, T* cols, int64_t batch, const ConvGeometry& g) {
  const std::vector<int64_t> rows = source_table(g.h, g.mode);
  const std::vector<int64_t> columns = source_table(g.w, g.mode);
  const int64_t kh_count = g.h.kernel, kw_count = g.w.kernel;
  const int64_t out_h = g.h.out_size, out_w = g.w.out_size;
  const int64_t plane = g.input_plane();
  // One task per column row (sample, c, kh, kw): a contiguous out_h x out_w block.
  at::parallel_for(0, batch * g.col_rows(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t kw = r % kw_count;
      const int64_t kh = (r / kw_count) % kh_count;
      const T* src = input + (r / (kw_count * kh_count)) * plane;
      const int64_t* col_src = columns.data() + kw * out_w;
      const IndexRange block = interior(g.w, kw);
      T* dst = cols + r * out_h * out_w;
      for (int64_t oh = 0; oh < out_h; ++oh, dst += out_w) {
        const int64_t ih = rows[kh * out_h + oh];
        if (ih < 0) {
          std::fill(dst, dst + out_w, T(0));
          continue;
        }
        const T* src_row = src + ih * g.w.size;
        for (int64_t ow = 0; ow < block.begin; ++ow) {
          dst[ow] = col_src[ow] < 0 ? T(0) : src_row[col_src[ow]];
        }
        if (block.end > block.begin) {
          std::copy(src_row + col_src[block.begin], src_row + col_src[block.begin] +
                    (block.end - block.begin), dst + block.begin);
        }
        for (int64_t ow = std::max(block.end, block.begin); ow < out_w; ++ow) {
          dst[ow] = col_src[ow] < 0 ? T(0) : src_row[col_src[ow]];
        }
      }
    }
  });
}

// The source elements [begin, end) of an axis whose taps are exactly the
// unpadded stride-1 ones, (k, s + pad_before - k * dilation) for every k: there
// the gather is a shifted vector add per tap. Found from the table itself, so
// it can only agree with for_each_tap.
IndexRange plain_span(const Axis& a, const TapTable& t, int64_t tap_stride) {
  auto plain = [&](int64_t s) {
    if (a.stride != 1 || t.begin[s + 1] - t.begin[s] != a.kernel) return false;
    for (int64_t k = 0; k < a.kernel; ++k) {
      const int64_t o = s + a.pad_before - k * a.dilation;
      if (o < 0 || o >= a.out_size || t.offset[t.begin[s] + k] != k * tap_stride + o) {
        return false;
      }
    }
    return true;
  };
  int64_t begin = 0;
  while (begin < a.size && !plain(begin)) ++begin;
  int64_t end = begin;
  while (end < a.size && plain(end)) ++end;
  return IndexRange{begin, end};
}

template <typename T>
void col2im_kernel(const T* cols, T* grad_input, int64_t batch, const ConvGeometry& g) {
  const int64_t out_plane = g.out_plane();
  const TapTable rows = tap_table(g.h, g.mode, g.w.kernel * out_plane, g.w.out_size);
  const TapTable columns = tap_table(g.w, g.mode, out_plane, 1);
  const IndexRange span = plain_span(g.w, columns, out_plane);
  const int64_t channel_cols = g.h.kernel * g.w.kernel * out_plane;
  const int64_t width = g.w.size;
  // One task per (sample, channel) plane: every input element is written once.
  at::parallel_for(0, batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const T* src = cols + bc * channel_cols;
      T* dst_row = grad_input + bc * g.input_plane();
      for (int64_t ih = 0; ih < g.h.size; ++ih, dst_row += width) {
        std::fill(dst_row, dst_row + width, T(0));
        for (int64_t a = rows.begin[ih]; a < rows.begin[ih + 1]; ++a) {
          const T* src_row = src + rows.offset[a];
          for (int64_t kw = 0; kw < g.w.kernel && span.end > span.begin; ++kw) {
            const T* shifted = src_row + kw * out_plane + g.w.pad_before - kw * g.w.dilation;
            for (int64_t iw = span.begin; iw < span.end; ++iw) dst_row[iw] += shifted[iw];
          }
          for (int64_t iw = 0; iw < width; ++iw) {
            if (iw == span.begin && span.end > span.begin) iw = span.end;
            if (iw >= width) break;
            T acc = T(0);
            for (int64_t b = columns.begin[iw]; b < columns.begin[iw + 1]; ++b) {
              acc += src_row[columns.offset[b]];
            }
            dst_row[iw] += acc;
          }
        }
      }
    }
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
                           im2col_batched_cpu, col2im_batched_cpu, /*gemm_per_thread=*/true};
constexpr ConvBackend kCpuTwin{"CPU twin of the CUDA path (float32, float64)", cpu_supports,
                               nullptr, nullptr, im2col_batched_cpu, col2im_batched_cpu,
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

// Test-only: the batched (CUDA) driver and kernels' per-element code on CPU.
TORCH_LIBRARY_FRAGMENT(pyattn, m) {
  m.def("padded_conv2d_batched_cpu_twin(str which, Tensor? grad_output, Tensor input, "
        "Tensor weight, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, "
        "int groups, str padding_mode) -> Tensor",
        &batched_cpu_twin);
}

}  // namespace pyattn

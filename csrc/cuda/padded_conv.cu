// CUDA im2col / col2im of pyattn::padded_conv2d (float16, bfloat16, float32,
// float64). One thread per column element (im2col) or per input element
// (col2im, a gather: deterministic, no atomics). The per-element math is the
// same inline code the CPU backend runs (pyattn/conv_geometry.h).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "pyattn/padded_conv.h"

namespace pyattn {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t n) {
  // Grid-stride loops below: cap the grid, never overflow it.
  return std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20);
}

template <typename T>
__global__ void im2col_kernel(const T* __restrict__ input, T* __restrict__ cols, int64_t total,
                              ConvGeometry g) {
  const int64_t per_sample = g.cols_per_sample();
  const int64_t plane = g.channels * g.input_plane();
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(blockDim.x) * gridDim.x) {
    const int64_t n = e / per_sample;
    cols[e] = im2col_value(input + n * plane, g, e - n * per_sample);
  }
}

template <typename T>
__global__ void col2im_kernel(const T* __restrict__ cols, T* __restrict__ grad_input,
                              int64_t total, ConvGeometry g) {
  using Acc = at::opmath_type<T>;
  const int64_t per_sample = g.cols_per_sample();
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(blockDim.x) * gridDim.x) {
    const int64_t iw = e % g.w.size;
    const int64_t ih = (e / g.w.size) % g.h.size;
    const int64_t nc = e / g.input_plane();
    const int64_t n = nc / g.channels;
    const int64_t c = nc - n * g.channels;
    grad_input[e] = static_cast<T>(col2im_value<Acc>(cols + n * per_sample, g, c, ih, iw));
  }
}

bool cuda_supports(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void im2col_cuda(const at::Tensor& input, const at::Tensor& cols, const ConvGeometry& g) {
  const int64_t total = cols.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "padded_conv2d_im2col_cuda", [&] {
    im2col_kernel<scalar_t><<<grid_for(total), kThreads, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
        input.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(), total, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void col2im_cuda(const at::Tensor& cols, const at::Tensor& grad_input, const ConvGeometry& g) {
  const int64_t total = grad_input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cols.scalar_type(),
                                  "padded_conv2d_col2im_cuda", [&] {
    col2im_kernel<scalar_t><<<grid_for(total), kThreads, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
        cols.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), total, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr ConvBackend kCuda{"CUDA (float16, bfloat16, float32, float64)", cuda_supports,
                            im2col_cuda, col2im_cuda, /*gemm_per_thread=*/false};

}  // namespace

TORCH_LIBRARY_IMPL(pyattn, CUDA, m) { register_padded_conv2d<kCuda>(m); }

}  // namespace pyattn

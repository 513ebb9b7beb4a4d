// CUDA kernels of pyattn::padded_conv2d's batched path (float16, bfloat16,
// float32, float64): im2col into the group-major layout that lets one batched
// GEMM cover a chunk of samples, and col2im as a gather (deterministic, no
// atomics). One thread per column element (im2col: consecutive threads write
// consecutive columns and read consecutive input columns, coalesced) or per
// input element (col2im). Index math: BatchedColumns (pyattn/conv_geometry.h),
// the code the CPU twin runs; 32-bit with multiply-shift divisors when every
// index fits, 64-bit otherwise.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "pyattn/padded_conv.h"

namespace pyattn {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t n) {
  // Grid-stride loops below: cap the grid, never overflow it (nor, with the
  // cap, the 32-bit index: total < 2^31 plus one stride of < 2^28).
  return std::max<int64_t>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20), 1);
}

template <typename T, typename Index>
__global__ void im2col_kernel(const T* __restrict__ input, T* __restrict__ cols,
                              BatchedColumns<Index> layout) {
  const Index total = layout.column_count();
  for (Index e = blockIdx.x * Index(blockDim.x) + threadIdx.x; e < total;
       e += Index(blockDim.x) * gridDim.x) {
    cols[e] = layout.im2col(input, e);
  }
}

// cols: the accumulate type (float32 for half inputs), rounded once here.
template <typename T, typename Acc, typename Index>
__global__ void col2im_kernel(const Acc* __restrict__ cols, T* __restrict__ grad_input,
                              BatchedColumns<Index> layout) {
  const Index total = layout.input_count();
  for (Index e = blockIdx.x * Index(blockDim.x) + threadIdx.x; e < total;
       e += Index(blockDim.x) * gridDim.x) {
    grad_input[e] = static_cast<T>(layout.template col2im<Acc>(cols, e));
  }
}

bool cuda_supports(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void im2col_cuda(const at::Tensor& input, const at::Tensor& cols, const ConvGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "padded_conv2d_im2col_cuda", [&] {
    with_index_type(g, input.size(0), [&](const auto& layout) {
      im2col_kernel<<<grid_for(cols.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          input.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(), layout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void col2im_cuda(const at::Tensor& cols, const at::Tensor& grad_input, const ConvGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_input.scalar_type(),
                                  "padded_conv2d_col2im_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    TORCH_INTERNAL_ASSERT(cols.scalar_type() == c10::CppTypeToScalarType<Acc>::value);
    with_index_type(g, grad_input.size(0), [&](const auto& layout) {
      col2im_kernel<<<grid_for(grad_input.numel()), kThreads, 0,
                      c10::cuda::getCurrentCUDAStream()>>>(
          cols.const_data_ptr<Acc>(), grad_input.mutable_data_ptr<scalar_t>(), layout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

constexpr ConvBackend kCuda{"CUDA (float16, bfloat16, float32, float64)", cuda_supports,
                            nullptr, nullptr, im2col_cuda, col2im_cuda, nullptr, nullptr, nullptr,
                            nullptr, nullptr, nullptr, nullptr, /*gemm_per_thread=*/false};

}  // namespace

TORCH_LIBRARY_IMPL(pyattn, CUDA, m) { register_padded_conv2d<kCuda>(m); }

}  // namespace pyattn

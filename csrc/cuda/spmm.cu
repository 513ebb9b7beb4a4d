// CUDA kernels of pyattn::spmm_csr (float16, bfloat16, float32, float64;
// float32 accumulation for the half types). A warp per row (or per node for
// the max backward), lanes across features; rows are independent, so every
// output has one writer: no atomics, deterministic.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "pyattn/spmm_ops.h"

namespace pyattn {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

int64_t blocks_for(int64_t warps) {
  return std::min<int64_t>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock, int64_t(1) << 20);
}

__device__ __forceinline__ int64_t global_warp() {
  return (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t warp_count() {
  return gridDim.x * int64_t(blockDim.x) / kWarp;
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void spmm_kernel(const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                            const T* __restrict__ values, const T* __restrict__ x,
                            T* __restrict__ out, int64_t* __restrict__ arg, int64_t rows,
                            int64_t features, Reduce reduce) {
  using Acc = at::opmath_type<T>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = global_warp(); i < rows; i += warp_count()) {
    const int64_t first = rowptr[i], last = rowptr[i + 1];
    const Acc scale = row_scale<Acc>(last - first, reduce);
    for (int64_t f = lane; f < features; f += kWarp) {
      Acc acc = Acc(0);
      int64_t best_edge = -1;
      for (int64_t e = first; e < last; ++e) {
        const Acc w = values ? static_cast<Acc>(values[e]) : Acc(1);
        const Acc term = w * static_cast<Acc>(x[col[e] * features + f]);
        if (reduce == Reduce::Max) {
          max_update(term, e, acc, best_edge);
        } else {
          acc += term;
        }
      }
      if (reduce == Reduce::Max) {
        out[i * features + f] = best_edge < 0 ? T(0) : static_cast<T>(acc);
        arg[i * features + f] = best_edge;
      } else {
        out[i * features + f] = static_cast<T>(acc * scale);
      }
    }
  }
}

template <typename T>
__global__ void edge_grad_kernel(const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                                 const T* __restrict__ x, const T* __restrict__ grad,
                                 T* __restrict__ out, int64_t rows, int64_t features,
                                 Reduce reduce) {
  using Acc = at::opmath_type<T>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = global_warp(); i < rows; i += warp_count()) {
    const Acc scale = row_scale<Acc>(rowptr[i + 1] - rowptr[i], reduce);
    for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
      Acc dot = 0;
      for (int64_t f = lane; f < features; f += kWarp) {
        dot += static_cast<Acc>(grad[i * features + f]) * static_cast<Acc>(x[col[e] * features + f]);
      }
      dot = warp_sum(dot);
      if (lane == 0) out[e] = static_cast<T>(dot * scale);
    }
  }
}

template <typename T>
__global__ void max_backward_kernel(const int64_t* __restrict__ ptr, const int64_t* __restrict__ rows_of,
                                    const int64_t* __restrict__ edge_of, const T* __restrict__ values,
                                    const T* __restrict__ x, const int64_t* __restrict__ arg,
                                    const T* __restrict__ grad, T* __restrict__ grad_x,
                                    T* __restrict__ grad_values, int64_t nodes, int64_t features) {
  using Acc = at::opmath_type<T>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t j = global_warp(); j < nodes; j += warp_count()) {
    for (int64_t f0 = 0; f0 < features; f0 += kWarp) {
      const int64_t f = f0 + lane;
      Acc acc = 0;
      for (int64_t k = ptr[j]; k < ptr[j + 1]; ++k) {
        const int64_t e = edge_of[k], i = rows_of[k];
        if (f < features && arg[i * features + f] == e) {
          acc += (values ? static_cast<Acc>(values[e]) : Acc(1)) *
                 static_cast<Acc>(grad[i * features + f]);
        }
      }
      if (f < features) grad_x[j * features + f] = static_cast<T>(acc);
    }
    if (grad_values == nullptr) continue;
    for (int64_t k = ptr[j]; k < ptr[j + 1]; ++k) {
      const int64_t e = edge_of[k], i = rows_of[k];
      Acc dv = 0;
      for (int64_t f = lane; f < features; f += kWarp) {
        if (arg[i * features + f] == e) {
          dv += static_cast<Acc>(x[j * features + f]) * static_cast<Acc>(grad[i * features + f]);
        }
      }
      dv = warp_sum(dv);
      if (lane == 0) grad_values[e] = static_cast<T>(dv);
    }
  }
}

#define PYATTN_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> spmm_csr_cuda(
    const at::Tensor& rowptr, const at::Tensor& col, const c10::optional<at::Tensor>& values,
    const at::Tensor& x_in, c10::string_view reduce_name, bool check,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&) {
  const Reduce reduce = parse_reduce(reduce_name);
  check_csr("spmm", rowptr, col, values, x_in, check);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = x_in.contiguous(), ptr = rowptr.contiguous(), idx = col.contiguous();
  const c10::optional<at::Tensor> w =
      values.has_value() ? c10::optional<at::Tensor>(values->contiguous()) : c10::nullopt;
  const int64_t rows = ptr.size(0) - 1, features = x.size(1);
  at::Tensor out = at::empty({rows, features}, x.options());
  at::Tensor arg = reduce == Reduce::Max ? at::empty({rows, features}, ptr.options())
                                         : at::empty({0}, ptr.options());
  if (rows == 0 || features == 0) return {out, arg};
  PYATTN_DISPATCH_CUDA_FLOATS(x.scalar_type(), "spmm_csr_cuda", [&] {
    spmm_kernel<scalar_t><<<blocks_for(rows), kWarp * kWarpsPerBlock, 0,
                            at::cuda::getCurrentCUDAStream()>>>(
        ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(),
        w.has_value() ? w->const_data_ptr<scalar_t>() : nullptr, x.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(),
        reduce == Reduce::Max ? arg.mutable_data_ptr<int64_t>() : nullptr, rows, features, reduce);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, arg};
}

at::Tensor spmm_csr_edge_grad_cuda(const at::Tensor& rowptr, const at::Tensor& col,
                                   const at::Tensor& x_in, const at::Tensor& grad_in,
                                   c10::string_view reduce_name) {
  constexpr const char* op = "spmm_csr_edge_grad";
  const Reduce reduce = parse_reduce(reduce_name);
  check_edge_grad(op, rowptr, col, x_in, grad_in, reduce);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor ptr = rowptr.contiguous(), idx = col.contiguous();
  at::Tensor out = at::empty({col.size(0)}, x.options());
  const int64_t rows = ptr.size(0) - 1;
  if (rows == 0 || col.size(0) == 0) return out;
  PYATTN_DISPATCH_CUDA_FLOATS(x.scalar_type(), "spmm_csr_edge_grad_cuda", [&] {
    edge_grad_kernel<scalar_t><<<blocks_for(rows), kWarp * kWarpsPerBlock, 0,
                                 at::cuda::getCurrentCUDAStream()>>>(
        ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(),
        x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), rows, x.size(1), reduce);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> spmm_csr_max_backward_cuda(
    const at::Tensor& csc_ptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const c10::optional<at::Tensor>& values, const at::Tensor& x_in, const at::Tensor& arg_in,
    const at::Tensor& grad_in) {
  constexpr const char* op = "spmm_csr_max_backward";
  check_max_backward(op, csc_ptr, csc_row, csc_perm, x_in, arg_in, grad_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = x_in.contiguous(), arg = arg_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor ptr = csc_ptr.contiguous(), rows = csc_row.contiguous(),
                   perm = csc_perm.contiguous();
  const c10::optional<at::Tensor> w_in =
      values.has_value() ? c10::optional<at::Tensor>(values->contiguous()) : c10::nullopt;
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_values = at::empty({values.has_value() ? rows.size(0) : 0}, x.options());
  if (x.size(0) == 0 || x.size(1) == 0) return {grad_x, grad_values};
  PYATTN_DISPATCH_CUDA_FLOATS(x.scalar_type(), "spmm_csr_max_backward_cuda", [&] {
    max_backward_kernel<scalar_t><<<blocks_for(x.size(0)), kWarp * kWarpsPerBlock, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
        ptr.const_data_ptr<int64_t>(), rows.const_data_ptr<int64_t>(),
        perm.const_data_ptr<int64_t>(),
        w_in.has_value() ? w_in->const_data_ptr<scalar_t>() : nullptr,
        x.const_data_ptr<scalar_t>(), arg.const_data_ptr<int64_t>(),
        grad.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
        values.has_value() ? grad_values.mutable_data_ptr<scalar_t>() : nullptr, x.size(0),
        x.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyattn, CUDA, m) {
  m.impl("spmm_csr", &spmm_csr_cuda);
  m.impl("spmm_csr_edge_grad", &spmm_csr_edge_grad_cuda);
  m.impl("spmm_csr_max_backward", &spmm_csr_max_backward_cuda);
}

}  // namespace pyattn

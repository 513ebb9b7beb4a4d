// CUDA kernels of pyattn::spmm_csr (float16, bfloat16, float32, float64;
// float32 accumulation for the half types; int32 or int64 indices, read as
// given). Forward: a group of lanes per row (several rows per warp when F is
// small), one walk over the row's edges per `lanes * vector * chunks`
// features, each lane loading 16-byte vectors into several accumulators; the
// launch geometry is plan_spmm's (pyattn/spmm.h), one launch per call. Rows
// are independent and edges are summed in CSR order, so every output has one
// writer and a fixed order: no atomics, deterministic for any launch shape.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "pyattn/spmm_ops.h"

namespace pyattn {
namespace {

constexpr int kThreads = kSpmmWarp * kSpmmWarpsPerBlock;

// V consecutive elements, loaded or stored as one 16-byte (or smaller) access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, typename I, int V, int C, bool kExtremum>
__global__ void __launch_bounds__(kThreads)
    spmm_kernel(const I* __restrict__ rowptr, const I* __restrict__ col,
                const T* __restrict__ values, const T* __restrict__ x, T* __restrict__ out,
                int64_t* __restrict__ arg, int64_t rows, int64_t features, int lanes,
                int64_t feature_passes, Reduce reduce) {
  using Acc = at::opmath_type<T>;
  const int lane = threadIdx.x % lanes;
  const int64_t groups_per_block = blockDim.x / lanes;
  const int64_t group_stride = int64_t(gridDim.x) * groups_per_block;
  const int64_t per_pass = int64_t(lanes) * V * C;
  for (int64_t i = int64_t(blockIdx.x) * groups_per_block + threadIdx.x / lanes; i < rows;
       i += group_stride) {
    const int64_t first = rowptr[i], last = rowptr[i + 1];
    const Acc scale = row_scale<Acc>(last - first, reduce);
    for (int64_t pass = 0; pass < feature_passes; ++pass) {
      const int64_t f0 = pass * per_pass + int64_t(lane) * V;
      Acc acc[C][V];
      int64_t best[kExtremum ? C : 1][kExtremum ? V : 1];
#pragma unroll
      for (int c = 0; c < C; ++c) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          acc[c][v] = Acc(0);
          if constexpr (kExtremum) best[c][v] = -1;
        }
      }
#pragma unroll 2
      for (int64_t e = first; e < last; ++e) {
        const T* x_row = x + static_cast<int64_t>(col[e]) * features;
        const Acc w = values ? static_cast<Acc>(values[e]) : Acc(1);
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int64_t f = f0 + int64_t(c) * lanes * V;
          if (f >= features) continue;  // F % V == 0 when V > 1: whole vectors
          const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(x_row + f);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const Acc term = w * static_cast<Acc>(p.v[v]);
            if constexpr (kExtremum) {
              extremum_update(term, e, reduce == Reduce::Max, acc[c][v], best[c][v]);
            } else {
              acc[c][v] += term;
            }
          }
        }
      }
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int64_t f = f0 + int64_t(c) * lanes * V;
        if (f >= features) continue;
        Pack<T, V> p;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int64_t edge = kExtremum ? best[kExtremum ? c : 0][kExtremum ? v : 0] : 0;
          p.v[v] = static_cast<T>(reduce_result(reduce, acc[c][v], edge, scale));
          if constexpr (kExtremum) arg[i * features + f + v] = edge;
        }
        *reinterpret_cast<Pack<T, V>*>(out + i * features + f) = p;
      }
    }
  }
}

__device__ __forceinline__ int64_t global_warp() {
  return (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kSpmmWarp;
}
__device__ __forceinline__ int64_t warp_count() {
  return gridDim.x * int64_t(blockDim.x) / kSpmmWarp;
}

int64_t warp_blocks(int64_t warps) {
  return std::min<int64_t>((warps + kSpmmWarpsPerBlock - 1) / kSpmmWarpsPerBlock, kSpmmMaxBlocks);
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int offset = kSpmmWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// A warp per row; per edge, the lanes split the features and reduce the dot
// product in a fixed shuffle order.
template <typename T, typename I>
__global__ void edge_grad_kernel(const I* __restrict__ rowptr, const I* __restrict__ col,
                                 const T* __restrict__ x, const T* __restrict__ grad,
                                 T* __restrict__ out, int64_t rows, int64_t features,
                                 Reduce reduce) {
  using Acc = at::opmath_type<T>;
  const int lane = threadIdx.x % kSpmmWarp;
  for (int64_t i = global_warp(); i < rows; i += warp_count()) {
    const int64_t first = rowptr[i], last = rowptr[i + 1];
    const Acc scale = row_scale<Acc>(last - first, reduce);
    for (int64_t e = first; e < last; ++e) {
      const T* x_row = x + static_cast<int64_t>(col[e]) * features;
      Acc dot = 0;
      for (int64_t f = lane; f < features; f += kSpmmWarp) {
        dot += static_cast<Acc>(grad[i * features + f]) * static_cast<Acc>(x_row[f]);
      }
      dot = warp_sum(dot);
      if (lane == 0) out[e] = static_cast<T>(dot * scale);
    }
  }
}

// Max / min backward: a warp per node j gathers, through the transposed CSR,
// the gradient of every (row, feature) whose arg edge reads node j.
template <typename T, typename I>
__global__ void max_backward_kernel(const I* __restrict__ ptr, const I* __restrict__ rows_of,
                                    const int64_t* __restrict__ edge_of,
                                    const T* __restrict__ values, const T* __restrict__ x,
                                    const int64_t* __restrict__ arg, const T* __restrict__ grad,
                                    T* __restrict__ grad_x, T* __restrict__ grad_values,
                                    int64_t nodes, int64_t features) {
  using Acc = at::opmath_type<T>;
  const int lane = threadIdx.x % kSpmmWarp;
  for (int64_t j = global_warp(); j < nodes; j += warp_count()) {
    const int64_t first = ptr[j], last = ptr[j + 1];
    for (int64_t f0 = 0; f0 < features; f0 += kSpmmWarp) {
      const int64_t f = f0 + lane;
      Acc acc = 0;
      for (int64_t k = first; k < last; ++k) {
        const int64_t e = edge_of[k], i = rows_of[k];
        if (f < features && arg[i * features + f] == e) {
          acc += (values ? static_cast<Acc>(values[e]) : Acc(1)) *
                 static_cast<Acc>(grad[i * features + f]);
        }
      }
      if (f < features) grad_x[j * features + f] = static_cast<T>(acc);
    }
    if (grad_values == nullptr) continue;
    for (int64_t k = first; k < last; ++k) {
      const int64_t e = edge_of[k], i = rows_of[k];
      Acc dv = 0;
      for (int64_t f = lane; f < features; f += kSpmmWarp) {
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

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

template <typename T, typename I, int V, bool kExtremum>
void launch_forward(const SpmmPlan& plan, const I* rowptr, const I* col, const T* values,
                    const T* x, T* out, int64_t* arg, int64_t rows, int64_t features,
                    Reduce reduce) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(plan.blocks)), block(kThreads);
#define PYATTN_SPMM_LAUNCH(C)                                                              \
  spmm_kernel<T, I, V, C, kExtremum><<<grid, block, 0, stream>>>(                          \
      rowptr, col, values, x, out, arg, rows, features, plan.lanes, plan.feature_passes,  \
      reduce)
  switch (plan.chunks) {
    case 1: PYATTN_SPMM_LAUNCH(1); break;
    case 2: PYATTN_SPMM_LAUNCH(2); break;
    case 4: if constexpr (!kExtremum) { PYATTN_SPMM_LAUNCH(4); break; } [[fallthrough]];
    case 8: if constexpr (!kExtremum) { PYATTN_SPMM_LAUNCH(8); break; } [[fallthrough]];
    default: TORCH_CHECK(false, "spmm: no kernel for ", plan.chunks, " chunks");
  }
#undef PYATTN_SPMM_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> spmm_csr_cuda(
    const at::Tensor& rowptr, const at::Tensor& col, const c10::optional<at::Tensor>& values,
    const at::Tensor& x_in, c10::string_view reduce_name, bool check,
    const c10::optional<at::Tensor>& csc_ptr, const c10::optional<at::Tensor>& csc_row,
    const c10::optional<at::Tensor>& csc_perm) {
  constexpr const char* op = "spmm";
  const Reduce reduce = parse_reduce(reduce_name);
  check_csr(op, rowptr, col, values, x_in, check);
  check_transpose(op, csc_ptr, csc_row, csc_perm, rowptr, col, x_in, check);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = x_in.contiguous(), ptr = rowptr.contiguous(), idx = col.contiguous();
  const c10::optional<at::Tensor> w = contiguous(values);
  const int64_t rows = ptr.size(0) - 1, features = x.size(1);
  const bool extremum = is_extremum(reduce);
  at::Tensor out = at::empty({rows, features}, x.options());
  at::Tensor arg = extremum ? at::empty({rows, features}, x.options().dtype(at::kLong))
                            : at::empty({0}, x.options().dtype(at::kLong));
  if (rows == 0 || features == 0) return {out, arg};
  const bool aligned = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  const SpmmPlan plan = plan_spmm(rows, features, x.element_size(), aligned, extremum);
  AT_DISPATCH_INDEX_TYPES(ptr.scalar_type(), "spmm_csr_cuda", [&] {
    PYATTN_DISPATCH_CUDA_FLOATS(x.scalar_type(), "spmm_csr_cuda", [&] {
      constexpr int kVector = 16 / sizeof(scalar_t);
      const index_t* p = ptr.const_data_ptr<index_t>();
      const index_t* c = idx.const_data_ptr<index_t>();
      const scalar_t* v = w.has_value() ? w->const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* xs = x.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      int64_t* a = extremum ? arg.mutable_data_ptr<int64_t>() : nullptr;
      if (plan.vector == kVector && extremum) {
        launch_forward<scalar_t, index_t, kVector, true>(plan, p, c, v, xs, o, a, rows, features, reduce);
      } else if (plan.vector == kVector) {
        launch_forward<scalar_t, index_t, kVector, false>(plan, p, c, v, xs, o, a, rows, features, reduce);
      } else if (extremum) {
        launch_forward<scalar_t, index_t, 1, true>(plan, p, c, v, xs, o, a, rows, features, reduce);
      } else {
        launch_forward<scalar_t, index_t, 1, false>(plan, p, c, v, xs, o, a, rows, features, reduce);
      }
    });
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
  AT_DISPATCH_INDEX_TYPES(ptr.scalar_type(), "spmm_csr_edge_grad_cuda", [&] {
    PYATTN_DISPATCH_CUDA_FLOATS(x.scalar_type(), "spmm_csr_edge_grad_cuda", [&] {
      edge_grad_kernel<scalar_t, index_t><<<warp_blocks(rows), kThreads, 0,
                                            c10::cuda::getCurrentCUDAStream()>>>(
          ptr.const_data_ptr<index_t>(), idx.const_data_ptr<index_t>(),
          x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), rows, x.size(1), reduce);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> spmm_csr_max_backward_cuda(
    const at::Tensor& csc_ptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const c10::optional<at::Tensor>& values, const at::Tensor& x_in, const at::Tensor& arg_in,
    const at::Tensor& grad_in) {
  constexpr const char* op = "spmm_csr_max_backward";
  check_max_backward(op, csc_ptr, csc_row, csc_perm, values, x_in, arg_in, grad_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = x_in.contiguous(), arg = arg_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor ptr = csc_ptr.contiguous(), rows = csc_row.contiguous(),
                   perm = csc_perm.contiguous();
  const c10::optional<at::Tensor> w_in = contiguous(values);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_values = at::empty({values.has_value() ? rows.size(0) : 0}, x.options());
  if (x.size(0) == 0) return {grad_x, grad_values};
  AT_DISPATCH_INDEX_TYPES(ptr.scalar_type(), "spmm_csr_max_backward_cuda", [&] {
    PYATTN_DISPATCH_CUDA_FLOATS(x.scalar_type(), "spmm_csr_max_backward_cuda", [&] {
      max_backward_kernel<scalar_t, index_t><<<warp_blocks(x.size(0)), kThreads, 0,
                                               c10::cuda::getCurrentCUDAStream()>>>(
          ptr.const_data_ptr<index_t>(), rows.const_data_ptr<index_t>(),
          perm.const_data_ptr<int64_t>(),
          w_in.has_value() ? w_in->const_data_ptr<scalar_t>() : nullptr,
          x.const_data_ptr<scalar_t>(), arg.const_data_ptr<int64_t>(),
          grad.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
          values.has_value() ? grad_values.mutable_data_ptr<scalar_t>() : nullptr, x.size(0),
          x.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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

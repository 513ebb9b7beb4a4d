// CPU kernels of pyattn::spmm_csr (float32, float64; int32 or int64 indices):
// OpenMP over rows, the inner loops run over contiguous features and
// vectorise. Deterministic: each output row (and each edge's value gradient)
// has one writer; the max / min backward gathers through the transposed CSR
// instead of scattering. The reduction rules are pyattn/spmm.h's, shared with
// the CUDA kernels.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pyattn/spmm_ops.h"

namespace pyattn {
namespace {

int64_t row_grain(int64_t features) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(features, 1)); }

void check_cpu_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": the CPU kernel supports float32 and float64 `x`, got ", x.scalar_type());
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

// out_row = scale * sum_e w_e x[col[e]], edges in CSR order (w_e = 1 when
// unweighted: multiplying by 1 is exact, so the result equals a plain sum).
template <typename T, typename I>
void sum_row(const I* __restrict__ col, const T* __restrict__ values, const T* __restrict__ x,
             T* __restrict__ out_row, int64_t first, int64_t last, int64_t features, T scale) {
  std::fill(out_row, out_row + features, T(0));
  for (int64_t e = first; e < last; ++e) {
    const T* __restrict__ x_row = x + static_cast<int64_t>(col[e]) * features;
    const T w = values ? values[e] : T(1);
    for (int64_t f = 0; f < features; ++f) out_row[f] += w * x_row[f];
  }
  if (scale != T(1)) {
    for (int64_t f = 0; f < features; ++f) out_row[f] *= scale;
  }
}

template <typename T, typename I>
void forward_kernel(const at::Tensor& rowptr_t, const at::Tensor& col_t,
                    const c10::optional<at::Tensor>& values_t, const at::Tensor& x_t,
                    const at::Tensor& out_t, const at::Tensor& arg_t, Reduce reduce) {
  using Acc = at::opmath_type<T>;
  // CPU dtypes accumulate in themselves: sums go straight into the output row.
  static_assert(std::is_same_v<Acc, T>);
  const I* rowptr = rowptr_t.const_data_ptr<I>();
  const I* col = col_t.const_data_ptr<I>();
  const T* values = values_t.has_value() ? values_t->const_data_ptr<T>() : nullptr;
  const T* x = x_t.const_data_ptr<T>();
  T* out = out_t.mutable_data_ptr<T>();
  int64_t* arg = is_extremum(reduce) ? arg_t.mutable_data_ptr<int64_t>() : nullptr;
  const int64_t rows = rowptr_t.size(0) - 1, features = x_t.size(1);
  at::parallel_for(0, rows, row_grain(features), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> best_edge(arg ? features : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = rowptr[i], last = rowptr[i + 1];
      T* __restrict__ out_row = out + i * features;
      if (arg) {
        std::fill(best_edge.begin(), best_edge.end(), int64_t(-1));
        for (int64_t e = first; e < last; ++e) {
          const Acc w = values ? values[e] : Acc(1);
          const T* x_row = x + static_cast<int64_t>(col[e]) * features;
          for (int64_t f = 0; f < features; ++f) {
            reduce_update(reduce, w * x_row[f], e, out_row[f], best_edge[f]);
          }
        }
        for (int64_t f = 0; f < features; ++f) {
          out_row[f] = reduce_result(reduce, out_row[f], best_edge[f], Acc(1));
          arg[i * features + f] = best_edge[f];
        }
        continue;
      }
      sum_row(col, values, x, out_row, first, last, features, row_scale<T>(last - first, reduce));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> spmm_csr_cpu(
    const at::Tensor& rowptr, const at::Tensor& col, const c10::optional<at::Tensor>& values,
    const at::Tensor& x_in, c10::string_view reduce_name, bool check,
    const c10::optional<at::Tensor>& csc_ptr, const c10::optional<at::Tensor>& csc_row,
    const c10::optional<at::Tensor>& csc_perm) {
  constexpr const char* op = "spmm";
  const Reduce reduce = parse_reduce(reduce_name);
  check_csr(op, rowptr, col, values, x_in, check);
  check_transpose(op, csc_ptr, csc_row, csc_perm, rowptr, col, x_in, check);
  check_cpu_dtype(op, x_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = x_in.contiguous(), ptr = rowptr.contiguous(), idx = col.contiguous();
  const c10::optional<at::Tensor> w = contiguous(values);
  const int64_t rows = ptr.size(0) - 1;
  at::Tensor out = at::empty({rows, x.size(1)}, x.options());
  at::Tensor arg = is_extremum(reduce) ? at::empty({rows, x.size(1)}, x.options().dtype(at::kLong))
                                       : at::empty({0}, x.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(ptr.scalar_type(), "spmm_csr_cpu", [&] {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm_csr_cpu", [&] {
      forward_kernel<scalar_t, index_t>(ptr, idx, w, x, out, arg, reduce);
    });
  });
  return {out, arg};
}

// d out / d values[e] = <grad_out[row(e)], x[col[e]]> * row_scale.
at::Tensor spmm_csr_edge_grad_cpu(const at::Tensor& rowptr, const at::Tensor& col,
                                  const at::Tensor& x_in, const at::Tensor& grad_in,
                                  c10::string_view reduce_name) {
  constexpr const char* op = "spmm_csr_edge_grad";
  const Reduce reduce = parse_reduce(reduce_name);
  check_edge_grad(op, rowptr, col, x_in, grad_in, reduce);
  check_cpu_dtype(op, x_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor ptr = rowptr.contiguous(), idx = col.contiguous();
  at::Tensor out = at::empty({col.size(0)}, x.options());
  AT_DISPATCH_INDEX_TYPES(ptr.scalar_type(), "spmm_csr_edge_grad_cpu", [&] {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm_csr_edge_grad_cpu", [&] {
      using Acc = at::opmath_type<scalar_t>;
      const index_t* p = ptr.const_data_ptr<index_t>();
      const index_t* c = idx.const_data_ptr<index_t>();
      const scalar_t* xs = x.const_data_ptr<scalar_t>();
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      const int64_t features = x.size(1);
      at::parallel_for(0, ptr.size(0) - 1, row_grain(features), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const Acc scale = row_scale<Acc>(p[i + 1] - p[i], reduce);
          const scalar_t* g_row = g + i * features;
          for (int64_t e = p[i]; e < p[i + 1]; ++e) {
            const scalar_t* x_row = xs + static_cast<int64_t>(c[e]) * features;
            Acc dot = 0;
            for (int64_t f = 0; f < features; ++f) {
              dot += static_cast<Acc>(g_row[f]) * static_cast<Acc>(x_row[f]);
            }
            o[e] = static_cast<scalar_t>(dot * scale);
          }
        }
      });
    });
  });
  return out;
}

// Max / min backward as a gather over the transposed CSR (csc): node j
// collects the gradient of every (row, feature) whose arg edge reads it.
std::tuple<at::Tensor, at::Tensor> spmm_csr_max_backward_cpu(
    const at::Tensor& csc_ptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const c10::optional<at::Tensor>& values, const at::Tensor& x_in, const at::Tensor& arg_in,
    const at::Tensor& grad_in) {
  constexpr const char* op = "spmm_csr_max_backward";
  check_max_backward(op, csc_ptr, csc_row, csc_perm, values, x_in, arg_in, grad_in);
  check_cpu_dtype(op, x_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = x_in.contiguous(), arg = arg_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor ptr = csc_ptr.contiguous(), rows = csc_row.contiguous(),
                   perm = csc_perm.contiguous();
  const c10::optional<at::Tensor> w_in = contiguous(values);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_values = at::empty({values.has_value() ? rows.size(0) : 0}, x.options());
  AT_DISPATCH_INDEX_TYPES(ptr.scalar_type(), "spmm_csr_max_backward_cpu", [&] {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm_csr_max_backward_cpu", [&] {
      using Acc = at::opmath_type<scalar_t>;
      const index_t *p = ptr.const_data_ptr<index_t>(), *r = rows.const_data_ptr<index_t>();
      const int64_t *e_of = perm.const_data_ptr<int64_t>(), *a = arg.const_data_ptr<int64_t>();
      const scalar_t* w = w_in.has_value() ? w_in->const_data_ptr<scalar_t>() : nullptr;
      const scalar_t *xs = x.const_data_ptr<scalar_t>(), *g = grad.const_data_ptr<scalar_t>();
      scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
      scalar_t* gv = w ? grad_values.mutable_data_ptr<scalar_t>() : nullptr;
      const int64_t features = x.size(1);
      at::parallel_for(0, x.size(0), row_grain(features), [&](int64_t begin, int64_t end) {
        std::vector<Acc> acc(features);
        for (int64_t j = begin; j < end; ++j) {
          std::fill(acc.begin(), acc.end(), Acc(0));
          for (int64_t k = p[j]; k < p[j + 1]; ++k) {
            const int64_t e = e_of[k], i = r[k];
            const Acc weight = w ? static_cast<Acc>(w[e]) : Acc(1);
            Acc dv = 0;
            for (int64_t f = 0; f < features; ++f) {
              if (a[i * features + f] == e) {
                const Acc go = static_cast<Acc>(g[i * features + f]);
                acc[f] += weight * go;
                dv += static_cast<Acc>(xs[j * features + f]) * go;
              }
            }
            if (gv) gv[e] = static_cast<scalar_t>(dv);
          }
          for (int64_t f = 0; f < features; ++f) gx[j * features + f] = static_cast<scalar_t>(acc[f]);
        }
      });
    });
  });
  return {grad_x, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("spmm_csr", &spmm_csr_cpu);
  m.impl("spmm_csr_edge_grad", &spmm_csr_edge_grad_cpu);
  m.impl("spmm_csr_max_backward", &spmm_csr_max_backward_cpu);
}

}  // namespace pyattn

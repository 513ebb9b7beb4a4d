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

#include "pyattn/cpu_vector.h"
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

// The sum / mean kernel. Per output row, up to kRowVectors 64-byte vectors of
// it are accumulated in registers over the row's edges (one pass per such
// block of features), then scaled and stored once: each x row is read once,
// the output row written once. Every out[i, f] is summed over the row's edges
// in CSR order whatever the block, the thread count or the ISA clone, so
// results are reproducible (the AVX2 / AVX-512 clones fuse w * x + acc into
// one rounding; unweighted sums round identically in every clone).
constexpr int kRowVectors = 8;

// out[0, V vectors) = scale * sum_e w_e x[col[e]][0, V vectors), `x` and `out`
// already offset to the block's first feature.
template <int V, typename T, typename I>
__attribute__((always_inline)) inline void sum_block(const I* col, const T* values, const T* x,
                                                     int64_t features, int64_t first,
                                                     int64_t last, T scale, T* out) {
  constexpr int64_t lanes = cpu::kLanes<T>;
  cpu::Lanes<T> acc[V] = {};
  for (int64_t e = first; e < last; ++e) {
    const T* x_row = x + static_cast<int64_t>(col[e]) * features;
    cpu::Lanes<T> x_v[V];
    for (int v = 0; v < V; ++v) cpu::load_lanes(x_v[v], x_row + v * lanes);
    if (values) {
      const T w = values[e];
      for (int v = 0; v < V; ++v) acc[v] += w * x_v[v];
    } else {
      for (int v = 0; v < V; ++v) acc[v] += x_v[v];
    }
  }
  for (int v = 0; v < V; ++v) cpu::store_lanes(out + v * lanes, acc[v] * scale);
}

// The last features % lanes columns of a row (fewer than one vector).
template <typename T, typename I>
__attribute__((always_inline)) inline void sum_tail(const I* col, const T* values, const T* x,
                                                    int64_t features, int64_t width,
                                                    int64_t first, int64_t last, T scale,
                                                    T* out) {
  T acc[cpu::kLanes<T>] = {};
  for (int64_t e = first; e < last; ++e) {
    const T* x_row = x + static_cast<int64_t>(col[e]) * features;
    const T w = values ? values[e] : T(1);
    for (int64_t f = 0; f < width; ++f) acc[f] += w * x_row[f];
  }
  for (int64_t f = 0; f < width; ++f) out[f] = acc[f] * scale;
}

// Rows [begin, end) of a sum or mean.
template <typename T, typename I>
PYATTN_X86_CLONES void sum_rows(const I* rowptr, const I* col, const T* values, const T* x,
                                int64_t features, Reduce reduce, int64_t begin, int64_t end,
                                T* out) {
  constexpr int64_t lanes = cpu::kLanes<T>;
  const int64_t vectors = features / lanes;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t first = rowptr[i], last = rowptr[i + 1];
    const T scale = row_scale<T>(last - first, reduce);
    T* out_row = out + i * features;
    for (int64_t v0 = 0; v0 < vectors; v0 += kRowVectors) {
      const int64_t f0 = v0 * lanes;
      // (explicit cases: a lambda would not be inlined into the ISA clones)
      switch (std::min<int64_t>(kRowVectors, vectors - v0)) {
        case 1: sum_block<1>(col, values, x + f0, features, first, last, scale, out_row + f0); break;
        case 2: sum_block<2>(col, values, x + f0, features, first, last, scale, out_row + f0); break;
        case 3: sum_block<3>(col, values, x + f0, features, first, last, scale, out_row + f0); break;
        case 4: sum_block<4>(col, values, x + f0, features, first, last, scale, out_row + f0); break;
        case 5: sum_block<5>(col, values, x + f0, features, first, last, scale, out_row + f0); break;
        case 6: sum_block<6>(col, values, x + f0, features, first, last, scale, out_row + f0); break;
        case 7: sum_block<7>(col, values, x + f0, features, first, last, scale, out_row + f0); break;
        default: sum_block<8>(col, values, x + f0, features, first, last, scale, out_row + f0);
      }
    }
    const int64_t f0 = vectors * lanes;
    if (f0 < features) {
      sum_tail(col, values, x + f0, features, features - f0, first, last, scale, out_row + f0);
    }
  }
}

// Rows split into about `tasks` ranges of equal cost (edges plus one per row
// for its output), so a few high-degree rows do not leave a thread idle. The
// split changes which thread computes a row, never how.
template <typename I, typename Body>
void parallel_over_rows(const I* rowptr, int64_t rows, int64_t features, const Body& body) {
  const int64_t total = static_cast<int64_t>(rowptr[rows]) + rows;  // edges + rows
  constexpr int64_t kTaskCost = 32768;  // multiply-adds worth a task of their own
  const int64_t tasks = std::clamp<int64_t>(total * std::max<int64_t>(features, 1) / kTaskCost,
                                            1, 4 * at::get_num_threads());
  // first row of task t: the first row whose cost-so-far reaches t / tasks of the total
  const auto split = [&](int64_t t) {
    if (t >= tasks) return rows;
    const int64_t target = total * t / tasks;
    int64_t lo = 0, hi = rows;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(rowptr[mid]) + mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) { body(split(t0), split(t1)); });
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
  const int64_t rows = rowptr_t.size(0) - 1, features = x_t.size(1);
  if (!is_extremum(reduce)) {
    parallel_over_rows(rowptr, rows, features, [&](int64_t begin, int64_t end) {
      sum_rows(rowptr, col, values, x, features, reduce, begin, end, out);
    });
    return;
  }
  int64_t* arg = arg_t.mutable_data_ptr<int64_t>();
  parallel_over_rows(rowptr, rows, features, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> best_edge(features);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = rowptr[i], last = rowptr[i + 1];
      T* out_row = out + i * features;
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

// d out / d values[e] = <grad_out[row(e)], x[col[e]]> * row_scale, for the
// edges of rows [begin, end): each dot in lane-wise partial sums over whole
// vectors of F, the lanes added in order, then the last F % lanes products.
template <typename T, typename I>
PYATTN_X86_CLONES void edge_grad_rows(const I* rowptr, const I* col, const T* x, const T* grad,
                                      int64_t features, Reduce reduce, int64_t begin,
                                      int64_t end, T* out) {
  constexpr int64_t lanes = cpu::kLanes<T>;
  const int64_t whole = features / lanes * lanes;
  for (int64_t i = begin; i < end; ++i) {
    const T scale = row_scale<T>(rowptr[i + 1] - rowptr[i], reduce);
    const T* g_row = grad + i * features;
    for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
      const T* x_row = x + static_cast<int64_t>(col[e]) * features;
      cpu::Lanes<T> partial = {};
      for (int64_t f = 0; f < whole; f += lanes) {
        cpu::Lanes<T> g_v, x_v;
        cpu::load_lanes(g_v, g_row + f);
        cpu::load_lanes(x_v, x_row + f);
        partial += g_v * x_v;
      }
      T dot = 0;
      for (int64_t l = 0; l < lanes; ++l) dot += partial[l];
      for (int64_t f = whole; f < features; ++f) dot += g_row[f] * x_row[f];
      out[e] = dot * scale;
    }
  }
}

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
      const index_t* p = ptr.const_data_ptr<index_t>();
      const index_t* c = idx.const_data_ptr<index_t>();
      const scalar_t* xs = x.const_data_ptr<scalar_t>();
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      const int64_t features = x.size(1);
      parallel_over_rows(p, ptr.size(0) - 1, features, [&](int64_t begin, int64_t end) {
        edge_grad_rows(p, c, xs, g, features, reduce, begin, end, o);
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

// Stable counting sort of the edges by column: count, prefix-sum, then place
// each edge, rows in order, at its column's next free slot. Serial: O(E + rows
// + num_cols), a few milliseconds per million edges, and it checks every index
// before using it.
template <typename I>
void transpose_kernel(const I* rowptr, const I* col, int64_t rows, int64_t edges,
                      int64_t num_cols, I* csc_ptr, I* csc_row, int64_t* csc_perm) {
  std::fill(csc_ptr, csc_ptr + num_cols + 1, I(0));
  for (int64_t e = 0; e < edges; ++e) {
    const int64_t c = col[e];
    TORCH_CHECK_VALUE(c >= 0 && c < num_cols, "csr_transpose: every `col` entry must be in [0, ",
                      "num_cols = ", num_cols, "), got ", c, " at position ", e);
    ++csc_ptr[c + 1];
  }
  for (int64_t c = 0; c < num_cols; ++c) csc_ptr[c + 1] += csc_ptr[c];
  std::vector<int64_t> next(csc_ptr, csc_ptr + num_cols);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
      const int64_t k = next[col[e]]++;
      csc_row[k] = static_cast<I>(i);
      csc_perm[k] = e;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_transpose_cpu(const at::Tensor& rowptr_in,
                                                                 const at::Tensor& col_in,
                                                                 int64_t num_cols) {
  constexpr const char* op = "csr_transpose";
  TORCH_CHECK_VALUE(rowptr_in.dim() == 1 && rowptr_in.size(0) >= 1, op,
                    ": `rowptr` must be 1-D with at least one entry, got shape ",
                    rowptr_in.sizes());
  TORCH_CHECK_VALUE(col_in.dim() == 1, op, ": `col` must be 1-D, got shape ", col_in.sizes());
  TORCH_CHECK_TYPE(rowptr_in.scalar_type() == at::kLong || rowptr_in.scalar_type() == at::kInt,
                   op, ": `rowptr` must be int64 or int32, got ", rowptr_in.scalar_type());
  TORCH_CHECK_TYPE(col_in.scalar_type() == rowptr_in.scalar_type(), op,
                   ": `col` must have `rowptr`'s dtype (", rowptr_in.scalar_type(), "), got ",
                   col_in.scalar_type());
  TORCH_CHECK(col_in.device() == rowptr_in.device(), op,
              ": `col` must be on `rowptr`'s device (", rowptr_in.device(), "), got ",
              col_in.device());
  TORCH_CHECK_VALUE(num_cols >= 0, op, ": `num_cols` must be >= 0, got ", num_cols);
  const at::Tensor rowptr = rowptr_in.contiguous(), col = col_in.contiguous();
  const int64_t rows = rowptr.size(0) - 1, edges = col.size(0);
  at::Tensor csc_ptr = at::empty({num_cols + 1}, rowptr.options());
  at::Tensor csc_row = at::empty({edges}, rowptr.options());
  at::Tensor csc_perm = at::empty({edges}, rowptr.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(rowptr.scalar_type(), "csr_transpose_cpu", [&] {
    const index_t* ptr = rowptr.const_data_ptr<index_t>();
    TORCH_CHECK_VALUE(ptr[0] == 0 && ptr[rows] == edges, op, ": `rowptr` must run from 0 to ",
                      "len(col) = ", edges, ", got ", ptr[0], " to ", ptr[rows]);
    for (int64_t i = 0; i < rows; ++i) {
      TORCH_CHECK_VALUE(ptr[i] <= ptr[i + 1], op, ": `rowptr` must be non-decreasing, got ",
                        ptr[i], " then ", ptr[i + 1], " at rows ", i, ", ", i + 1);
    }
    transpose_kernel(ptr, col.const_data_ptr<index_t>(), rows, edges, num_cols,
                     csc_ptr.mutable_data_ptr<index_t>(), csc_row.mutable_data_ptr<index_t>(),
                     csc_perm.mutable_data_ptr<int64_t>());
  });
  return {csc_ptr, csc_row, csc_perm};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("csr_transpose", &csr_transpose_cpu);
  m.impl("spmm_csr", &spmm_csr_cpu);
  m.impl("spmm_csr_edge_grad", &spmm_csr_edge_grad_cpu);
  m.impl("spmm_csr_max_backward", &spmm_csr_max_backward_cpu);
}

}  // namespace pyattn

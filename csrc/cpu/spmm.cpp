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
#include <limits>
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

// The transposed CSR: a stable sort of the edges by column, done as a
// counting sort in two passes over cache-sized key ranges. A single counting
// pass places each edge at its column's next free slot, num_cols write
// streams at once: at 1e6 columns they span far more than the caches, and
// nearly every store misses. Here the first pass partitions the edges by the
// high bits of their column (buckets of 2^shift consecutive columns, about
// sqrt(num_cols) buckets up to 2^32 columns, then 2^16 columns each), the second counting-sorts each bucket by the low
// bits: each pass writes to about sqrt(num_cols) streams. Both passes keep
// the edges' order within a key, so the result is the stable sort whatever
// the thread count.
int transpose_bucket_shift(int64_t num_cols) {
  int bits = 0;  // ceil(log2(num_cols))
  while (bits < 63 && (int64_t{1} << bits) < num_cols) ++bits;
  return std::min(16, (bits + 1) / 2);
}

// Few edges (their output within kDirectSortBytes, in L2): one serial counting
// pass, which scatters within cache; the two passes' extra copies took 1.76x
// its time on Cora (10556 edges).
constexpr int64_t kDirectSortBytes = int64_t{1} << 20;

template <typename I>
void direct_transpose_kernel(const I* rowptr, const I* col, int64_t rows, int64_t edges,
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

template <typename I>
void transpose_kernel(const I* rowptr, const I* col, int64_t rows, int64_t edges,
                      int64_t num_cols, I* csc_ptr, I* csc_row, int64_t* csc_perm) {
  constexpr const char* op = "csr_transpose";
  if (edges * static_cast<int64_t>(sizeof(I) + sizeof(int64_t)) <= kDirectSortBytes) {
    direct_transpose_kernel(rowptr, col, rows, edges, num_cols, csc_ptr, csc_row, csc_perm);
    return;
  }
  const int shift = transpose_bucket_shift(num_cols);
  const int64_t width = int64_t{1} << shift, mask = width - 1;
  const int64_t buckets = num_cols > 0 ? ((num_cols - 1) >> shift) + 1 : 1;
  // Between the passes csc_perm holds (edge << shift) | (column's low bits).
  TORCH_CHECK_VALUE(edges <= (std::numeric_limits<int64_t>::max() >> shift), op,
                    ": more edges than 64-bit positions can pack (", edges, ")");

  // Pass 1 runs over chunks of whole rows with about equal numbers of edges.
  const int64_t chunks = std::clamp<int64_t>(edges / 65536, 1, at::get_num_threads());
  std::vector<int64_t> chunk_row(chunks + 1, rows);
  for (int64_t t = 0; t < chunks; ++t) {
    const int64_t target = edges * t / chunks;
    chunk_row[t] = std::lower_bound(rowptr, rowptr + rows, target,
                                    [](I p, int64_t v) { return static_cast<int64_t>(p) < v; }) - rowptr;
  }
  // Each chunk counts its edges per bucket and records its first bad column.
  std::vector<int64_t> slot(chunks * buckets, 0), bad(chunks, -1);
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* count = slot.data() + t * buckets;
      for (int64_t e = rowptr[chunk_row[t]]; e < rowptr[chunk_row[t + 1]]; ++e) {
        const int64_t c = col[e];
        if (c < 0 || c >= num_cols) { bad[t] = e; break; }
        ++count[c >> shift];
      }
    }
  });
  for (int64_t t = 0; t < chunks; ++t) {  // chunks run in edge order: the first is the earliest
    TORCH_CHECK_VALUE(bad[t] < 0, op, ": every `col` entry must be in [0, num_cols = ", num_cols,
                      "), got ", static_cast<int64_t>(col[bad[t]]), " at position ", bad[t]);
  }
  // Bucket b's edges go to [bucket_start[b], bucket_start[b + 1]), chunk by chunk.
  std::vector<int64_t> bucket_start(buckets + 1);
  int64_t placed = 0;
  for (int64_t b = 0; b < buckets; ++b) {
    bucket_start[b] = placed;
    for (int64_t t = 0; t < chunks; ++t) {
      const int64_t n = slot[t * buckets + b];
      slot[t * buckets + b] = placed;
      placed += n;
    }
  }
  bucket_start[buckets] = placed;
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* next = slot.data() + t * buckets;
      for (int64_t i = chunk_row[t]; i < chunk_row[t + 1]; ++i) {
        for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
          const int64_t c = col[e];
          const int64_t k = next[c >> shift]++;
          csc_row[k] = static_cast<I>(i);
          csc_perm[k] = (e << shift) | (c & mask);
        }
      }
    }
  });

  // Pass 2: buckets in tasks of about equal cost (edges plus columns).
  const int64_t tasks = std::clamp<int64_t>((edges + num_cols) / 65536, 1,
                                            std::min<int64_t>(buckets, 4 * at::get_num_threads()));
  const auto first_bucket = [&](int64_t task) {
    if (task >= tasks) return buckets;
    const int64_t target = (edges + num_cols) * task / tasks;
    int64_t lo = 0, hi = buckets;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (bucket_start[mid] + mid * width < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  at::parallel_for(0, tasks, 1, [&](int64_t task0, int64_t task1) {
    std::vector<int64_t> next(width), packed;
    std::vector<I> row;
    for (int64_t b = first_bucket(task0); b < first_bucket(task1); ++b) {
      const int64_t lo = bucket_start[b], n = bucket_start[b + 1] - lo;
      const int64_t c0 = b << shift, columns = std::min(width, num_cols - c0);
      packed.assign(csc_perm + lo, csc_perm + lo + n);
      row.assign(csc_row + lo, csc_row + lo + n);
      std::fill(next.begin(), next.begin() + columns, 0);
      for (int64_t k = 0; k < n; ++k) ++next[packed[k] & mask];
      int64_t at_column = lo;
      for (int64_t j = 0; j < columns; ++j) {
        csc_ptr[c0 + j] = static_cast<I>(at_column);
        const int64_t count = next[j];
        next[j] = at_column;
        at_column += count;
      }
      for (int64_t k = 0; k < n; ++k) {
        const int64_t d = next[packed[k] & mask]++;
        csc_row[d] = row[k];
        csc_perm[d] = packed[k] >> shift;
      }
    }
  });
  csc_ptr[num_cols] = static_cast<I>(edges);
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
  TORCH_CHECK_VALUE(num_cols >= 0 && num_cols < std::numeric_limits<int64_t>::max(), op,
                    ": `num_cols` must be >= 0 (and below 2^63 - 1), got ", num_cols);
  const at::Tensor rowptr = rowptr_in.contiguous(), col = col_in.contiguous();
  const int64_t rows = rowptr.size(0) - 1, edges = col.size(0);
  TORCH_CHECK_VALUE(rowptr.scalar_type() == at::kLong || rows <= std::numeric_limits<int32_t>::max(),
                    op, ": int32 indices hold at most 2^31 - 1 rows, got ", rows);
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

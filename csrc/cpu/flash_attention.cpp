// FlashAttention-style attention on the CPU (float32, float64): tiles of
// queries stream over tiles of keys and values with an online softmax, so only
// the row log-sum-exp (O(seq)) is kept for backward; the backward recomputes
// the probabilities tile by tile. No seq_q x seq_k buffer is ever allocated:
// each thread holds a few tiles of queries x keys.
//
// Every BLAS call is made by a worker planned for one thread (SequentialBlas).
// In float at head_dim 64 the tile products run pyattn/gemm_avx512.h's own
// loops instead, where the CPU has AVX-512 (own_tile_kernels).
//
// Forward: parallel over (batch, head, query tile). Backward: one pass per
// (batch, kv head) when there are enough of them, else dq over (batch, head,
// query tile) and dk / dv over (batch, kv head, key tile), looping over the
// query heads that share the kv head. Every output element has one writer and
// no atomics are used, so results are deterministic.
//
// Masked-out (query, key) pairs never touch a result: scores of masked pairs
// are overwritten, and on tiles that straddle the causal diagonal the products
// with V, K, Q or dO skip masked pairs whenever that operand holds a NaN or Inf
// (a plain GEMM would add 0 * NaN). NaN in a visible score gives a NaN row, as
// PyTorch's math attention; a row whose visible scores are all -inf gives 0.
//
// Dropout (dropout_p > 0) multiplies P by keep / (1 - dropout_p), keep drawn by
// Philox4x32-10 per (batch * heads + head, query, key) (pyattn/philox.h): the
// backward regenerates each tile's mask, so no mask is stored.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pyattn/attention_tiles.h"
#include "pyattn/cpu_math.h"
#include "pyattn/gemm_avx512.h"
#include "pyattn/philox.h"
#include "pyattn/sequential_blas.h"
#include "pyattn/tile_transpose.h"

namespace pyattn {
namespace {

// Tiles of queries x keys. Each tile is a few BLAS calls, whose packing and
// set-up 64 x 64 tiles did not amortise: the forward without a causal mask ran
// at 0.72-0.81x of SDPA's flash kernel with them, 0.87-0.98x at 128 x 256 (2
// cores, seq 256-4096, head_dim 64 / 128, same process). 128 x 512 then took
// 0.91-0.96x the time of 128 x 256 at seq 1024 / 4096 in five of six cases
// (interleaved calls; d 128 non-causal at seq 1024: 1.05x); its float scores
// tile (256 KiB) still sits in L2. The backward keeps three tiles of scratch
// per thread, so its tiles are smaller. Fixed, so results do not depend on the
// thread count.
constexpr int64_t kForwardBlockQ = 128, kForwardBlockK = 512;
constexpr int64_t kBackwardBlockQ = 128, kBackwardBlockK = 128;
// A forward of at most kDecodeRows queries (decoding against a KV cache) is two
// matrix-vector products per tile, whose BLAS calls are short: tiles of
// kDecodeBlockK keys amortise them (same-process A/B, batch 4, 8 heads, one
// query, against 256-key tiles: 6-7% faster at 1024 keys, 2-5% at 4096).
constexpr int64_t kDecodeRows = 8, kDecodeBlockK = 2048;
static_assert(kForwardBlockQ != kDecodeRows && kBackwardBlockQ != kDecodeRows,
              "a Problem's block_q tells a decode");
constexpr int64_t kMaxBlockK = std::max({kForwardBlockK, kBackwardBlockK, kDecodeBlockK});
// Backward in one pass when there are at least this many (batch, kv head)
// pairs to spread over threads. Chosen by shape alone, so results do not
// depend on the thread count.
constexpr int64_t kFusedBackwardTasks = 8;

struct Problem {
  int64_t batch, heads, kv_heads, seq_q, seq_k, dim;
  bool causal;
  double scale;
  double dropout_p;
  uint64_t seed, keep_threshold;  // dropout: kept iff the Philox draw >= keep_threshold
  int64_t block_q, block_k;  // tile of queries x keys: kForwardBlock*, kDecode* or kBackwardBlock*
  bool dropout() const { return dropout_p > 0; }
};

// A (batch, heads, seq, dim) tensor with unit stride along dim.
template <typename T>
struct Rows {
  T* data;
  int64_t batch_stride, head_stride, row_stride;
  T* at(int64_t b, int64_t h, int64_t i) const {
    return data + b * batch_stride + h * head_stride + i * row_stride;
  }
};

// BLAS takes a leading dimension of at least the row length (head_dim): rows
// that overlap (stride 0 from expand, or below head_dim from as_strided) are
// refused by it (MKL prints an error and leaves the result unwritten).
int64_t blas_row_stride(const at::Tensor& t) {
  // One row: its stride addresses nothing, and may be anything.
  return t.size(-2) <= 1 ? std::max<int64_t>(t.size(-1), 1) : t.stride(-2);
}

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return Rows<T>{const_cast<T*>(t.const_data_ptr<T>()), t.stride(0), t.stride(1),
                 blas_row_stride(t)};
}

// Unit stride along head_dim and a row stride BLAS can take (at least head_dim,
// at most an int) are all the kernels need; copy only if missing.
at::Tensor with_unit_last_stride(const at::Tensor& t) {
  const int64_t row_stride = blas_row_stride(t);
  const bool usable = t.stride(-1) == 1 && row_stride >= t.size(-1) &&
                      row_stride <= std::numeric_limits<int>::max();
  return usable ? t : t.contiguous();
}

// The problem of the forward (backward = false) or backward kernel, checked.
Problem check_inputs(const char* op, bool backward, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, bool causal, double scale, double dropout_p,
                     int64_t seed) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": `q` must be a 4-D tensor (batch, heads, seq_q, head_dim), "
                    "got ", q.dim(), "-D");
  TORCH_CHECK_VALUE(k.dim() == 4, op, ": `k` must be a 4-D tensor (batch, kv_heads, seq_k, "
                    "head_dim), got ", k.dim(), "-D");
  TORCH_CHECK_VALUE(v.dim() == 4, op, ": `v` must be a 4-D tensor (batch, kv_heads, seq_k, "
                    "head_dim), got ", v.dim(), "-D");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
                   ": `q`, `k`, `v` must have one dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
                   ": the C++ CPU kernel supports float32 and float64, got ", q.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), op,
              ": `q`, `k`, `v` must be on one device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": `k` and `v` must have the same shape, got ",
                    k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0), op, ": batch of `q` (", q.size(0),
                    ") and `k` (", k.size(0), ") differ");
  TORCH_CHECK_VALUE(q.size(3) == k.size(3), op, ": head_dim of `q` (", q.size(3),
                    ") and `k` (", k.size(3), ") differ");
  // heads = kv_heads = 0 is an empty problem (as in SDPA).
  TORCH_CHECK_VALUE(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, op,
                    ": heads of `q` (", q.size(1), ") must be a multiple of kv_heads of `k` (",
                    k.size(1), ")");
  const int64_t dim = q.size(3);
  TORCH_CHECK_VALUE(dim > 0 && dim % 8 == 0 && dim <= 256, op,
                    ": head_dim must be a multiple of 8 up to 256, got ", dim);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": `scale` must be finite, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(dropout_p) && dropout_p >= 0 && dropout_p < 1, op,
                    ": `dropout_p` must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(seed >= 0 && seed < (int64_t{1} << 62), op,
                    ": `seed` must be in [0, 2^62), got ", seed);
  const bool decode = !backward && q.size(2) <= kDecodeRows;
  return Problem{q.size(0), q.size(1),  k.size(1), q.size(2),
                 k.size(2), dim,        causal,    scale,
                 dropout_p, static_cast<uint64_t>(seed),
                 dropout_p > 0 ? dropout_threshold(dropout_p) : 0,
                 backward ? kBackwardBlockQ : (decode ? kDecodeRows : kForwardBlockQ),
                 backward ? kBackwardBlockK : (decode ? kDecodeBlockK : kForwardBlockK)};
}

// Keys [0, end) that some query of the tile [i0, i0 + rows) sees.
int64_t tile_key_end(const Problem& p, int64_t i0, int64_t rows) {
  return p.causal ? causal_key_end(i0 + rows - 1, p.seq_q, p.seq_k) : p.seq_k;
}

// Columns [0, limit) of tile row i (keys j0...) that query i sees.
int64_t row_limit(const Problem& p, int64_t i, int64_t j0, int64_t cols) {
  if (!p.causal) return cols;
  return std::clamp<int64_t>(causal_key_end(i, p.seq_q, p.seq_k) - j0, 0, cols);
}

// The first row of the query tile [i0, i0 + rows) that sees key j.
int64_t first_row_seeing(const Problem& p, int64_t i0, int64_t rows, int64_t j) {
  if (!p.causal) return 0;
  return std::clamp<int64_t>(causal_query_begin(j, p.seq_q, p.seq_k) - i0, 0, rows);
}

// Whether some query of the tile starting at row i0 misses a key of [j0, j0 + cols)
// (limits grow with the row, so the first row decides).
bool straddles_diagonal(const Problem& p, int64_t i0, int64_t j0, int64_t cols) {
  return row_limit(p, i0, j0, cols) < cols;
}

// The tile products run pyattn/gemm_avx512.h's loops where they beat BLAS:
// float at head_dim 64, on a CPU with AVX-512, and not for a decode's few rows
// (BLAS's matrix-vector products). Chosen by shape and CPU alone, so results do
// not depend on the thread count.
template <typename T>
bool own_tile_kernels(const Problem& p, bool decode) {
#if PYATTN_GEMM_AVX512
  return std::is_same_v<T, float> && p.dim == 64 && !decode && cpu::cpu_has_avx512f();
#else
  return false;
#endif
}

// C (m x n, ldc) = alpha * op(A) B + (accumulate ? C : 0) with row-major B
// (ldb); op(A) is A (m x k, lda) or, with trans_a, the transpose of A (k x m,
// lda). pyattn/gemm_avx512.h's loops when own_kernels (float only), else BLAS.
template <typename T>
void tile_gemm(bool own_kernels, bool trans_a, int64_t m, int64_t n, int64_t k, T alpha,
               const T* a, int64_t lda, const T* b, int64_t ldb, bool accumulate, T* c,
               int64_t ldc) {
#if PYATTN_GEMM_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (own_kernels) {
      cpu::avx512::gemm(trans_a, m, n, k, alpha, a, lda, b, ldb, cpu::avx512::kPanelCols,
                        accumulate, c, ldc);
      return;
    }
  }
#endif
  cpu::gemm<T>(trans_a, false, m, n, k, alpha, a, lda, b, ldb, accumulate ? T(1) : T(0), c, ldc);
}

// C (rows x dim, ldc) += alpha * A B over visible pairs: row r of A (rows x cols,
// lda p.block_k, 0 at masked pairs) meets rows [0, limit_r) of B (cols x dim).
// For P V and dS K. A plain GEMM unless B holds a NaN or Inf where A is masked.
template <typename Acc>
void gemm_visible_keys(const Problem& p, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                       Acc alpha, const Acc* a, const Acc* b, int64_t ldb, Acc* c, int64_t ldc,
                       bool own_kernels) {
  if (!straddles_diagonal(p, i0, j0, cols) || cpu::all_finite(b, cols, ldb, p.dim)) {
    tile_gemm<Acc>(own_kernels, false, rows, p.dim, cols, alpha, a, p.block_k, b, ldb, true, c,
                   ldc);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t limit = row_limit(p, i0 + r, j0, cols);
    if (limit == 0) continue;
    cpu::gemm<Acc>(false, false, 1, p.dim, limit, alpha, a + r * p.block_k, p.block_k, b, ldb,
                   Acc(1), c + r * ldc, ldc);
  }
}

// C (cols x dim, ldc) += alpha * A^T B over visible pairs: column c of A (rows x
// cols, lda p.block_k, 0 at masked pairs) meets the rows of B (rows x dim) whose
// queries see key j0 + c. For P^T dO and dS^T Q.
template <typename Acc>
void gemm_visible_queries(const Problem& p, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                          Acc alpha, const Acc* a, const Acc* b, int64_t ldb, Acc* c,
                          int64_t ldc, bool own_kernels) {
  if (!straddles_diagonal(p, i0, j0, cols) || cpu::all_finite(b, rows, ldb, p.dim)) {
    tile_gemm<Acc>(own_kernels, true, cols, p.dim, rows, alpha, a, p.block_k, b, ldb, true, c,
                   ldc);
    return;
  }
  for (int64_t col = 0; col < cols; ++col) {
    const int64_t first = first_row_seeing(p, i0, rows, j0 + col);
    if (first == rows) continue;
    cpu::gemm<Acc>(true, false, 1, p.dim, rows - first, alpha, a + first * p.block_k + col,
                   p.block_k, b + first * ldb, ldb, Acc(1), c + col * ldc, ldc);
  }
}

// keep[c] = kept if element (bh, i, j0 + c) survives dropout, else 0, for c < n.
// j0 is a multiple of 4 (tiles are a multiple of 4 keys wide), so the row is whole Philox
// blocks of 4 draws; the loop over blocks is branch-free and vectorises.
static_assert(kForwardBlockK % 4 == 0 && kBackwardBlockK % 4 == 0 && kDecodeBlockK % 4 == 0,
              "dropout draws come in blocks of 4 keys");
template <typename Acc>
PYATTN_X86_CLONES void dropout_row(const Problem& p, int64_t bh, int64_t i, int64_t j0, int64_t n,
                                   Acc kept, Acc* keep) {
  uint32_t draws[kMaxBlockK];
  const int64_t blocks = (n + 3) / 4;
#pragma omp simd
  for (int64_t block = 0; block < blocks; ++block) {
    const Philox4x32 x = dropout_draws(p.seed, bh, i, j0 / 4 + block);
    for (int w = 0; w < 4; ++w) draws[4 * block + w] = x.word[w];
  }
  for (int64_t c = 0; c < n; ++c) keep[c] = draws[c] >= p.keep_threshold ? kept : Acc(0);
}

// K or V of every (batch, kv head) transposed key tile by key tile, for the
// backward: the tile [j0, j0 + block_k) of (b, kvh) is a dim x block_k block
// (row stride block_k) at key_tile(tiles, p, b, kvh, j0). With them S = Q K^T
// and dP = dO V^T are products of row-major operands, which MKL's sgemm ran
// 1.4-2.1x as fast as the same products against K and V themselves (128 x 128
// tiles, head_dim 64 / 128, one thread). Done once before the passes (the
// two-pass schedule's dq pass would otherwise transpose every key tile again
// for each query tile); as much memory as K with seq_k rounded up to a
// multiple of block_k. (The forward transposes K only for its own loops,
// transpose_key_panels; with BLAS it keeps MKL's transposed-operand product:
// there a transposed K took as long as MKL's own packing it replaced, 0.94-1.04x
// the time at seq 1024 / 2048.)
template <typename T>
at::Tensor transposed_key_tiles(const at::Tensor& x_t, const Problem& p) {
  const Rows<T> x = rows_of<T>(x_t);
  const int64_t k_tiles = (p.seq_k + p.block_k - 1) / p.block_k, tile_size = p.dim * p.block_k;
  at::Tensor tiles = at::empty({p.batch * p.kv_heads * k_tiles * tile_size}, x_t.options());
  T* data = tiles.mutable_data_ptr<T>();
  at::parallel_for(0, p.batch * p.kv_heads * k_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bkv = task / k_tiles, j0 = task % k_tiles * p.block_k;
      cpu::transpose_rows(x.at(bkv / p.kv_heads, bkv % p.kv_heads, j0), x.row_stride,
                          std::min(p.block_k, p.seq_k - j0), p.dim, data + task * tile_size,
                          p.block_k);
    }
  });
  return tiles;
}

template <typename T>
const T* key_tile(const at::Tensor& tiles, const Problem& p, int64_t b, int64_t kvh, int64_t j0) {
  const int64_t k_tiles = (p.seq_k + p.block_k - 1) / p.block_k;
  return tiles.const_data_ptr<T>() + ((b * p.kv_heads + kvh) * k_tiles + j0 / p.block_k) *
                                         p.dim * p.block_k;
}

// K of one (batch, kv head) transposed into panels of kKeyPanel keys (dim x
// kKeyPanel each, the one of keys [j, j + kKeyPanel) at j * dim): the B operand
// of the forward's own Q K^T (pyattn/gemm_avx512.h), transposed once per worker
// and kv head instead of BLAS packing K for every query tile. A worker's tasks
// run head by head, and it keeps one head's panels: threads x seq_k x dim floats
// in all, not a copy of K.
constexpr int64_t kKeyPanel = 64;
#if PYATTN_GEMM_AVX512
static_assert(kKeyPanel == cpu::avx512::kPanelCols, "K's panels are the loops' panels");
#endif

template <typename T>
void transpose_key_panels(const Rows<T>& k, const Problem& p, int64_t b, int64_t kvh, T* panels) {
  for (int64_t j = 0; j < p.seq_k; j += kKeyPanel) {
    cpu::transpose_rows(k.at(b, kvh, j), k.row_stride, std::min(kKeyPanel, p.seq_k - j), p.dim,
                        panels + j * p.dim, kKeyPanel);
  }
}

// scores (rows x cols, row stride p.block_k) = scale * Q K^T for the query tile
// at q_rows and the keys [j0, j0 + cols) of (b, kvh): own loops against the
// head's K panels (key_panels), else BLAS against K.
template <typename T>
void forward_scores(const Problem& p, bool own_kernels, int64_t rows, int64_t cols, T scale,
                    const T* q_rows, int64_t q_stride, const Rows<T>& k, const T* key_panels,
                    int64_t b, int64_t kvh, int64_t j0, T* scores) {
#if PYATTN_GEMM_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (own_kernels) {
      cpu::avx512::gemm(false, rows, cols, p.dim, scale, q_rows, q_stride, key_panels + j0 * p.dim,
                        kKeyPanel, p.dim * kKeyPanel, false, scores, p.block_k);
      return;
    }
  }
#endif
  cpu::gemm<T>(false, true, rows, cols, p.dim, scale, q_rows, q_stride, k.at(b, kvh, j0),
               k.row_stride, T(0), scores, p.block_k);
}

template <typename T>
void forward_kernel(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t,
                    const at::Tensor& out_t, const at::Tensor& lse_t, const Problem& p) {
  using Acc = at::opmath_type<T>;
  const Rows<T> q = rows_of<T>(q_t), k = rows_of<T>(k_t), v = rows_of<T>(v_t);
  const Rows<T> out = rows_of<T>(out_t);
  Acc* lse = lse_t.mutable_data_ptr<Acc>();
  const int64_t d = p.dim, group = p.heads / p.kv_heads;
  const int64_t q_tiles = (p.seq_q + p.block_q - 1) / p.block_q;
  const Acc scale = static_cast<Acc>(p.scale);
  const Acc keep_scale = Acc(1) / static_cast<Acc>(1 - p.dropout_p);
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  const bool own_kernels = own_tile_kernels<T>(p, p.block_q == kDecodeRows);
  const int64_t panel_keys = (p.seq_k + kKeyPanel - 1) / kKeyPanel * kKeyPanel;
  at::parallel_for(0, p.batch * p.heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    std::vector<Acc> scores(p.block_q * p.block_k), acc(p.block_q * d), row_max(p.block_q),
        row_sum(p.block_q), keep(p.dropout() ? p.block_k : 0),
        key_panels(own_kernels ? panel_keys * d : 0);
    int64_t panels_of = -1;  // the (batch, kv head) whose K key_panels holds
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % q_tiles, bh = task / q_tiles;
      const int64_t b = bh / p.heads, h = bh % p.heads, kvh = h / group;
      if (own_kernels && b * p.kv_heads + kvh != panels_of) {
        transpose_key_panels<T>(k, p, b, kvh, key_panels.data());
        panels_of = b * p.kv_heads + kvh;
      }
      const int64_t i0 = tile * p.block_q, rows = std::min(p.block_q, p.seq_q - i0);
      std::fill(acc.begin(), acc.end(), Acc(0));
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), Acc(0));
      const int64_t key_end = tile_key_end(p, i0, rows);
      for (int64_t j0 = 0; j0 < key_end; j0 += p.block_k) {
        const int64_t cols = std::min(p.block_k, key_end - j0);
        forward_scores<T>(p, own_kernels, rows, cols, scale, q.at(b, h, i0), q.row_stride, k,
                          key_panels.data(), b, kvh, j0, scores.data());
        for (int64_t r = 0; r < rows; ++r) {
          Acc* s = scores.data() + r * p.block_k;
          const int64_t limit = row_limit(p, i0 + r, j0, cols);
          // The max skips NaN; exp(NaN - max) then carries it into the sum.
          const Acc new_max = std::max(row_max[r], cpu::row_max(s, limit));
          if (new_max == kNegInf) {  // all -inf or NaN so far: never exp(-inf + inf)
            if (cpu::has_nan(s, limit)) {
              row_sum[r] = std::numeric_limits<Acc>::quiet_NaN();
            }
            std::fill(s, s + cols, Acc(0));
            continue;
          }
          const Acc sum = cpu::exp_shifted_sum(s, limit, new_max);
          std::fill(s + limit, s + cols, Acc(0));
          if (p.dropout()) {  // the sum (and lse) stay those of the undropped P
            dropout_row<Acc>(p, b * p.heads + h, i0 + r, j0, limit, Acc(1), keep.data());
            for (int64_t c = 0; c < limit; ++c) s[c] *= keep[c];
          }
          const Acc alpha = cpu::exp_of(row_max[r] - new_max);  // 0 when row_max is -inf
          row_sum[r] = row_sum[r] * alpha + sum;
          row_max[r] = new_max;
          if (alpha != Acc(1)) {
            for (int64_t c = 0; c < d; ++c) acc[r * d + c] *= alpha;
          }
        }
        gemm_visible_keys<Acc>(p, i0, rows, j0, cols, Acc(1), scores.data(), v.at(b, kvh, j0),
                               v.row_stride, acc.data(), d, own_kernels);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* o = out.at(b, h, i0 + r);
        Acc* l = lse + (b * p.heads + h) * p.seq_q + i0 + r;
        if (row_sum[r] == Acc(0)) {  // no visible key, or all scores -inf: output 0, lse -inf
          std::fill(o, o + d, T(0));
          *l = kNegInf;
          continue;
        }
        const Acc inv = keep_scale / row_sum[r];
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<T>(acc[r * d + c] * inv);
        *l = row_max[r] + std::log(row_sum[r]);
      }
    }
  });
}

// P = exp(S - lse) and dS = P * (dP - delta) for one tile, in place:
// `s` holds scale * Q K^T on entry and dS on exit, `p` receives P, `dp` holds dO V^T.
// With dropout, Z = keep / (1 - p): `prob` receives P * Z and dS = P * (dP * Z - delta)
// (delta = rowsum(dO * O) is still rowsum(P * dP * Z)).
template <typename Acc>
void softmax_grad_tile(const Problem& p, int64_t bh, int64_t i0, int64_t rows, int64_t j0,
                       int64_t cols, const Acc* lse, const Acc* delta, Acc* s, Acc* prob,
                       const Acc* dp, Acc* keep) {
  const Acc keep_scale = Acc(1) / static_cast<Acc>(1 - p.dropout_p);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t limit = std::isinf(lse[r]) ? 0 : row_limit(p, i0 + r, j0, cols);
    Acc* sr = s + r * p.block_k;
    Acc* pr = prob + r * p.block_k;
    const Acc* dpr = dp + r * p.block_k;
    if (p.dropout()) {
      dropout_row<Acc>(p, bh, i0 + r, j0, limit, keep_scale, keep);
      cpu::softmax_dropout_grad_row(sr, pr, dpr, keep, limit, lse[r], delta[r]);
    } else {
      cpu::softmax_grad_row(sr, pr, dpr, limit, lse[r], delta[r]);
    }
    std::fill(pr + limit, pr + cols, Acc(0));
    std::fill(sr + limit, sr + cols, Acc(0));
  }
}

// One thread's tiles in the backward.
template <typename Acc>
struct TileScratch {
  explicit TileScratch(const Problem& p)
      : s(p.block_q * p.block_k), prob(p.block_q * p.block_k), dp(p.block_q * p.block_k),
        keep(p.block_k) {}
  std::vector<Acc> s, prob, dp, keep;
};

template <typename T>
void backward_kernel(const at::Tensor& grad_t, const at::Tensor& q_t, const at::Tensor& k_t,
                     const at::Tensor& v_t, const at::Tensor& out_t, const at::Tensor& lse_t,
                     const at::Tensor& dq_t, const at::Tensor& dk_t, const at::Tensor& dv_t,
                     const Problem& p) {
  using Acc = at::opmath_type<T>;
  static_assert(std::is_same_v<Acc, T>, "the CPU kernels accumulate in their own dtype");
  const Rows<T> q = rows_of<T>(q_t), k = rows_of<T>(k_t);
  const Rows<T> go = rows_of<T>(grad_t), out = rows_of<T>(out_t);
  const Rows<T> dq = rows_of<T>(dq_t), dk = rows_of<T>(dk_t), dv = rows_of<T>(dv_t);
  const Acc* lse = lse_t.const_data_ptr<Acc>();
  const int64_t d = p.dim, group = p.heads / p.kv_heads;
  const Acc scale = static_cast<Acc>(p.scale);

  // delta_i = rowsum(dO_i * O_i), the softmax-gradient correction (O(seq) memory),
  // summed in double: dS = P (dP - delta) cancels, so delta's rounding would
  // add to dP's (O(seq * dim) work, not measurable next to the GEMMs).
  std::vector<Acc> delta(p.batch * p.heads * p.seq_q);
  at::parallel_for(0, p.batch * p.heads * p.seq_q, 256, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      const int64_t i = x % p.seq_q, bh = x / p.seq_q;
      const T* o = out.at(bh / p.heads, bh % p.heads, i);
      const T* g = go.at(bh / p.heads, bh % p.heads, i);
      double sum = 0;
      for (int64_t c = 0; c < d; ++c) sum += static_cast<double>(o[c]) * static_cast<double>(g[c]);
      delta[x] = static_cast<Acc>(sum);
    }
  });
  auto row_stats = [&](int64_t b, int64_t h, int64_t i0) {
    const int64_t offset = (b * p.heads + h) * p.seq_q + i0;
    return std::make_pair(lse + offset, delta.data() + offset);
  };

  const bool own_kernels = own_tile_kernels<T>(p, false);
  // K and V transposed, for S = Q K^T and dP = dO V^T.
  const at::Tensor kt = transposed_key_tiles<T>(k_t, p), vt = transposed_key_tiles<T>(v_t, p);
  // P and dS of one (query tile, key tile) pair: t.s <- dS, t.prob <- P, t.dp
  // and t.keep scratch.
  auto tile_grads = [&](int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                        TileScratch<Acc>& t) {
    const auto [tile_lse, tile_delta] = row_stats(b, h, i0);
    const int64_t kvh = h / group;
    tile_gemm<Acc>(own_kernels, false, rows, cols, d, scale, q.at(b, h, i0), q.row_stride,
                   key_tile<T>(kt, p, b, kvh, j0), p.block_k, false, t.s.data(), p.block_k);
    tile_gemm<Acc>(own_kernels, false, rows, cols, d, Acc(1), go.at(b, h, i0), go.row_stride,
                   key_tile<T>(vt, p, b, kvh, j0), p.block_k, false, t.dp.data(), p.block_k);
    softmax_grad_tile<Acc>(p, b * p.heads + h, i0, rows, j0, cols, tile_lse, tile_delta,
                           t.s.data(), t.prob.data(), t.dp.data(), t.keep.data());
  };
  auto zero_rows = [d](T* rows, int64_t count, int64_t stride) {
    for (int64_t r = 0; r < count; ++r) std::fill(rows + r * stride, rows + r * stride + d, T(0));
  };
  // dV += P^T dO, dK += scale * dS^T Q for one tile pair.
  auto add_dk_dv = [&](int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                       const Acc* ds, const Acc* prob, T* dk_rows, T* dv_rows) {
    gemm_visible_queries<Acc>(p, i0, rows, j0, cols, Acc(1), prob, go.at(b, h, i0),
                              go.row_stride, dv_rows, dv.row_stride, own_kernels);
    gemm_visible_queries<Acc>(p, i0, rows, j0, cols, scale, ds, q.at(b, h, i0), q.row_stride,
                              dk_rows, dk.row_stride, own_kernels);
  };
  // dQ += scale * dS K for one tile pair.
  auto add_dq = [&](int64_t b, int64_t h, int64_t kvh, int64_t i0, int64_t rows, int64_t j0,
                    int64_t cols, const Acc* ds) {
    gemm_visible_keys<Acc>(p, i0, rows, j0, cols, scale, ds, k.at(b, kvh, j0), k.row_stride,
                           dq.at(b, h, i0), dq.row_stride, own_kernels);
  };
  const int64_t q_tiles = (p.seq_q + p.block_q - 1) / p.block_q;
  const int64_t k_tiles = (p.seq_k + p.block_k - 1) / p.block_k;
  auto first_query_tile = [&](int64_t j0) {
    return p.causal ? causal_query_begin(j0, p.seq_q, p.seq_k) / p.block_q * p.block_q : 0;
  };

  if (p.batch * p.kv_heads >= kFusedBackwardTasks) {
    // One pass, 5 GEMMs per tile pair: each task owns a (batch, kv head) and so
    // every dq, dk, dv row of it (dq of a head depends only on its kv head).
    at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
      const cpu::SequentialBlas sequential_blas;
      TileScratch<Acc> t(p);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / p.kv_heads, kvh = task % p.kv_heads;
        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          zero_rows(dq.at(b, h, 0), p.seq_q, dq.row_stride);
        }
        zero_rows(dk.at(b, kvh, 0), p.seq_k, dk.row_stride);
        zero_rows(dv.at(b, kvh, 0), p.seq_k, dv.row_stride);
        for (int64_t j0 = 0; j0 < p.seq_k; j0 += p.block_k) {
          const int64_t cols = std::min(p.block_k, p.seq_k - j0);
          for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
            for (int64_t i0 = first_query_tile(j0); i0 < p.seq_q; i0 += p.block_q) {
              const int64_t rows = std::min(p.block_q, p.seq_q - i0);
              tile_grads(b, h, i0, rows, j0, cols, t);
              add_dk_dv(b, h, i0, rows, j0, cols, t.s.data(), t.prob.data(), dk.at(b, kvh, j0),
                        dv.at(b, kvh, j0));
              add_dq(b, h, kvh, i0, rows, j0, cols, t.s.data());
            }
          }
        }
      }
    });
    return;
  }

  // Few (batch, kv head) pairs: two passes with finer tasks, 7 GEMMs per tile pair.
  // dq: one task per (batch, head, query tile), streaming over key tiles.
  at::parallel_for(0, p.batch * p.heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    TileScratch<Acc> t(p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % q_tiles, bh = task / q_tiles;
      const int64_t b = bh / p.heads, h = bh % p.heads, kvh = h / group;
      const int64_t i0 = tile * p.block_q, rows = std::min(p.block_q, p.seq_q - i0);
      zero_rows(dq.at(b, h, i0), rows, dq.row_stride);
      const int64_t key_end = tile_key_end(p, i0, rows);
      for (int64_t j0 = 0; j0 < key_end; j0 += p.block_k) {
        const int64_t cols = std::min(p.block_k, key_end - j0);
        tile_grads(b, h, i0, rows, j0, cols, t);
        add_dq(b, h, kvh, i0, rows, j0, cols, t.s.data());
      }
    }
  });
  // dk, dv: one task per (batch, kv head, key tile), over the query heads of
  // its group and the query tiles that see the key tile.
  at::parallel_for(0, p.batch * p.kv_heads * k_tiles, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    TileScratch<Acc> t(p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % k_tiles, bkv = task / k_tiles;
      const int64_t b = bkv / p.kv_heads, kvh = bkv % p.kv_heads;
      const int64_t j0 = tile * p.block_k, cols = std::min(p.block_k, p.seq_k - j0);
      zero_rows(dk.at(b, kvh, j0), cols, dk.row_stride);
      zero_rows(dv.at(b, kvh, j0), cols, dv.row_stride);
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (int64_t i0 = first_query_tile(j0); i0 < p.seq_q; i0 += p.block_q) {
          const int64_t rows = std::min(p.block_q, p.seq_q - i0);
          tile_grads(b, h, i0, rows, j0, cols, t);
          add_dk_dv(b, h, i0, rows, j0, cols, t.s.data(), t.prob.data(), dk.at(b, kvh, j0),
                    dv.at(b, kvh, j0));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cpu(const at::Tensor& q_in,
                                                               const at::Tensor& k_in,
                                                               const at::Tensor& v_in,
                                                               bool causal, double scale,
                                                               double dropout_p, int64_t seed) {
  const Problem p = check_inputs("flash_attention_forward", false, q_in, k_in, v_in, causal, scale,
                                 dropout_p, seed);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in),
                   v = with_unit_last_stride(v_in);
  at::Tensor out = at::empty({p.batch, p.heads, p.seq_q, p.dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.seq_q},
                             q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};  // empty (and no kv group to divide by)
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_attention_forward_cpu", [&] {
    forward_kernel<scalar_t>(q, k, v, out, lse, p);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, bool causal,
    double scale, double dropout_p, int64_t seed) {
  constexpr const char* op = "flash_attention_backward";
  const Problem p = check_inputs(op, true, q_in, k_in, v_in, causal, scale, dropout_p, seed);
  TORCH_CHECK_VALUE(grad_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), op,
                    ": `grad_out` and `out` must have the shape of `q` ", q_in.sizes(),
                    ", got ", grad_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK_TYPE(grad_in.scalar_type() == q_in.scalar_type() &&
                       out_in.scalar_type() == q_in.scalar_type(),
                   op, ": `grad_out` and `out` must have dtype ", q_in.scalar_type());
  const at::ScalarType lse_type = at::toOpMathType(q_in.scalar_type());
  TORCH_CHECK_VALUE(lse_in.dim() == 3 && lse_in.size(0) == p.batch && lse_in.size(1) == p.heads &&
                        lse_in.size(2) == p.seq_q && lse_in.scalar_type() == lse_type,
                    op, ": `lse` must be a ", lse_type, " tensor of shape (", p.batch, ", ",
                    p.heads, ", ", p.seq_q, ")");
  TORCH_CHECK(grad_in.device() == q_in.device() && out_in.device() == q_in.device() &&
                  lse_in.device() == q_in.device(),
              op, ": all tensors must be on ", q_in.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in),
                   v = with_unit_last_stride(v_in), grad = with_unit_last_stride(grad_in),
                   out = with_unit_last_stride(out_in), lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (p.batch * p.heads == 0) return {dq, dk, dv};  // empty (and no kv group to divide by)
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad, q, k, v, out, lse, dq, dk, dv, p);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyattn, CPU, m) {
  m.impl("flash_attention_forward", &flash_attention_forward_cpu);
  m.impl("flash_attention_backward", &flash_attention_backward_cpu);
}

}  // namespace pyattn

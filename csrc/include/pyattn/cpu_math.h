#pragma once
// Small CPU helpers for the attention kernels: a row-major GEMM on the BLAS
// that libtorch_cpu exports (MKL on x86-64 wheels; ATen's own C++ gemm wrappers
// are not exported to extensions) and an exp that compilers vectorise.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "pyattn/cpu_vector.h"
#include "pyattn/softmax_avx512.h"

extern "C" {
// Fortran BLAS, LP64 (32-bit int) interface, column-major.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}

namespace pyattn::cpu {

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const float* alpha, const float* a, const int* lda, const float* b,
                      const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b,
                      const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C (m x n, ldc) = alpha * op(A) op(B) + beta * C, op(A) m x k, op(B) k x n.
// BLAS is column-major: C^T = op(B)^T op(A)^T, and a row-major buffer is the
// transpose of the column-major one. Sizes and leading dimensions must fit an
// int (the callers check strides; tiles are small).
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int mm = static_cast<int>(n), nn = static_cast<int>(m), kk = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  blas_gemm(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

// exp(x) for float within 2.74 ulp on [-87, 88] where the multiply-adds fuse
// (the AVX-512 clone; 3.02 ulp in the clones without FMA; every float checked
// against double exp), 0 below: range reduction x = n ln2 + r, |r| <= ln2 / 2, and a
// degree-6 polynomial, written without calls or branches so that loops over it
// vectorise.
inline float exp_approx(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (clamped * 1.44269504088896341f + shifter) - shifter;
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : (x != x ? x : p * scale);  // NaN stays NaN
}

inline float exp_of(float x) { return exp_approx(x); }
inline double exp_of(double x) { return std::exp(x); }

// Row loops of the softmax, built for AVX-512, AVX2 and baseline x86-64 and
// picked at load time (PYATTN_X86_CLONES, pyattn/cpu_vector.h); the two float
// loops with an exp and the float max run pyattn/softmax_avx512.h's intrinsics
// where AVX-512F is.

// max(s[0..n)), -inf for n = 0.
template <typename T>
PYATTN_X86_CLONES inline T row_max_portable(const T* s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = s[c] > m ? s[c] : m;
  return m;
}

inline float row_max(const float* s, int64_t n) {
#if PYATTN_SOFTMAX_AVX512
  if (cpu_has_avx512f()) return avx512::row_max(s, n);
#endif
  return row_max_portable(s, n);
}

inline double row_max(const double* s, int64_t n) { return row_max_portable(s, n); }

// s[c] = exp(s[c] - shift) for c < n; returns the sum.
PYATTN_X86_CLONES inline float exp_shifted_sum_portable(float* s, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    s[c] = exp_approx(s[c] - shift);
    sum += s[c];
  }
  return sum;
}

inline float exp_shifted_sum(float* s, int64_t n, float shift) {
#if PYATTN_SOFTMAX_AVX512
  if (cpu_has_avx512f()) return avx512::exp_shifted_sum(s, n, shift);
#endif
  return exp_shifted_sum_portable(s, n, shift);
}

inline double exp_shifted_sum(double* s, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    s[c] = std::exp(s[c] - shift);
    sum += s[c];
  }
  return sum;
}

// Whether all of rows x cols values (row stride ld) are finite: x * 0 is 0
// for finite x and NaN for NaN and +-Inf, so one branch-free sum decides.
template <typename T>
PYATTN_X86_CLONES inline bool all_finite(const T* a, int64_t rows, int64_t ld, int64_t cols) {
  T sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = a + r * ld;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) sum += row[c] * T(0);
  }
  return sum == T(0);
}

template <typename T>
inline bool has_nan(const T* s, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    if (s[c] != s[c]) return true;
  }
  return false;
}

// p[c] = exp(s[c] - lse); s[c] = p[c] * (dp[c] - delta) for c < n.
PYATTN_X86_CLONES inline void softmax_grad_row_portable(float* s, float* p, const float* dp,
                                                        int64_t n, float lse, float delta) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    p[c] = exp_approx(s[c] - lse);
    s[c] = p[c] * (dp[c] - delta);
  }
}

inline void softmax_grad_row(float* s, float* p, const float* dp, int64_t n, float lse,
                             float delta) {
#if PYATTN_SOFTMAX_AVX512
  if (cpu_has_avx512f()) return avx512::softmax_grad_row(s, p, dp, n, lse, delta);
#endif
  softmax_grad_row_portable(s, p, dp, n, lse, delta);
}

inline void softmax_grad_row(double* s, double* p, const double* dp, int64_t n, double lse,
                             double delta) {
  for (int64_t c = 0; c < n; ++c) {
    p[c] = std::exp(s[c] - lse);
    s[c] = p[c] * (dp[c] - delta);
  }
}

// With dropout scale z (keep / (1 - p)): p[c] = exp(s[c] - lse) * z[c] and
// s[c] = exp(s[c] - lse) * (dp[c] * z[c] - delta) for c < n.
template <typename T>
PYATTN_X86_CLONES inline void softmax_dropout_grad_row(T* s, T* p, const T* dp, const T* z,
                                                       int64_t n, T lse, T delta) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const T prob = exp_of(s[c] - lse);
    s[c] = prob * (dp[c] * z[c] - delta);
    p[c] = prob * z[c];
  }
}

}  // namespace pyattn::cpu

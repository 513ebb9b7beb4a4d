#pragma once
// The attention softmax's float row loops in AVX-512 intrinsics, for CPUs that
// have it (cpu_math.h picks them at run time; the portable loops stay for the
// rest). Why: GCC compiles exp_approx's clamps and NaN select to mask
// compares, blends and zero-masked FMAs, 30 instructions a vector, and runs a
// row one vector at a time, each vector's 60-cycle dependency chain waiting in
// a scheduler that holds three of them. perf put that exp at 17% of the
// forward at seq 1024, head_dim 64. Here one vector is 18 instructions (max
// and min clamp without masks and keep NaN), and four vectors go through each
// step together.
//
// exp here is exp_approx's reduction and polynomial with fused multiply-adds
// (so the 2.74 ulp bound on [-87, 88] of exp_approx's AVX-512 clone), with 2^n made from the rounding sum's bits instead of a
// float-to-int conversion; it is 0 at and below -87.7 (exp_approx: below -87).
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>
#include <initializer_list>

#define PYATTN_SOFTMAX_AVX512 1

// GCC 12's intrinsics pass `_mm512_undefined_ps()` (a self-initialised
// variable) as the unused merge source, and -Wall then reports it as used
// uninitialised wherever they inline (GCC bug 105593, fixed in GCC 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pyattn::cpu::avx512 {

#define PYATTN_AVX512_INLINE __attribute__((target("avx512f"), always_inline)) inline

// exp of K vectors, step by step across them (their chains overlap).
template <int K>
PYATTN_AVX512_INLINE void exp_vectors(__m512 (&x)[K]) {
  const __m512 lo = _mm512_set1_ps(-88.0f), hi = _mm512_set1_ps(88.0f);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 shifter = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds
  const __m512 ln2_hi = _mm512_set1_ps(0.693145751953125f);
  const __m512 ln2_lo = _mm512_set1_ps(1.428606765330187e-06f);
  // The rounding sum's bits are those of 1.5 * 2^23 plus n; biased exponent n + 127.
  const __m512i bias = _mm512_set1_epi32(127 - 0x4B400000);
  __m512 t[K], r[K], p[K];
  for (int u = 0; u < K; ++u) {
    // max / min return their second operand when either is NaN: NaN passes.
    x[u] = _mm512_min_ps(hi, _mm512_max_ps(lo, x[u]));
    t[u] = _mm512_fmadd_ps(x[u], log2e, shifter);
  }
  for (int u = 0; u < K; ++u) {
    const __m512 n = _mm512_sub_ps(t[u], shifter);
    r[u] = _mm512_fnmadd_ps(n, ln2_lo, _mm512_fnmadd_ps(n, ln2_hi, x[u]));
    p[u] = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 720.0f), r[u], _mm512_set1_ps(1.0f / 120.0f));
  }
  for (const float c : {1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    for (int u = 0; u < K; ++u) p[u] = _mm512_fmadd_ps(p[u], r[u], _mm512_set1_ps(c));
  }
  for (int u = 0; u < K; ++u) {
    // n = -127 (x <= -87.7, -88 after the clamp) gives biased exponent 0: the result is +0.
    const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t[u]), bias), 23);
    x[u] = _mm512_mul_ps(p[u], _mm512_castsi512_ps(scale));
  }
}

// The first `n` (< 16) lanes.
PYATTN_AVX512_INLINE __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1);
}

// max(s[0..n)), -inf for n = 0; NaN is skipped. Four vectors of partial
// maxima, reduced in a tree at the end (a row of 256 spent more time in GCC's
// lane-by-lane reduction of the portable loop than in its vector loop).
__attribute__((target("avx512f"))) inline float row_max(const float* s, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
  __m512 part[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
  // max returns its second operand when either is NaN: the partial maximum stays.
  int64_t c = 0;
  for (; c + 64 <= n; c += 64) {
    for (int u = 0; u < 4; ++u) part[u] = _mm512_max_ps(_mm512_loadu_ps(s + c + 16 * u), part[u]);
  }
  for (; c < n; c += 16) {
    const __mmask16 lanes = n - c >= 16 ? __mmask16(0xFFFF) : first_lanes(n - c);
    part[0] = _mm512_max_ps(_mm512_mask_loadu_ps(neg_inf, lanes, s + c), part[0]);
  }
  return _mm512_reduce_max_ps(
      _mm512_max_ps(_mm512_max_ps(part[0], part[1]), _mm512_max_ps(part[2], part[3])));
}

// s[c] = exp(s[c] - shift) for c < n; returns the sum.
__attribute__((target("avx512f"))) inline float exp_shifted_sum(float* s, int64_t n,
                                                                 float shift) {
  const __m512 vshift = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 64 <= n; c += 64) {
    __m512 x[4];
    for (int u = 0; u < 4; ++u) x[u] = _mm512_sub_ps(_mm512_loadu_ps(s + c + 16 * u), vshift);
    exp_vectors<4>(x);
    for (int u = 0; u < 4; ++u) {
      _mm512_storeu_ps(s + c + 16 * u, x[u]);
      sum = _mm512_add_ps(sum, x[u]);
    }
  }
  for (; c < n; c += 16) {
    const __mmask16 lanes = n - c >= 16 ? __mmask16(0xFFFF) : first_lanes(n - c);
    __m512 x[1] = {_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + c), vshift)};
    exp_vectors<1>(x);
    _mm512_mask_storeu_ps(s + c, lanes, x[0]);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(lanes, x[0]));
  }
  return _mm512_reduce_add_ps(sum);
}

// p[c] = exp(s[c] - lse); s[c] = p[c] * (dp[c] - delta) for c < n.
__attribute__((target("avx512f"))) inline void softmax_grad_row(float* s, float* p,
                                                                 const float* dp, int64_t n,
                                                                 float lse, float delta) {
  const __m512 vlse = _mm512_set1_ps(lse), vdelta = _mm512_set1_ps(delta);
  int64_t c = 0;
  for (; c + 64 <= n; c += 64) {
    __m512 x[4];
    for (int u = 0; u < 4; ++u) x[u] = _mm512_sub_ps(_mm512_loadu_ps(s + c + 16 * u), vlse);
    exp_vectors<4>(x);
    for (int u = 0; u < 4; ++u) {
      _mm512_storeu_ps(p + c + 16 * u, x[u]);
      const __m512 g = _mm512_sub_ps(_mm512_loadu_ps(dp + c + 16 * u), vdelta);
      _mm512_storeu_ps(s + c + 16 * u, _mm512_mul_ps(x[u], g));
    }
  }
  for (; c < n; c += 16) {
    const __mmask16 lanes = n - c >= 16 ? __mmask16(0xFFFF) : first_lanes(n - c);
    __m512 x[1] = {_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + c), vlse)};
    exp_vectors<1>(x);
    _mm512_mask_storeu_ps(p + c, lanes, x[0]);
    const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, dp + c), vdelta);
    _mm512_mask_storeu_ps(s + c, lanes, _mm512_mul_ps(x[0], g));
  }
}

#undef PYATTN_AVX512_INLINE

}  // namespace pyattn::cpu::avx512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#else
#define PYATTN_SOFTMAX_AVX512 0
#endif

#pragma once
// CPU vector helpers shared by the hand-blocked kernels: 64-byte GCC vector
// types (one zmm under AVX-512, two ymm under AVX2, four xmm otherwise) and the
// attribute that compiles a kernel once per x86-64 ISA level, the clone for the
// running CPU being picked at load time (the build targets baseline x86-64).
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYATTN_X86_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYATTN_X86_CLONES
#endif

namespace pyattn::cpu {

// Whether the running CPU has AVX-512F (for kernels written in its intrinsics).
inline bool cpu_has_avx512f() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

template <typename T>
struct LaneVector;
template <>
struct LaneVector<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct LaneVector<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using Lanes = typename LaneVector<T>::type;

template <typename T>
constexpr int64_t kLanes = sizeof(Lanes<T>) / sizeof(T);

// Lane indices of the same count and width, for GCC's __builtin_shuffle
// (PYATTN_VECTOR_SHUFFLE: 0 where it is missing, e.g. clang).
#if defined(__GNUC__) && !defined(__clang__)
#define PYATTN_VECTOR_SHUFFLE 1
#else
#define PYATTN_VECTOR_SHUFFLE 0
#endif
template <typename T>
struct LaneIndexVector;
template <>
struct LaneIndexVector<float> {
  typedef int32_t type __attribute__((vector_size(64)));
};
template <>
struct LaneIndexVector<double> {
  typedef int64_t type __attribute__((vector_size(64)));
};
template <typename T>
using LaneIndices = typename LaneIndexVector<T>::type;

// Unaligned vector load and store (memcpy compiles to vmovups). The load
// writes through a reference: returning a 64-byte vector by value would draw
// GCC's ABI warning (-Wpsabi) in the baseline clone, inlined or not.
template <typename T>
__attribute__((always_inline)) inline void load_lanes(Lanes<T>& dst, const T* src) {
  std::memcpy(&dst, src, sizeof(dst));
}

template <typename T>
__attribute__((always_inline)) inline void store_lanes(T* dst, const Lanes<T>& v) {
  std::memcpy(dst, &v, sizeof(v));
}

}  // namespace pyattn::cpu

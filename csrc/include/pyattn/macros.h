#pragma once
// PYATTN_HOST_DEVICE marks the small per-element functions that the CPU loops
// and the CUDA kernels share, so CPU tests exercise the index math the GPU runs.
#if defined(__CUDACC__)
#define PYATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYATTN_HOST_DEVICE inline
#endif

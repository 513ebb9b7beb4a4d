#pragma once
// BLAS calls made from inside a parallel region, one per worker, planned for
// one thread. MKL chooses how to block a GEMM (and so the order of its sums)
// by the number of threads it may use, even inside a parallel region where it
// then runs on one: the attention kernels' tile GEMMs at head_dim 128 rounded
// differently at 1 and at 2 threads (measured with torch 2.13's MKL). A worker
// holds a SequentialBlas while it calls BLAS, so every call plans for one
// thread whatever the thread count, and results stay bitwise reproducible.
// Without MKL (the symbol is weak: absent from other BLAS builds) it does nothing.

extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace pyattn::cpu {

class SequentialBlas {
 public:
  SequentialBlas() : saved_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(saved_);  // 0: the global setting
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int saved_;
};

}  // namespace pyattn::cpu

// Schemas of every pyattn op and the pybind11 module pyattn._C.
// Kernels register themselves per backend (cpu/, cuda/); fake kernels and
// autograd are registered in Python (pyattn/ops/).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "pyattn/spmm.h"

#ifndef PYATTN_CUDA_ARCHS
#define PYATTN_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(pyattn, m) {
  m.def(
      "padded_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups, str padding_mode) -> Tensor");
  m.def(
      "padded_conv2d_grad_input(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups, str padding_mode) -> Tensor");
  m.def(
      "padded_conv2d_grad_weight(Tensor grad_output, Tensor input, Tensor weight, "
      "int[2] stride, int[4] padding, int[2] dilation, int groups, str padding_mode) -> Tensor");
  // Returns (out, lse): lse in float32 (float64 for float64 inputs), -inf for
  // rows that see no key; lse is that of the probabilities before dropout.
  // dropout_p in [0, 1); the dropout mask is a pure function of seed (in
  // [0, 2^62)) and the element's (batch * heads + head, query, key), so the
  // backward, given the same seed, regenerates it (SymInt: under torch.compile
  // the seed is drawn inside the graph). The Triton backend has the same ops
  // under flash_attention_triton_* (registered from Python).
  m.def(
      "flash_attention_forward(Tensor q, Tensor k, Tensor v, bool causal, float scale, "
      "float dropout_p, SymInt seed) -> (Tensor, Tensor)");
  m.def(
      "flash_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, bool causal, float scale, float dropout_p, SymInt seed) "
      "-> (Tensor, Tensor, Tensor)");
  // CSR sparse x dense (int32 or int64 indices): returns (out, arg); arg is the
  // arg-max / arg-min edge per output element for reduce='max' / 'min' (-1 for
  // empty rows), else empty. The transposed CSR (csc_*) is only checked here:
  // it is passed so the backward can use it. spmm_csr_max_backward serves
  // both 'max' and 'min' (it follows `arg`).
  m.def(
      "spmm_csr(Tensor rowptr, Tensor col, Tensor? values, Tensor x, str reduce, bool check, "
      "Tensor? csc_ptr, Tensor? csc_row, Tensor? csc_perm) -> (Tensor, Tensor)");
  m.def(
      "spmm_csr_edge_grad(Tensor rowptr, Tensor col, Tensor x, Tensor grad_out, str reduce) "
      "-> Tensor");
  // The transposed CSR (csc_ptr, csc_row, csc_perm) that spmm_csr's backward
  // reads: csc_perm[k] is the edge at transposed position k; the edges of a
  // column keep their CSR order (a stable counting sort). Checks the CSR's
  // contents as it reads them (rowptr from 0 to len(col), non-decreasing; col
  // in [0, num_cols)). CPU only: on other devices pyattn sorts with torch.
  m.def("csr_transpose(Tensor rowptr, Tensor col, int num_cols) -> (Tensor, Tensor, Tensor)");
  m.def(
      "spmm_csr_max_backward(Tensor csc_ptr, Tensor csc_row, Tensor csc_perm, Tensor? values, "
      "Tensor x, Tensor arg, Tensor grad_out) -> (Tensor, Tensor)");
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyattn compiled kernels; the ops are torch.ops.pyattn.*";
  m.def("build_info", [] {
    py::dict info;
#ifdef PYATTN_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = std::string(PYATTN_CUDA_ARCHS);
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
  // The CUDA spmm launcher's plan (pyattn/spmm.h), computed here on any build
  // so CPU tests check the launch geometry the GPU would use.
  m.def("spmm_cuda_plan", [](int64_t rows, int64_t features, int element_size, bool aligned,
                                bool extremum) {
    const pyattn::SpmmPlan plan =
        pyattn::plan_spmm(rows, features, element_size, aligned, extremum);
    py::dict d;
    d["lanes"] = plan.lanes;
    d["vector"] = plan.vector;
    d["chunks"] = plan.chunks;
    d["feature_passes"] = plan.feature_passes;
    d["rows_per_block"] = plan.rows_per_block;
    d["blocks"] = plan.blocks;
    d["launches"] = plan.launches;
    return d;
  });
}

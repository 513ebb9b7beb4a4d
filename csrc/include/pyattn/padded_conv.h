#pragma once
// Device-independent driver of the padded convolution (csrc/padded_conv.cpp).
// Each backend (cpu/, cuda/) supplies im2col and col2im over a chunk of samples;
// the driver checks arguments, chunks the batch so the column workspace stays
// small, and does the matrix products with ATen (BLAS / cuBLAS).
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <string>
#include <string_view>
#include <vector>

#include "pyattn/conv_geometry.h"

namespace pyattn {

struct ConvBackend {
  const char* device_name;
  // Dtypes this backend's kernels are compiled for.
  bool (*supports)(at::ScalarType);
  // input: (b, C, H, W) contiguous -> cols: (C*KH*KW, b, Ho*Wo) contiguous (as the
  // batched layout; here from per-axis tables, parallel over column rows).
  void (*im2col)(const at::Tensor& input, const at::Tensor& cols, const ConvGeometry& g);
  // cols: (C*KH*KW, b, Ho*Wo) contiguous -> grad_input: (b, C, H, W) contiguous, overwritten.
  void (*col2im)(const at::Tensor& cols, const at::Tensor& grad_input, const ConvGeometry& g);
  // Batched layout (conv_geometry.h, BatchedColumns), used when !gemm_per_thread:
  // input (b, C, H, W) contiguous -> cols (C*KH*KW, b, Ho*Wo) contiguous.
  void (*im2col_batched)(const at::Tensor& input, const at::Tensor& cols, const ConvGeometry& g);
  // cols (C*KH*KW, b, Ho*Wo), float32 for half inputs -> grad_input (b, C, H, W), overwritten.
  void (*col2im_batched)(const at::Tensor& cols, const at::Tensor& grad_input,
                         const ConvGeometry& g);
  // CPU path only (else nullptr): dst_t (N, M) += (rows (M, P) . cols (N, P)^T)^T
  // for the weight gradient, every sum in one fixed order (unit last strides).
  void (*accumulate_grad_weight)(const at::Tensor& rows, const at::Tensor& cols,
                                 const at::Tensor& dst_t);
  // CPU path only (else nullptr): the direct forward (padded_conv_direct.h),
  // taken where direct_forward_applies; input, weight and out contiguous.
  bool (*direct_forward_applies)(at::ScalarType dtype, const ConvGeometry& g, int64_t groups,
                                 int64_t out_channels);
  void (*direct_forward)(const at::Tensor& input, const at::Tensor& weight, const ConvGeometry& g,
                         int64_t groups, const at::Tensor& out);
  // CPU path only (else nullptr): the direct weight gradient, likewise.
  bool (*direct_grad_weight_applies)(at::ScalarType dtype, const ConvGeometry& g, int64_t groups,
                                     int64_t out_channels);
  at::Tensor (*direct_grad_weight)(const at::Tensor& grad_output, const at::Tensor& input,
                                   const ConvGeometry& g, int64_t groups, int64_t blocks);
  // CPU path only (else nullptr): the direct input gradient, likewise.
  bool (*direct_grad_input_applies)(at::ScalarType dtype, const ConvGeometry& g, int64_t groups,
                                    int64_t out_channels);
  void (*direct_grad_input)(const at::Tensor& grad_output, const at::Tensor& weight,
                            const ConvGeometry& g, int64_t groups, const at::Tensor& grad_input);
  // CPU: run the GEMMs of blocks of samples in parallel, each single-threaded.
  // Otherwise (CUDA; the CPU twin in tests): a fixed number of launches per chunk
  // of samples, one batched GEMM over the groups (plan_batched).
  bool gemm_per_thread;
};

// The launches one call of the batched path makes (kernels, GEMMs, copies, in
// order) and the chunk of samples each per-chunk group of launches covers.
// The batched driver takes its chunk size from here, so the plan is the code's.
struct LaunchPlan {
  int64_t chunk = 0;
  int64_t chunks = 0;
  std::vector<std::string> launches;
};

// which: "forward", "grad_input" or "grad_weight".
LaunchPlan plan_batched(std::string_view which, const at::Tensor& input, const at::Tensor& weight,
                        bool has_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, std::string_view padding_mode);

// The kernel `which` ("forward", "grad_input" or "grad_weight") takes on `backend`:
// "direct", "gemm", or for the input gradient at stride 1 "transposed_forward"
// (the direct forward kernel) or "transposed_forward_folded" (the same, on the
// padded input, then folded). Tests use it to know which path their shapes exercise.
std::string kernel_path(const ConvBackend& backend, std::string_view which,
                        const at::Tensor& input, const at::Tensor& weight,
                        at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, std::string_view padding_mode);

at::Tensor padded_conv2d_forward(const ConvBackend& backend, const at::Tensor& input,
                                 const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups,
                                 std::string_view padding_mode);

at::Tensor padded_conv2d_grad_input(const ConvBackend& backend, const at::Tensor& grad_output,
                                    const at::Tensor& input, const at::Tensor& weight,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups,
                                    std::string_view padding_mode);

at::Tensor padded_conv2d_grad_weight(const ConvBackend& backend, const at::Tensor& grad_output,
                                     const at::Tensor& input, const at::Tensor& weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups,
                                     std::string_view padding_mode);

// Registers the three padded-conv ops for the dispatch key of `m` on `backend`.
template <const ConvBackend& backend>
void register_padded_conv2d(torch::Library& m) {
  m.impl("padded_conv2d",
         [](const at::Tensor& input, const at::Tensor& weight,
            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
            c10::string_view padding_mode) {
           return padded_conv2d_forward(backend, input, weight, bias, stride, padding, dilation,
                                        groups, padding_mode);
         });
  m.impl("padded_conv2d_grad_input",
         [](const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
            int64_t groups, c10::string_view padding_mode) {
           return padded_conv2d_grad_input(backend, grad_output, input, weight, stride, padding,
                                           dilation, groups, padding_mode);
         });
  m.impl("padded_conv2d_grad_weight",
         [](const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
            int64_t groups, c10::string_view padding_mode) {
           return padded_conv2d_grad_weight(backend, grad_output, input, weight, stride, padding,
                                            dilation, groups, padding_mode);
         });
}

}  // namespace pyattn

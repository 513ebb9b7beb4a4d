#pragma once
// The CPU backend's direct kernels (cpu/padded_conv_direct.cpp), forward and
// both gradients: register-tiled AVX-512 micro-kernels over packed input rows,
// no column matrix. The driver (padded_conv.cpp) takes them where they apply,
// else im2col + GEMM.
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "pyattn/conv_geometry.h"

namespace pyattn {

// Fewest terms per output (C_in/groups * KH * KW) for the direct forward.
constexpr int64_t kMinDirectTerms = 64;
// Fewest output channels per group (the terms of each product the direct
// input gradient scatters) for it.
constexpr int64_t kMinDirectGradInputTerms = 16;

// Whether the direct forward runs this problem: an AVX-512 CPU, float32 or
// float64, width stride 1 or 2, at least kMinDirectTerms terms per output and
// a vector's worth of output channels per group. Shapes and dtype only.
bool direct_forward_applies(at::ScalarType dtype, const ConvGeometry& g, int64_t groups,
                            int64_t out_channels);

// out (N, C_out, Ho, Wo) contiguous = the convolution of input (N, C, H, W)
// contiguous with weight (C_out, C/groups, KH, KW) contiguous, without bias.
void direct_forward_cpu(const at::Tensor& input, const at::Tensor& weight, const ConvGeometry& g,
                        int64_t groups, const at::Tensor& out);

// Whether the direct weight gradient runs this problem: as the forward, but
// any number of terms per output (the sums run over the batch's pixels).
bool direct_grad_weight_applies(at::ScalarType dtype, const ConvGeometry& g, int64_t groups,
                                int64_t out_channels);

// The weight gradient (C_out, C/groups, KH, KW) from grad_output (N, C_out, Ho,
// Wo) and input (N, C, H, W), both contiguous: `blocks` even blocks of samples
// sum in parallel, each into its own partial, the partials added in block
// order, so results do not depend on the thread count.
at::Tensor direct_grad_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                  const ConvGeometry& g, int64_t groups, int64_t blocks);

// Whether the direct input gradient runs this problem: an AVX-512 CPU, float32
// or float64, a vector's worth of input channels and kMinDirectGradInputTerms
// output channels per group, and one sample's packed gradient within 1 MiB.
bool direct_grad_input_applies(at::ScalarType dtype, const ConvGeometry& g, int64_t groups,
                               int64_t out_channels);

// grad_input (N, C, H, W) contiguous, overwritten, from grad_output (N, C_out,
// Ho, Wo) and weight (C_out, C/groups, KH, KW), both contiguous.
void direct_grad_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                           const ConvGeometry& g, int64_t groups, const at::Tensor& grad_input);

}  // namespace pyattn

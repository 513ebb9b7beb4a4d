// Device-independent part of pyattn::padded_conv2d: argument checks and the
// chunked im2col + GEMM driver. Backends register it in cpu/ and cuda/.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "pyattn/padded_conv.h"


#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "pyattn/sequential_blas.h"

namespace pyattn {
namespace {

// Workspace of the batched path per chunk of samples (columns and the
// group-major copy of the output / grad output). At least one sample is
// processed at a time. The CPU path holds one ~kTileBytes tile per thread.
constexpr int64_t kWorkspaceBytes = 64 << 20;
constexpr int64_t kTileBytes = 1 << 20;

PadMode parse_padding_mode(std::string_view mode) {
  if (mode == "zeros") return PadMode::Zeros;
  if (mode == "reflect") return PadMode::Reflect;
  if (mode == "replicate") return PadMode::Replicate;
  if (mode == "circular") return PadMode::Circular;
  TORCH_CHECK_VALUE(false, "padded_conv2d: padding_mode must be one of 'zeros', 'reflect', "
                    "'replicate', 'circular', got '", mode, "'");
}

struct ConvProblem {
  ConvGeometry geometry;
  int64_t batch;
  int64_t out_channels;
  int64_t groups;
};

void check_pair(const char* op, const char* name, at::IntArrayRef values, size_t count,
                int64_t minimum) {
  TORCH_CHECK_VALUE(values.size() == count, op, ": `", name, "` must have ", count,
                    " values, got ", values.size());
  for (const int64_t v : values) {
    TORCH_CHECK_VALUE(v >= minimum, op, ": `", name, "` must be >= ", minimum, ", got ",
                      values);
  }
}

void check_axis_padding(const char* op, PadMode mode, const char* axis, int64_t size,
                        int64_t before, int64_t after) {
  const int64_t pad = std::max(before, after);
  if (mode == PadMode::Reflect) {
    TORCH_CHECK_VALUE(pad < size, op, ": reflect `padding` must be smaller than the input ",
                      axis, " (", size, "), got ", pad);
  } else if (mode == PadMode::Circular) {
    TORCH_CHECK_VALUE(pad <= size, op, ": circular `padding` must be at most the input ",
                      axis, " (", size, "), got ", pad, " (it would wrap around more than once)");
  }
}

ConvProblem check_problem(const char* op, const ConvBackend& backend, const at::Tensor& input,
                          const at::Tensor& weight, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          std::string_view padding_mode) {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": expected `input` to be a 4-D tensor (N, C, H, W), "
                    "got a ", input.dim(), "-D tensor");
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": expected `weight` to be a 4-D tensor "
                    "(C_out, C_in / groups, KH, KW), got a ", weight.dim(), "-D tensor");
  TORCH_CHECK_TYPE(input.scalar_type() == weight.scalar_type(), op,
                   ": `input` and `weight` must have the same dtype, got ", input.scalar_type(),
                   " and ", weight.scalar_type());
  TORCH_CHECK_TYPE(backend.supports(input.scalar_type()), op, ": dtype ", input.scalar_type(),
                   " is not supported on ", backend.device_name);
  TORCH_CHECK(input.device() == weight.device(), op,
              ": `input` and `weight` must be on the same device, got ", input.device(), " and ",
              weight.device());
  // Empty batches and channel counts are valid (as in nn.Conv2d); spatial
  // extents and kernel sizes are not.
  for (int d = 2; d < 4; ++d) {
    TORCH_CHECK_VALUE(input.size(d) > 0, op, ": `input` must have non-empty height and width, "
                      "got shape ", input.sizes());
    TORCH_CHECK_VALUE(weight.size(d) > 0, op, ": `weight` must have a non-empty kernel, got "
                      "shape ", weight.sizes());
  }
  check_pair(op, "stride", stride, 2, 1);
  check_pair(op, "padding", padding, 4, 0);
  check_pair(op, "dilation", dilation, 2, 1);
  TORCH_CHECK_VALUE(groups >= 1, op, ": `groups` must be >= 1, got ", groups);
  const int64_t channels = input.size(1);
  const int64_t out_channels = weight.size(0);
  TORCH_CHECK_VALUE(channels % groups == 0, op, ": input channels (", channels,
                    ") must be divisible by `groups` (", groups, ")");
  TORCH_CHECK_VALUE(out_channels % groups == 0, op, ": `weight` out channels (", out_channels,
                    ") must be divisible by `groups` (", groups, ")");
  TORCH_CHECK_VALUE(weight.size(1) * groups == channels, op, ": `weight` expects ",
                    weight.size(1) * groups, " input channels (", weight.size(1), " x ", groups,
                    " groups), but `input` has ", channels);
  const PadMode mode = parse_padding_mode(padding_mode);
  const int64_t height = input.size(2), width = input.size(3);
  check_axis_padding(op, mode, "height", height, padding[0], padding[1]);
  check_axis_padding(op, mode, "width", width, padding[2], padding[3]);

  Axis h{height, 0, padding[0], padding[1], weight.size(2), stride[0], dilation[0]};
  Axis w{width, 0, padding[2], padding[3], weight.size(3), stride[1], dilation[1]};
  h.out_size = conv_out_size(h.size, h.pad_before, h.pad_after, h.kernel, h.stride, h.dilation);
  w.out_size = conv_out_size(w.size, w.pad_before, w.pad_after, w.kernel, w.stride, w.dilation);
  TORCH_CHECK_VALUE(h.out_size > 0 && w.out_size > 0, op, ": padded input (",
                    height + padding[0] + padding[1], " x ", width + padding[2] + padding[3],
                    ") is smaller than the dilated kernel (", dilation[0] * (h.kernel - 1) + 1,
                    " x ", dilation[1] * (w.kernel - 1) + 1, ")");
  return ConvProblem{ConvGeometry{channels, h, w, mode}, input.size(0), out_channels, groups};
}

void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                       const ConvProblem& p) {
  const auto& g = p.geometry;
  TORCH_CHECK_VALUE(grad_output.dim() == 4 && grad_output.size(0) == p.batch &&
                        grad_output.size(1) == p.out_channels &&
                        grad_output.size(2) == g.h.out_size && grad_output.size(3) == g.w.out_size,
                    op, ": `grad_output` must have shape (", p.batch, ", ", p.out_channels, ", ",
                    g.h.out_size, ", ", g.w.out_size, "), got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), op,
                   ": `grad_output` must have dtype ", input.scalar_type(), ", got ",
                   grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), op, ": `grad_output` must be on ",
              input.device(), ", got ", grad_output.device());
}

// Blocks of samples the CPU backend splits a batch into. Set by the batch size
// alone, so per-block partial sums (grad weight) are added in the same order
// whatever the thread count: results are deterministic.
constexpr int64_t kMaxBlocks = 32;

int64_t block_count(const ConvBackend& backend, const ConvProblem& p) {
  return backend.gemm_per_thread ? std::min(p.batch, kMaxBlocks) : 1;
}

// Samples whose columns one CPU GEMM (forward, grad input) covers: enough for
// ~kGemmColumns columns, so small layers (Net1's 6x6 outputs: 36 per sample)
// get GEMMs wide enough to run near the BLAS rate, within a ~kTileBytes tile
// that stays in cache. 1 for large planes, whose output rows may be tiled
// instead (for_each_row_tile). Set by the shapes alone, never the thread count.
constexpr int64_t kGemmColumns = 512;

int64_t samples_per_gemm(const ConvGeometry& g, int64_t element_size) {
  const int64_t wanted = (kGemmColumns + g.out_plane() - 1) / g.out_plane();
  const int64_t fit = kTileBytes / std::max<int64_t>(g.cols_per_sample() * element_size, 1);
  return std::max<int64_t>(std::min(wanted, fit), 1);
}

// Chunks of `samples` samples as blocks of for_each_chunk.
int64_t chunk_count(const ConvProblem& p, int64_t samples) {
  return (p.batch + samples - 1) / samples;
}

// One thread's buffers: `cols` for (C*KH*KW, samples, plane) columns, and
// `gathered` for a (C_out, samples, Ho*Wo) output-side matrix (the products
// of a multi-sample GEMM, or the grad output gathered for one).
struct ChunkBuffers {
  at::Tensor cols;
  at::Tensor gathered;

  // The first `count` samples of `gathered` as (C_out, count, Ho*Wo).
  at::Tensor gathered_view(const ConvProblem& p, int64_t count) const {
    const int64_t plane = p.geometry.out_plane();
    return gathered.narrow(0, 0, p.out_channels * count * plane)
        .view({p.out_channels, count, plane});
  }

  // Samples [n0, n0 + count) of `rows` (batch, C_out, Ho*Wo) as one (C_out,
  // count * Ho*Wo) matrix: the sample itself when count is 1, else copied
  // into `gathered`.
  at::Tensor side_by_side(const ConvProblem& p, const at::Tensor& rows, int64_t n0,
                          int64_t count) const {
    if (count == 1) return rows.select(0, n0);
    at::Tensor chunk = gathered_view(p, count);
    chunk.copy_(rows.narrow(0, n0, count).transpose(0, 1));
    return chunk;
  }
};

// Calls body(block, first_sample, count, buffers) over sample ranges covering
// the batch: `blocks` even blocks run in parallel, each in chunks of up to
// `samples` samples in its thread's buffers, so columns stay in cache between
// im2col and GEMM and each GEMM runs single-threaded.
template <typename F>
void for_each_chunk(const ConvProblem& p, const at::TensorOptions& options, int64_t blocks,
                    int64_t samples, int64_t plane, const F& body) {
  const ConvGeometry& g = p.geometry;
  const int64_t threads = at::get_num_threads();
  const at::Tensor cols = at::empty({threads, samples * g.col_rows() * plane}, options);
  const at::Tensor gathered =
      at::empty({threads, samples > 1 ? samples * p.out_channels * g.out_plane() : 0}, options);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;  // this worker's GEMMs, planned for one thread
    const int64_t thread = at::get_thread_num();
    const ChunkBuffers buffers{cols.select(0, thread), gathered.select(0, thread)};
    for (int64_t block = begin; block < end; ++block) {
      const int64_t last = p.batch * (block + 1) / blocks;
      for (int64_t n = p.batch * block / blocks; n < last; n += samples) {
        body(block, n, std::min(samples, last - n), buffers);
      }
    }
  });
}

// Output rows per im2col tile: a tile's columns stay within ~1 MiB so they
// are still in cache when the GEMM reads them.
int64_t tile_rows(const ConvGeometry& g, int64_t element_size) {
  const int64_t row_bytes = g.col_rows() * g.w.out_size * element_size;
  return std::clamp<int64_t>(kTileBytes / row_bytes, 1, g.h.out_size);
}

// The geometry of output rows [first, first + rows): the same taps, shifted.
ConvGeometry row_tile(const ConvGeometry& g, int64_t first, int64_t rows) {
  ConvGeometry tile = g;
  tile.h.out_size = rows;
  tile.h.pad_before = g.h.pad_before - first * g.h.stride;  // tap_coordinate(o) unchanged
  return tile;
}

// Calls body(first_row, tile_geometry, cols) for each row tile of `count`
// samples, `cols` the tile's (C*KH*KW, count, rows*Wo) view of `workspace`
// (one tile of whole planes when count > 1, see samples_per_gemm).
template <typename F>
void for_each_row_tile(const ConvGeometry& g, int64_t count, const at::Tensor& workspace,
                       const F& body) {
  const int64_t step = tile_rows(g, workspace.element_size());
  for (int64_t first = 0; first < g.h.out_size; first += step) {
    const ConvGeometry tile = row_tile(g, first, std::min(step, g.h.out_size - first));
    body(first, tile,
         workspace.narrow(0, 0, count * tile.cols_per_sample())
             .view({g.col_rows(), count, tile.out_plane()}));
  }
}

// As nn.Conv2d: results shaped like the input keep its (channels-last) layout.
at::Tensor in_input_layout(const at::Tensor& result, const at::Tensor& input) {
  return result.contiguous(input.suggest_memory_format());
}

// No products to form: an empty batch, or no input or output channels.
bool is_empty_problem(const ConvProblem& p) {
  return p.batch == 0 || p.geometry.channels == 0 || p.out_channels == 0;
}

// One (sample, group) slab of a (b, G * rows, cols) tensor as a 2-D matrix.
at::Tensor slab(const at::Tensor& t, int64_t sample, int64_t groups, int64_t group) {
  const at::Tensor s = t.select(0, sample);
  return s.view({groups, s.size(0) / groups, -1}).select(0, group);
}

// Whether the forward takes the backend's direct kernel instead of im2col + GEMM.
bool uses_direct_forward(const ConvBackend& backend, const ConvProblem& p, at::ScalarType dtype) {
  return backend.direct_forward_applies != nullptr &&
         backend.direct_forward_applies(dtype, p.geometry, p.groups, p.out_channels);
}

// Whether the input gradient takes the backend's direct kernel.
bool uses_direct_grad_input(const ConvBackend& backend, const ConvProblem& p,
                            at::ScalarType dtype) {
  return backend.direct_grad_input_applies != nullptr &&
         backend.direct_grad_input_applies(dtype, p.geometry, p.groups, p.out_channels);
}

// Whether the weight gradient takes the backend's direct kernel.
bool uses_direct_grad_weight(const ConvBackend& backend, const ConvProblem& p,
                             at::ScalarType dtype) {
  return backend.direct_grad_weight_applies != nullptr &&
         backend.direct_grad_weight_applies(dtype, p.geometry, p.groups, p.out_channels);
}

// ---- The batched path (CUDA; the CPU twin in tests) -------------------------
// Per chunk of samples a fixed list of launches (plan_batched): im2col into the
// group-major layout of conv_geometry.h, ONE batched GEMM over the groups whose
// columns span every sample of the chunk, and one strided copy between the
// (n, G, M, P) output layout and the GEMM's (G, M, n, P). Nothing loops over
// samples or groups; the chunk size depends on the shapes only, so sums are
// added in the same order for any launch configuration.

at::ScalarType accumulate_type(at::ScalarType t) { return at::toOpMathType(t); }

LaunchPlan make_plan(std::string_view which, const ConvProblem& p, at::ScalarType dtype,
                     bool has_bias) {
  const ConvGeometry& g = p.geometry;
  const int64_t element = c10::elementSize(dtype);
  // grad input's columns are summed by col2im: kept in the accumulate type.
  const int64_t column_element = which == "grad_input" ? c10::elementSize(accumulate_type(dtype))
                                                       : element;
  const int64_t sample_bytes =
      g.cols_per_sample() * column_element + p.out_channels * g.out_plane() * element;
  LaunchPlan plan;
  if (is_empty_problem(p)) return plan;
  plan.chunk = std::clamp<int64_t>(kWorkspaceBytes / std::max<int64_t>(sample_bytes, 1), 1,
                                   p.batch);
  plan.chunks = (p.batch + plan.chunk - 1) / plan.chunk;
  std::vector<std::string> per_chunk;
  if (which == "forward") {
    per_chunk = {"im2col", "gemm: bmm over groups", "copy (G,M,n,P) -> output"};
  } else if (which == "grad_input") {
    per_chunk = {"copy grad_output -> (G,M,n,P)", "gemm: bmm over groups", "col2im"};
  } else {
    TORCH_CHECK_VALUE(which == "grad_weight", "padded_conv2d_launch_plan: `which` must be "
                      "'forward', 'grad_input' or 'grad_weight', got '", which, "'");
    per_chunk = {"im2col", "copy grad_output -> (G,M,n,P)", "gemm: baddbmm over groups"};
    plan.launches.push_back("zero the accumulator");
  }
  for (int64_t c = 0; c < plan.chunks; ++c) {
    plan.launches.insert(plan.launches.end(), per_chunk.begin(), per_chunk.end());
  }
  if (which == "forward" && has_bias) plan.launches.push_back("add bias");
  if (which == "grad_weight" && accumulate_type(dtype) != dtype) {
    plan.launches.push_back("round the accumulator once");
  }
  return plan;
}

// Per chunk: (first sample, count). The plan's chunk size, nothing else.
template <typename F>
void for_each_planned_chunk(const LaunchPlan& plan, int64_t batch, const F& body) {
  for (int64_t n0 = 0; n0 < batch; n0 += plan.chunk) body(n0, std::min(plan.chunk, batch - n0));
}

// (count, G*M, P) rows of `t` (contiguous) as the (G, M, count, P) view the GEMMs use.
at::Tensor group_major(const at::Tensor& t, int64_t groups) {
  const int64_t count = t.size(0);
  return t.view({count, groups, -1, t.size(-1)}).permute({1, 2, 0, 3});
}

void batched_forward(const ConvBackend& backend, const ConvProblem& p, const at::Tensor& x,
                     const at::Tensor& w, bool has_bias, const at::Tensor& out) {
  const ConvGeometry& g = p.geometry;
  const LaunchPlan plan = make_plan("forward", p, x.scalar_type(), has_bias);
  const int64_t plane = g.out_plane(), groups = p.groups;
  const at::Tensor cols = at::empty({g.col_rows() * plan.chunk * plane}, x.options());
  const at::Tensor products = at::empty({p.out_channels * plan.chunk * plane}, x.options());
  const at::Tensor out_rows = out.view({p.batch, p.out_channels, plane});
  for_each_planned_chunk(plan, p.batch, [&](int64_t n0, int64_t count) {
    const at::Tensor chunk_cols = cols.narrow(0, 0, g.col_rows() * count * plane);
    backend.im2col_batched(x.narrow(0, n0, count), chunk_cols.view({g.col_rows(), count, plane}),
                           g);
    at::Tensor prod = products.narrow(0, 0, p.out_channels * count * plane)
                          .view({groups, p.out_channels / groups, count * plane});
    at::bmm_out(prod, w, chunk_cols.view({groups, -1, count * plane}));
    group_major(out_rows.narrow(0, n0, count), groups)
        .copy_(prod.view({groups, p.out_channels / groups, count, plane}));
  });
}

void batched_grad_input(const ConvBackend& backend, const ConvProblem& p, const at::Tensor& go,
                        const at::Tensor& wt, const at::Tensor& grad_input) {
  const ConvGeometry& g = p.geometry;
  const at::ScalarType dtype = grad_input.scalar_type(), acc = accumulate_type(dtype);
  const LaunchPlan plan = make_plan("grad_input", p, dtype, false);
  const int64_t plane = g.out_plane(), groups = p.groups;
  const at::Tensor cols = at::empty({g.col_rows() * plan.chunk * plane},
                                    grad_input.options().dtype(acc));
  const at::Tensor go_buffer = at::empty({p.out_channels * plan.chunk * plane}, go.options());
  for_each_planned_chunk(plan, p.batch, [&](int64_t n0, int64_t count) {
    const at::Tensor go_groups = go_buffer.narrow(0, 0, p.out_channels * count * plane)
                                     .view({groups, p.out_channels / groups, count, plane});
    go_groups.copy_(group_major(go.narrow(0, n0, count), groups));
    at::Tensor chunk_cols = cols.narrow(0, 0, g.col_rows() * count * plane)
                                .view({groups, g.col_rows() / groups, count * plane});
    const at::Tensor go_matrix = go_groups.view({groups, -1, count * plane});
    // Half inputs: the products are summed by col2im, so keep them in float32
    // and round once, when col2im writes grad_input.
    if (acc == dtype) {
      at::bmm_out(chunk_cols, wt, go_matrix);
    } else {
      at::bmm_out(chunk_cols, wt, go_matrix, acc);
    }
    backend.col2im_batched(chunk_cols.view({g.col_rows(), count, plane}),
                           grad_input.narrow(0, n0, count), g);
  });
}

at::Tensor batched_grad_weight(const ConvBackend& backend, const ConvProblem& p,
                               const at::Tensor& go, const at::Tensor& x,
                               const at::Tensor& weight) {
  const ConvGeometry& g = p.geometry;
  const at::ScalarType dtype = x.scalar_type(), acc_type = accumulate_type(dtype);
  const LaunchPlan plan = make_plan("grad_weight", p, dtype, false);
  const int64_t plane = g.out_plane(), groups = p.groups;
  // Every chunk's products are added into one float32 (for half) accumulator:
  // the weight gradient is rounded once, at the end.
  at::Tensor acc = at::zeros({groups, p.out_channels / groups, g.col_rows() / groups},
                             x.options().dtype(acc_type));
  const at::Tensor cols = at::empty({g.col_rows() * plan.chunk * plane}, x.options());
  const at::Tensor go_buffer = at::empty({p.out_channels * plan.chunk * plane}, go.options());
  for_each_planned_chunk(plan, p.batch, [&](int64_t n0, int64_t count) {
    const at::Tensor chunk_cols = cols.narrow(0, 0, g.col_rows() * count * plane);
    backend.im2col_batched(x.narrow(0, n0, count), chunk_cols.view({g.col_rows(), count, plane}),
                           g);
    const at::Tensor go_groups = go_buffer.narrow(0, 0, p.out_channels * count * plane)
                                     .view({groups, p.out_channels / groups, count, plane});
    go_groups.copy_(group_major(go.narrow(0, n0, count), groups));
    const at::Tensor go_matrix = go_groups.view({groups, -1, count * plane});
    const at::Tensor cols_t = chunk_cols.view({groups, -1, count * plane}).transpose(1, 2);
    if (acc_type == dtype) {
      acc.baddbmm_(go_matrix, cols_t);
    } else {
      at::baddbmm_out(acc, acc, go_matrix, cols_t, acc_type);
    }
  });
  return acc.view(weight.sizes()).to(dtype);
}

}  // namespace

at::Tensor padded_conv2d_forward(const ConvBackend& backend, const at::Tensor& input,
                                 const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups,
                                 std::string_view padding_mode) {
  constexpr const char* op = "padded_conv2d";
  const ConvProblem p =
      check_problem(op, backend, input, weight, stride, padding, dilation, groups, padding_mode);
  const c10::OptionalDeviceGuard device_guard(input.device());
  // The kernels run below autograd; the ATen calls inside them must too.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.out_channels, op,
                      ": `bias` must have shape (", p.out_channels, "), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), op, ": `bias` must have dtype ",
                     input.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == input.device(), op, ": `bias` must be on ", input.device(),
                ", got ", bias->device());
  }
  const ConvGeometry& g = p.geometry;
  if (is_empty_problem(p)) {
    at::Tensor out = at::zeros({p.batch, p.out_channels, g.h.out_size, g.w.out_size},
                               input.options());
    if (bias.has_value()) out.add_(bias->view({1, p.out_channels, 1, 1}));
    return in_input_layout(out, input);
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous().view({groups, p.out_channels / groups, -1});
  at::Tensor out = at::empty({p.batch, p.out_channels, g.h.out_size, g.w.out_size},
                             input.options());
  if (uses_direct_forward(backend, p, x.scalar_type())) {
    backend.direct_forward(x, weight.contiguous(), g, groups, out);
    if (bias.has_value()) out.add_(bias->view({1, p.out_channels, 1, 1}));
    return in_input_layout(out, input);
  }
  if (!backend.gemm_per_thread) {
    batched_forward(backend, p, x, w, bias.has_value(), out);
    if (bias.has_value()) out.add_(bias->view({1, p.out_channels, 1, 1}));
    return in_input_layout(out, input);
  }
  const at::Tensor out_rows = out.view({p.batch, p.out_channels, g.out_plane()});
  const int64_t samples = samples_per_gemm(g, x.element_size());
  const int64_t plane = tile_rows(g, x.element_size()) * g.w.out_size;
  for_each_chunk(p, x.options(), chunk_count(p, samples), samples, plane,
                 [&](int64_t, int64_t n0, int64_t count, const ChunkBuffers& buffers) {
    for_each_row_tile(g, count, buffers.cols, [&](int64_t first, const ConvGeometry& tile,
                                                  const at::Tensor& cols) {
      backend.im2col(x.narrow(0, n0, count), cols, tile);
      const at::Tensor col_groups = cols.view({groups, -1, count * tile.out_plane()});
      if (count == 1) {  // straight into the output rows of this tile
        for (int64_t grp = 0; grp < groups; ++grp) {
          at::Tensor dst = slab(out_rows, n0, groups, grp)
                               .narrow(1, first * g.w.out_size, tile.out_plane());
          at::mm_out(dst, w.select(0, grp), col_groups.select(0, grp));
        }
        return;
      }
      // (C_out, count, Ho*Wo) products, then one strided copy into the output.
      const at::Tensor products = buffers.gathered_view(p, count);
      const at::Tensor product_groups = products.view({groups, -1, count * g.out_plane()});
      for (int64_t grp = 0; grp < groups; ++grp) {
        at::Tensor dst = product_groups.select(0, grp);
        at::mm_out(dst, w.select(0, grp), col_groups.select(0, grp));
      }
      out_rows.narrow(0, n0, count).transpose(0, 1).copy_(products);
    });
  });
  if (bias.has_value()) out.add_(bias->view({1, p.out_channels, 1, 1}));
  return in_input_layout(out, input);
}

// ---- Input gradient at stride 1 as a forward convolution ------------------
// At stride 1 the gradient of the padded input is grad_output correlated with
// the kernel flipped and its channel axes swapped, over grad_output padded by
// d*(k-1) zeros on each side. That runs on the forward's direct kernel, which
// is faster than im2col's GEMM + col2im where it applies (RESULTS.md).

// (C_out, C_in / G, KH, KW) -> the transposed convolution's (C_in, C_out / G, KH, KW), flipped.
at::Tensor flipped_transposed_weight(const at::Tensor& weight, int64_t groups) {
  const int64_t out_per_group = weight.size(0) / groups, in_per_group = weight.size(1);
  return weight.view({groups, out_per_group, in_per_group, weight.size(2), weight.size(3)})
      .transpose(1, 2)
      .flip({3, 4})
      .reshape({groups * in_per_group, out_per_group, weight.size(2), weight.size(3)})
      .contiguous();
}

// That convolution's axis over grad_output, its output cut by `cut_before` /
// `cut_after` positions from the padded input's extent.
Axis transposed_axis(const Axis& a, int64_t cut_before, int64_t cut_after) {
  const int64_t reach = a.dilation * (a.kernel - 1);
  Axis t{a.out_size, 0, reach - cut_before, reach - cut_after, a.kernel, 1, a.dilation};
  t.out_size = conv_out_size(t.size, t.pad_before, t.pad_after, t.kernel, 1, t.dilation);
  return t;
}

// Adds each border position of `t` along `dim` (axis `a`'s padded extent)
// into the position it reads (source_index), in place; zeros mode drops it.
// In place is safe because sources are interior: check_axis_padding's limits
// (reflect pad < size, circular pad <= size) give that.
void fold_border(const at::Tensor& t, int64_t dim, const Axis& a, PadMode mode) {
  for (int64_t i = -a.pad_before; i < a.size + a.pad_after; ++i) {
    if (i >= 0 && i < a.size) continue;
    const int64_t source = source_index(i, a.size, mode);
    TORCH_INTERNAL_ASSERT(source < a.size);
    if (source >= 0) t.select(dim, source + a.pad_before).add_(t.select(dim, i + a.pad_before));
  }
}

// Folds `padded`, the gradient of the padded input (b, C, H + pads, W + pads),
// into `grad_input` (b, C, H, W): border columns over every row, then the
// border rows' interior columns (their border columns are folded already),
// then one copy of the interior.
void fold_padded_gradient(const at::Tensor& padded, const ConvGeometry& g,
                          const at::Tensor& grad_input) {
  const at::Tensor columns = padded.narrow(3, g.w.pad_before, g.w.size);
  fold_border(padded, 3, g.w, g.mode);
  fold_border(columns, 2, g.h, g.mode);
  grad_input.copy_(columns.narrow(2, g.h.pad_before, g.h.size));
}

// The transposed convolution that gives the input gradient at stride 1 on
// the direct forward kernel. `folded`: it computes the padded input's gradient
// (every padded mode, and zeros padding beyond the kernel's reach), which
// fold_padded_gradient then adds up; otherwise it writes the input gradient.
struct TransposedForward {
  ConvProblem problem;
  bool folded;
};

c10::optional<TransposedForward> grad_input_as_forward(const ConvBackend& backend,
                                                       const ConvProblem& p,
                                                       at::ScalarType dtype) {
  const ConvGeometry& g = p.geometry;
  if (!backend.gemm_per_thread || g.h.stride != 1 || g.w.stride != 1) return c10::nullopt;
  const auto within_reach = [](const Axis& a) {
    return std::max(a.pad_before, a.pad_after) <= a.dilation * (a.kernel - 1);
  };
  // Without padding every mode reads as zeros does: nothing to fold.
  const bool has_padding = g.h.pad_before + g.h.pad_after + g.w.pad_before + g.w.pad_after > 0;
  const bool folded =
      (g.mode != PadMode::Zeros && has_padding) || !within_reach(g.h) || !within_reach(g.w);
  const Axis th = folded ? transposed_axis(g.h, 0, 0)
                         : transposed_axis(g.h, g.h.pad_before, g.h.pad_after);
  const Axis tw = folded ? transposed_axis(g.w, 0, 0)
                         : transposed_axis(g.w, g.w.pad_before, g.w.pad_after);
  const TransposedForward t{
      ConvProblem{ConvGeometry{p.out_channels, th, tw, PadMode::Zeros}, p.batch, g.channels,
                  p.groups},
      folded};
  if (!uses_direct_forward(backend, t.problem, dtype)) return c10::nullopt;
  return t;
}

// Runs `t` on grad_output (b, C_out, Ho, Wo), contiguous, into grad_input. The
// padded input's gradient is made a chunk of samples at a time (at most 32 MiB).
void grad_input_by_forward(const ConvBackend& backend, const ConvProblem& p,
                           const TransposedForward& t, const at::Tensor& go,
                           const at::Tensor& weight, const at::Tensor& grad_input) {
  const ConvGeometry& g = p.geometry;
  const ConvGeometry& tg = t.problem.geometry;
  TORCH_INTERNAL_ASSERT(t.folded ? tg.h.out_size == g.h.size + g.h.pad_before + g.h.pad_after &&
                                       tg.w.out_size == g.w.size + g.w.pad_before + g.w.pad_after
                                 : tg.h.out_size == g.h.size && tg.w.out_size == g.w.size);
  const at::Tensor w = flipped_transposed_weight(weight, p.groups);
  if (!t.folded) {
    backend.direct_forward(go, w, tg, p.groups, grad_input);
    return;
  }
  const int64_t sample_bytes = g.channels * tg.out_plane() * go.element_size();
  const int64_t samples = std::max<int64_t>(1, (int64_t(32) << 20) / sample_bytes);
  const at::Tensor padded = at::empty(
      {std::min(samples, p.batch), g.channels, tg.h.out_size, tg.w.out_size}, go.options());
  for (int64_t n0 = 0; n0 < p.batch; n0 += samples) {
    const int64_t count = std::min(samples, p.batch - n0);
    const at::Tensor chunk = padded.narrow(0, 0, count);
    backend.direct_forward(go.narrow(0, n0, count), w, tg, p.groups, chunk);
    fold_padded_gradient(chunk, g, grad_input.narrow(0, n0, count));
  }
}

at::Tensor padded_conv2d_grad_input(const ConvBackend& backend, const at::Tensor& grad_output,
                                    const at::Tensor& input, const at::Tensor& weight,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups,
                                    std::string_view padding_mode) {
  constexpr const char* op = "padded_conv2d_grad_input";
  const ConvProblem p =
      check_problem(op, backend, input, weight, stride, padding, dilation, groups, padding_mode);
  const c10::OptionalDeviceGuard device_guard(input.device());
  // The kernels run below autograd; the ATen calls inside them must too.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_grad_output(op, grad_output, input, p);
  const ConvGeometry& g = p.geometry;
  if (is_empty_problem(p)) return in_input_layout(at::zeros(input.sizes(), input.options()), input);
  const at::Tensor go =
      grad_output.contiguous().view({p.batch, p.out_channels, g.out_plane()});
  // (G, Cg*KH*KW, Cout/G): the transposed weight of each group.
  const at::Tensor wt = weight.contiguous()
                            .view({groups, p.out_channels / groups, -1})
                            .transpose(1, 2);
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  if (uses_direct_grad_input(backend, p, input.scalar_type())) {
    backend.direct_grad_input(go.view({p.batch, p.out_channels, g.h.out_size, g.w.out_size}),
                              weight.contiguous(), g, groups, grad_input);
    return in_input_layout(grad_input, input);
  }
  if (const auto t = grad_input_as_forward(backend, p, input.scalar_type())) {
    grad_input_by_forward(backend, p, *t,
                          go.view({p.batch, p.out_channels, g.h.out_size, g.w.out_size}),
                          weight.contiguous(), grad_input);
    return in_input_layout(grad_input, input);
  }
  if (!backend.gemm_per_thread) {
    batched_grad_input(backend, p, go, wt, grad_input);
    return in_input_layout(grad_input, input);
  }
  const int64_t samples = samples_per_gemm(g, input.element_size());
  for_each_chunk(p, input.options(), chunk_count(p, samples), samples, g.out_plane(),
                 [&](int64_t, int64_t n0, int64_t count, const ChunkBuffers& buffers) {
    const at::Tensor cols = buffers.cols.narrow(0, 0, count * g.cols_per_sample())
                                .view({groups, -1, count * g.out_plane()});
    // grad output of the chunk as (C_out, count * Ho*Wo): one GEMM per group.
    const at::Tensor go_chunk = buffers.side_by_side(p, go, n0, count);
    const at::Tensor go_groups = go_chunk.view({groups, -1, count * g.out_plane()});
    for (int64_t grp = 0; grp < groups; ++grp) {
      at::Tensor dst = cols.select(0, grp);
      at::mm_out(dst, wt.select(0, grp), go_groups.select(0, grp));
    }
    backend.col2im(cols.view({g.col_rows(), count, g.out_plane()}),
                   grad_input.narrow(0, n0, count), g);
  });
  return in_input_layout(grad_input, input);
}

at::Tensor padded_conv2d_grad_weight(const ConvBackend& backend, const at::Tensor& grad_output,
                                     const at::Tensor& input, const at::Tensor& weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups,
                                     std::string_view padding_mode) {
  constexpr const char* op = "padded_conv2d_grad_weight";
  const ConvProblem p =
      check_problem(op, backend, input, weight, stride, padding, dilation, groups, padding_mode);
  const c10::OptionalDeviceGuard device_guard(input.device());
  // The kernels run below autograd; the ATen calls inside them must too.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_grad_output(op, grad_output, input, p);
  const ConvGeometry& g = p.geometry;
  if (is_empty_problem(p)) return at::zeros(weight.sizes(), weight.options());
  const at::Tensor x = input.contiguous();
  const at::Tensor go =
      grad_output.contiguous().view({p.batch, p.out_channels, g.out_plane()});
  if (uses_direct_grad_weight(backend, p, x.scalar_type())) {
    return backend.direct_grad_weight(go.view({p.batch, p.out_channels, g.h.out_size,
                                               g.w.out_size}),
                                      x, g, groups, block_count(backend, p));
  }
  if (!backend.gemm_per_thread) return batched_grad_weight(backend, p, go, x, weight);
  // Each block of samples (blocks set by the batch size alone) sums its
  // products into its own partial with the backend's fixed-order product; the
  // partials are then added in block order: results do not depend on threads.
  TORCH_INTERNAL_ASSERT(backend.accumulate_grad_weight != nullptr);
  // Kept transposed, (C*KH*KW / G, C_out / G) per group, as the kernel writes it.
  const at::Tensor partials =
      at::zeros({block_count(backend, p), groups, g.col_rows() / groups, p.out_channels / groups},
                input.options());
  const int64_t samples = samples_per_gemm(g, x.element_size());
  const int64_t plane = tile_rows(g, x.element_size()) * g.w.out_size;
  for_each_chunk(p, x.options(), block_count(backend, p), samples, plane,
                 [&](int64_t block, int64_t n0, int64_t count, const ChunkBuffers& buffers) {
    // grad output of the chunk as (C_out, count * Ho*Wo), matching the columns.
    const at::Tensor go_chunk = buffers.side_by_side(p, go, n0, count);
    for_each_row_tile(g, count, buffers.cols, [&](int64_t first, const ConvGeometry& tile,
                                                  const at::Tensor& cols) {
      backend.im2col(x.narrow(0, n0, count), cols, tile);
      const at::Tensor col_groups = cols.view({groups, -1, count * tile.out_plane()});
      const at::Tensor go_groups = go_chunk.view({groups, -1, count * g.out_plane()})
                                       .narrow(2, first * g.w.out_size, count * tile.out_plane());
      for (int64_t grp = 0; grp < groups; ++grp) {
        backend.accumulate_grad_weight(go_groups.select(0, grp), col_groups.select(0, grp),
                                       partials.select(0, block).select(0, grp));
      }
    });
  });
  return partials.sum(0).transpose(1, 2).contiguous().view(weight.sizes());
}

LaunchPlan plan_batched(std::string_view which, const at::Tensor& input, const at::Tensor& weight,
                        bool has_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, std::string_view padding_mode) {
  constexpr const char* op = "padded_conv2d_launch_plan";
  const ConvBackend any_dtype{"any device", [](at::ScalarType) { return true; }, nullptr, nullptr,
                              nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                              nullptr, nullptr, false};
  const ConvProblem p = check_problem(op, any_dtype, input, weight, stride, padding, dilation,
                                      groups, padding_mode);
  return make_plan(which, p, input.scalar_type(), has_bias);
}

std::string kernel_path(const ConvBackend& backend, std::string_view which,
                        const at::Tensor& input, const at::Tensor& weight,
                        at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, std::string_view padding_mode) {
  TORCH_CHECK_VALUE(which == "forward" || which == "grad_input" || which == "grad_weight",
                    "padded_conv2d_cpu_path: `which` must be 'forward', 'grad_input' or "
                    "'grad_weight', got '", which, "'");
  const ConvProblem p = check_problem("padded_conv2d", backend, input, weight, stride, padding,
                                      dilation, groups, padding_mode);
  const at::ScalarType dtype = input.scalar_type();
  if (is_empty_problem(p)) return "gemm";
  if (which == "forward") return uses_direct_forward(backend, p, dtype) ? "direct" : "gemm";
  if (which == "grad_weight") return uses_direct_grad_weight(backend, p, dtype) ? "direct" : "gemm";
  if (uses_direct_grad_input(backend, p, dtype)) return "direct";
  if (const auto t = grad_input_as_forward(backend, p, dtype)) {
    return t->folded ? "transposed_forward_folded" : "transposed_forward";
  }
  return "gemm";
}

// [chunk, chunks, launches, GEMM launches] of the batched path (what the CUDA
// backend runs); shapes and dtype are read from the tensors (meta tensors do).
std::vector<int64_t> launch_plan_counts(c10::string_view which, const at::Tensor& input,
                                        const at::Tensor& weight, bool has_bias,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups,
                                        c10::string_view padding_mode) {
  const LaunchPlan plan = plan_batched(which, input, weight, has_bias, stride, padding, dilation,
                                       groups, padding_mode);
  const auto gemms = std::count_if(plan.launches.begin(), plan.launches.end(),
                                   [](const std::string& l) { return l.rfind("gemm", 0) == 0; });
  return {plan.chunk, plan.chunks, static_cast<int64_t>(plan.launches.size()), gemms};
}

TORCH_LIBRARY_FRAGMENT(pyattn, m) {
  m.def("padded_conv2d_launch_plan(str which, Tensor input, Tensor weight, bool has_bias, "
        "int[2] stride, int[4] padding, int[2] dilation, int groups, str padding_mode) -> int[]",
        &launch_plan_counts);
}

}  // namespace pyattn

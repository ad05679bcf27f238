// CUDA implementations of lldif_native::depthwise_conv3x3_{fwd,bwd} (schemas come from the CPU extension).
// Argument checks and the problem view are shared with the CPU backend (../common), so both accept the same
// inputs; this file adds the CUDA-only limits, launches, and sums the backward's per-tile dweight/dbias
// partials. The kernels are in depthwise_conv3x3.cu, which has no torch headers, so tensors cross as raw
// pointers.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../common/depthwise_conv3x3.h"
#include "glue_device.h"
#include "depthwise_conv3x3_launch.h"

namespace lldif_kernels {
namespace {

DwcShape shape_of(const dwc::Problem& p) {
  return {p.batch, p.channels, p.height, p.width, p.channels_inner, p.gate};
}

// The kernels index channels, rows and columns with int and put all blocks on the x dimension of the grid.
void check_kernel_limits(const dwc::Problem& p, ElementType dtype, bool backward) {
  const int64_t extent = depthwise_conv3x3_max_extent();
  TORCH_CHECK_VALUE(p.channels <= extent && p.height <= extent && p.width <= extent, "depthwise_conv3x3: x of C=",
                    p.channels, ", H=", p.height, ", W=", p.width, " exceeds the CUDA kernels' limit of ", extent,
                    " on each");
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(depthwise_conv3x3_blocks(dtype, shape_of(p), backward) <= kIntMax,
                    "depthwise_conv3x3: x of shape (", p.batch, ", ", p.channels, ", ", p.height, ", ", p.width,
                    ") needs more than ", kIntMax, " blocks, the CUDA kernels' grid limit");
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "depthwise_conv3x3: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

const void* bias_pointer(const dwc::Problem& p) { return p.bias.defined() ? p.bias.const_data_ptr() : nullptr; }

at::Tensor depthwise_conv3x3_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 bool gate) {
  const ElementType dtype = glue::checked_element_type(x, "depthwise_conv3x3", "x");
  glue::DeviceGuard guard(x.device());
  const dwc::Problem p = dwc::make_problem(x, weight, bias, gate);
  check_kernel_limits(p, dtype, false);
  at::Tensor out = dwc::new_output(p);
  if (out.numel() == 0) return out;
  check_launch(depthwise_conv3x3_fwd_cuda(dtype, shape_of(p), p.x.const_data_ptr(), p.weight.const_data_ptr(),
                                          bias_pointer(p), out.data_ptr(), glue::current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv3x3_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                                     const at::Tensor& weight,
                                                                     const std::optional<at::Tensor>& bias,
                                                                     bool gate) {
  const ElementType dtype = glue::checked_element_type(x, "depthwise_conv3x3", "x");
  glue::DeviceGuard guard(x.device());
  const dwc::Problem p = dwc::make_problem(x, weight, bias, gate);
  check_kernel_limits(p, dtype, true);
  const at::Tensor g = dwc::grad_like_output(dy, p);
  at::Tensor dx = at::empty_like(p.x);
  // (B, tiles, 10, C) partials in the accumulation type, every element written by the kernel, so no zero
  // fill. An empty x gives empty partials (B, C or tiles = 0), whose sums below are zeros.
  const auto acc = p.x.options().dtype(p.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const int64_t tiles = depthwise_conv3x3_bwd_tiles(dtype, shape_of(p));
  at::Tensor partials = at::empty({p.batch, tiles, 10, p.channels}, acc);
  if (dx.numel() > 0) {
    check_launch(depthwise_conv3x3_bwd_cuda(dtype, shape_of(p), g.const_data_ptr(), p.x.const_data_ptr(),
                                            p.weight.const_data_ptr(), bias_pointer(p), dx.data_ptr(),
                                            partials.data_ptr(), glue::current_stream()));
  }
  // ATen's sum reduces in a fixed order (no atomics), so dweight and dbias stay bitwise repeatable.
  const at::Tensor sums = partials.sum(at::IntArrayRef{0, 1});
  // Both are copies, never views of sums: outputs of an op may not alias each other, and a view would carry
  // a storage offset.
  const at::Tensor dweight =
      sums.narrow(0, 0, 9).t().contiguous().view({p.channels, 1, 3, 3}).to(p.x.scalar_type());
  const at::Tensor dbias = sums.select(0, 9).to(p.x.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace lldif_kernels

LLDIF_CUDA_KERNELS_IMPL(m) {
  m.impl("depthwise_conv3x3_fwd", TORCH_FN(lldif_kernels::depthwise_conv3x3_fwd));
  m.impl("depthwise_conv3x3_bwd", TORCH_FN(lldif_kernels::depthwise_conv3x3_bwd));
}

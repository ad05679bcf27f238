// CUDA implementations of lldif_native::modulated_layer_norm_{fwd,bwd} (schemas come from the CPU extension).
// Argument checks and the (B, C, P) view are shared with the CPU backend (../common), so both accept the same
// inputs; this file adds the CUDA-only limits, launches, and sums the kernels' per-tile da/de partials.
// The kernels are in modulated_layer_norm.cu, which has no torch headers, so tensors cross as raw pointers.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/modulated_layer_norm.h"
#include "glue_device.h"
#include "modulated_layer_norm_launch.h"

namespace lldif_kernels {
namespace {

// The kernels index channels with int and launch one block per (sample, tile of positions) on a 1-D grid.
void check_kernel_limits(const mln::Problem& p) {
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(p.channels <= kIntMax, "modulated_layer_norm: C=", p.channels,
                    " exceeds the CUDA kernel's limit of ", kIntMax);
  TORCH_CHECK_VALUE(p.batch * modulated_layer_norm_position_tiles(p.positions) <= kIntMax,
                    "modulated_layer_norm: B=", p.batch, " times ", p.positions,
                    " positions exceeds the CUDA kernel's grid limit");
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "modulated_layer_norm: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor modulated_layer_norm_fwd(const at::Tensor& x, const at::Tensor& a, const at::Tensor& e, double eps,
                                    bool bias_free) {
  const ElementType dtype = glue::checked_element_type(x, "modulated_layer_norm", "x");
  glue::DeviceGuard guard(x.device());
  const mln::Problem p = mln::make_problem(x, a, eps);
  check_kernel_limits(p);
  const at::Tensor a_c = mln::modulation(a, a, "a"), e_c = mln::modulation(e, a, "e");
  at::Tensor y = at::empty_like(p.x);
  if (y.numel() == 0) return y;
  check_launch(modulated_layer_norm_fwd_cuda(dtype, p.x.data_ptr(), a_c.data_ptr(), e_c.data_ptr(),
                                             y.data_ptr(), p.batch, p.channels, p.positions, p.channels_inner,
                                             eps, bias_free, glue::current_stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                                        const at::Tensor& a, double eps,
                                                                        bool bias_free) {
  const ElementType dtype = glue::checked_element_type(x, "modulated_layer_norm", "x");
  glue::DeviceGuard guard(x.device());
  const mln::Problem p = mln::make_problem(x, a, eps);
  check_kernel_limits(p);
  const at::Tensor a_c = mln::modulation(a, a, "a");
  const at::Tensor g = mln::grad_like(dy, p.x);  // the kernel indexes dy with x's strides
  at::Tensor dx = at::empty_like(p.x);
  // (B, tiles, C) partials in a's dtype, every element written by the kernel, so no zero fill. An empty x
  // gives empty partials (B, C or tiles = 0), whose sums below are zeros of shape (B, C).
  const int64_t tiles = modulated_layer_norm_position_tiles(p.positions);
  at::Tensor da_partials = at::empty({p.batch, tiles, p.channels}, a_c.options());
  at::Tensor de_partials = at::empty({p.batch, tiles, p.channels}, a_c.options());
  if (dx.numel() > 0) {
    check_launch(modulated_layer_norm_bwd_cuda(dtype, g.data_ptr(), p.x.data_ptr(), a_c.data_ptr(), dx.data_ptr(),
                                               da_partials.data_ptr(), de_partials.data_ptr(), p.batch,
                                               p.channels, p.positions, p.channels_inner, eps, bias_free,
                                               glue::current_stream()));
  }
  // ATen's sum reduces in a fixed order (no atomics), so da/de stay bitwise repeatable.
  return {dx, da_partials.sum(1), de_partials.sum(1)};
}

}  // namespace
}  // namespace lldif_kernels

LLDIF_CUDA_KERNELS_IMPL(m) {
  m.impl("modulated_layer_norm_fwd", TORCH_FN(lldif_kernels::modulated_layer_norm_fwd));
  m.impl("modulated_layer_norm_bwd", TORCH_FN(lldif_kernels::modulated_layer_norm_bwd));
}

// CUDA implementations of lldif_native::window_cross_attention_{fwd,bwd} (schemas come from the CPU extension).
// Argument checks and the problem view are shared with the CPU backend (../common), so both accept the same
// inputs; this file adds the CUDA-only limits, allocates the outputs and the backward's workspace and
// launches the kernels. The kernels are in window_cross_attention.cu, which has no torch headers, so tensors
// cross as raw pointers.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/window_cross_attention.h"
#include "glue_device.h"
#include "window_cross_attention_launch.h"

namespace lldif_kernels {
namespace {

WcaShape shape_of(const wca::Problem& p) {
  const auto strides = [](const wca::Strides& s) { return WcaStrides{s.window, s.head, s.token}; };
  return {p.windows, p.query_windows, p.heads, p.tokens, p.dim, p.window_size,
          strides(p.q_strides), strides(p.k_strides), strides(p.v_strides)};
}

// The kernels keep a row's channels in registers (d <= max_dim), index tokens and table rows with int, put
// windows · heads on the x dimension of the grid, tiles of a window's rows on its y dimension, and heads on the
// y dimension of the dtable reduction.
void check_kernel_limits(const wca::Problem& p, ElementType dtype) {
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  constexpr int64_t kGridYMax = 65535;
  TORCH_CHECK_VALUE(p.dim <= window_cross_attention_max_dim(), "window_cross_attention: d=", p.dim,
                    " channels per head; the CUDA kernels take at most ", window_cross_attention_max_dim());
  TORCH_CHECK_VALUE(p.windows * p.heads <= kIntMax && p.windows * p.heads * p.tokens / 8 < kIntMax &&
                        wca::table_rows(p.window_size) <= kIntMax && p.heads <= kGridYMax,
                    "window_cross_attention: W=", p.windows, ", heads=", p.heads, " and window_size=",
                    p.window_size, " exceed the CUDA kernels' grid limits");
  const int64_t row_tiles = window_cross_attention_row_tiles(dtype, p.dim, p.tokens);
  TORCH_CHECK_VALUE(row_tiles <= kGridYMax, "window_cross_attention: M=", p.tokens, " tokens per window (window_size=",
                    p.window_size, ") make ", row_tiles, " row tiles on the y dimension of the CUDA kernels' grid, "
                    "which allows at most ", kGridYMax);
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "window_cross_attention: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> window_cross_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& table,
                                                              int64_t window_size, double scale) {
  const ElementType dtype = glue::checked_element_type(k, "window_cross_attention", "k");
  glue::DeviceGuard guard(k.device());
  const wca::Problem p = wca::make_problem(q, k, v, table, window_size, scale);
  check_kernel_limits(p, dtype);
  at::Tensor out = at::empty(p.k.sizes(), p.k.options());
  at::Tensor lse = at::empty({p.windows, p.heads, p.tokens}, p.k.options().dtype(p.acc));
  check_launch(window_cross_attention_fwd_cuda(dtype, shape_of(p), p.q.const_data_ptr(), p.k.const_data_ptr(),
                                               p.v.const_data_ptr(), p.table.const_data_ptr(), out.data_ptr(),
                                               lse.data_ptr(), scale, glue::current_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_cross_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
    const at::Tensor& out, const at::Tensor& lse, int64_t window_size, double scale, bool need_dq) {
  const ElementType dtype = glue::checked_element_type(k, "window_cross_attention", "k");
  glue::DeviceGuard guard(k.device());
  const wca::Problem p = wca::make_problem(q, k, v, table, window_size, scale);
  check_kernel_limits(p, dtype);
  const wca::Saved saved = wca::saved_tensors(dout, out, lse, p);
  at::Tensor dq = need_dq ? at::empty(p.q.sizes(), p.q.options()) : at::empty({0}, p.q.options());
  at::Tensor dk = at::empty(p.k.sizes(), p.k.options());
  at::Tensor dv = at::empty(p.k.sizes(), p.k.options());
  at::Tensor dtable = at::empty(p.table.sizes(), p.table.options());
  if (p.windows == 0 || p.heads == 0) {
    // dtable is an empty sum; the other gradients have no elements.
    dtable.zero_();
    return {dq, dk, dv, dtable};
  }
  const WcaShape shape = shape_of(p);
  const int64_t workspace_elems = window_cross_attention_workspace_elems(dtype, shape);
  TORCH_CHECK(workspace_elems >= 0, "window_cross_attention: could not query the CUDA device for the backward");
  // Every element the kernels read is written by them first (no zero fill).
  at::Tensor workspace = at::empty({workspace_elems}, p.table.options());
  check_launch(window_cross_attention_bwd_cuda(
      dtype, shape, saved.dout.const_data_ptr(), p.q.const_data_ptr(), p.k.const_data_ptr(), p.v.const_data_ptr(),
      p.table.const_data_ptr(), saved.out.const_data_ptr(), saved.lse.const_data_ptr(),
      need_dq ? dq.data_ptr() : nullptr, dk.data_ptr(), dv.data_ptr(), dtable.data_ptr(), workspace.data_ptr(),
      scale, glue::current_stream()));
  return {dq, dk, dv, dtable};
}

}  // namespace
}  // namespace lldif_kernels

LLDIF_CUDA_KERNELS_IMPL(m) {
  m.impl("window_cross_attention_fwd", TORCH_FN(lldif_kernels::window_cross_attention_fwd));
  m.impl("window_cross_attention_bwd", TORCH_FN(lldif_kernels::window_cross_attention_bwd));
}

// CUDA implementations of lldif_native::channel_attention_{fwd,bwd} (schemas come from the CPU extension).
// Argument checks and the problem view are shared with the CPU backend (../common), so both accept the same
// inputs; this file adds the CUDA-only limits, allocates the kernels' workspaces and launches them.
// The kernels are in channel_attention.cu, which has no torch headers, so tensors cross as raw pointers.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/channel_attention.h"
#include "glue_device.h"
#include "channel_attention_launch.h"

namespace lldif_kernels {
namespace {

ChaShape shape_of(const cha::Problem& p) {
  return {p.batch, p.heads, p.dim, p.positions, {p.stride_batch, p.stride_head, p.stride_dim}};
}

// The kernels keep a pair's d x d rows in shared memory and registers, index rows with int, and put
// (pair, N-split) and (pair, N-tile) on the x dimension of the grid.
void check_kernel_limits(const cha::Problem& p, ElementType dtype) {
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(p.dim <= channel_attention_max_dim(), "channel_attention: q has d=", p.dim,
                    " channels per head; the CUDA kernels take at most ", channel_attention_max_dim());
  const int64_t pairs = p.batch * p.heads;
  const int64_t blocks = pairs * std::max(channel_attention_splits(p.batch, p.heads, p.positions),
                                          channel_attention_position_tiles(dtype, p.positions));
  TORCH_CHECK_VALUE(blocks <= kIntMax, "channel_attention: q of B=", p.batch, ", heads=", p.heads, " and N=",
                    p.positions, " positions exceeds the CUDA kernels' grid limit");
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "channel_attention: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_fwd(const at::Tensor& q,
                                                                                 const at::Tensor& k,
                                                                                 const at::Tensor& v,
                                                                                 const at::Tensor& temperature) {
  const ElementType dtype = glue::checked_element_type(q, "channel_attention", "q");
  glue::DeviceGuard guard(q.device());
  const cha::Problem p = cha::make_problem(q, k, v, temperature);
  check_kernel_limits(p, dtype);
  const at::Tensor tau = temperature.contiguous();
  const auto acc = p.q.options().dtype(p.acc);
  at::Tensor out = at::empty(p.q.sizes(), p.q.options());
  at::Tensor cosine = at::empty({p.batch, p.heads, p.dim, p.dim}, acc);
  at::Tensor q_norm = at::empty({p.batch, p.heads, p.dim}, acc);
  at::Tensor k_norm = at::empty({p.batch, p.heads, p.dim}, acc);
  if (out.numel() == 0) {
    // N = 0: the Gram and the norms are empty sums, so the norms sit at the clamp and the cosine is 0.
    cosine.zero_();
    q_norm.fill_(cha::kNormEps);
    k_norm.fill_(cha::kNormEps);
    return {out, cosine, q_norm, k_norm};
  }
  // Workspaces, every element written by the kernels (no zero fill).
  const int64_t pairs = p.batch * p.heads;
  const int64_t splits = channel_attention_splits(p.batch, p.heads, p.positions);
  at::Tensor gram_partials = at::empty({pairs, splits, p.dim, p.dim}, acc);
  at::Tensor sq_partials = at::empty({pairs, splits, p.dim}, acc);
  at::Tensor sk_partials = at::empty({pairs, splits, p.dim}, acc);
  at::Tensor probs = at::empty({pairs, p.dim, p.dim}, acc);
  check_launch(channel_attention_fwd_cuda(
      dtype, shape_of(p), p.q.const_data_ptr(), p.k.const_data_ptr(), p.v.const_data_ptr(), tau.const_data_ptr(),
      out.data_ptr(), cosine.data_ptr(), q_norm.data_ptr(), k_norm.data_ptr(), gram_partials.data_ptr(),
      sq_partials.data_ptr(), sk_partials.data_ptr(), probs.data_ptr(), cha::kNormEps,
      glue::current_stream()));
  return {out, cosine, q_norm, k_norm};
}

at::Tensor channel_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& temperature, const at::Tensor& cosine,
                                 const at::Tensor& q_norm, const at::Tensor& k_norm, at::Tensor& dq, at::Tensor& dk,
                                 at::Tensor& dv) {
  const ElementType dtype = glue::checked_element_type(q, "channel_attention", "q");
  glue::DeviceGuard guard(q.device());
  const cha::Problem p = cha::make_problem(q, k, v, temperature);
  check_kernel_limits(p, dtype);
  const at::Tensor g = cha::grad_of_out(dout, p);
  const at::Tensor c = cha::saved(cosine, p, {p.batch, p.heads, p.dim, p.dim}, "cosine");
  const at::Tensor nq = cha::saved(q_norm, p, {p.batch, p.heads, p.dim}, "q_norm");
  const at::Tensor nk = cha::saved(k_norm, p, {p.batch, p.heads, p.dim}, "k_norm");
  const cha::Grads grads = cha::grad_outputs(dq, dk, dv, p);
  const at::Tensor tau = temperature.contiguous();
  const auto acc = c.options();
  at::Tensor dtemperature = at::empty({p.batch, p.heads}, acc);
  if (p.q.numel() == 0) {
    // dτ is an empty sum; dq, dk, dv have no elements.
    dtemperature.zero_();
    return dtemperature;
  }
  // Workspaces, every element written by the kernels (no zero fill).
  const int64_t pairs = p.batch * p.heads;
  const int64_t splits = channel_attention_splits(p.batch, p.heads, p.positions);
  at::Tensor dp_partials = at::empty({pairs, splits, p.dim, p.dim}, acc);
  at::Tensor coef = at::empty({pairs, 3, p.dim, p.dim}, acc);
  at::Tensor diag = at::empty({pairs, 2, p.dim}, acc);
  check_launch(channel_attention_bwd_cuda(
      dtype, shape_of(p), g.const_data_ptr(), p.q.const_data_ptr(), p.k.const_data_ptr(), p.v.const_data_ptr(),
      tau.const_data_ptr(), c.const_data_ptr(), nq.const_data_ptr(), nk.const_data_ptr(), grads.dq.data_ptr(),
      grads.dk.data_ptr(), grads.dv.data_ptr(), {grads.stride_batch, grads.stride_head, grads.stride_dim},
      dtemperature.data_ptr(), dp_partials.data_ptr(), coef.data_ptr(), diag.data_ptr(), cha::kNormEps,
      glue::current_stream()));
  return dtemperature;
}

}  // namespace
}  // namespace lldif_kernels

LLDIF_CUDA_KERNELS_IMPL(m) {
  m.impl("channel_attention_fwd", TORCH_FN(lldif_kernels::channel_attention_fwd));
  m.impl("channel_attention_bwd", TORCH_FN(lldif_kernels::channel_attention_bwd));
}

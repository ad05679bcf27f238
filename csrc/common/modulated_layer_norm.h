// Argument checks and the (B, C, P) view shared by the CPU kernels and the CUDA glue of
// modulated_layer_norm, so both backends accept exactly the same inputs.
#pragma once

#include <ATen/ATen.h>

namespace lldif_kernels::mln {

// The op schemas (lldif_native::*, and the test-only lldif_cuda_emulated::* of tests/cuda_host).
constexpr const char* kForwardSchema =
    "modulated_layer_norm_fwd(Tensor x, Tensor a, Tensor e, float eps, bool bias_free) -> Tensor";
constexpr const char* kBackwardSchema =
    "modulated_layer_norm_bwd(Tensor dy, Tensor x, Tensor a, float eps, bool bias_free) -> (Tensor, "
    "Tensor, Tensor)";

// An activation seen as (batch, channels, positions), dense in one of two layouts (batch stride C*P):
// channels-inner (channel stride 1: tokens, channels_last) or planar (position stride 1: NCHW).
struct Problem {
  at::Tensor x;  // x itself when already dense in a served layout, else a contiguous copy
  int64_t batch = 0, channels = 0, positions = 0;
  bool channels_inner = false;
};

inline Problem make_problem(const at::Tensor& x, const at::Tensor& a, double eps) {
  TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4,
                    "modulated_layer_norm: x must be (B, N, C) or (B, C, H, W), got rank ", x.dim());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "modulated_layer_norm: x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(eps > 0, "modulated_layer_norm: eps must be > 0, got ", eps);
  Problem p;
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() &&
                             x.is_contiguous(at::MemoryFormat::ChannelsLast);
  p.x = channels_last ? x : x.contiguous();
  p.channels_inner = x.dim() == 3 || channels_last;
  p.batch = x.size(0);
  p.channels = x.dim() == 3 ? x.size(2) : x.size(1);
  p.positions = x.dim() == 3 ? x.size(1) : x.size(2) * x.size(3);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == p.batch && a.size(1) == p.channels,
                    "modulated_layer_norm: a must be (B, C) = (", p.batch, ", ", p.channels, "), got ", a.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == acc, "modulated_layer_norm: a must be ", acc, " for x of ",
                   x.scalar_type(), ", got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.device() == x.device(), "modulated_layer_norm: a is on ", a.device(), ", x on ", x.device());
  return p;
}

// A modulation tensor (a or e) checked against the problem and made contiguous.
inline at::Tensor modulation(const at::Tensor& t, const at::Tensor& a, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == a.sizes(), "modulated_layer_norm: ", name, " must have a's shape ", a.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == a.scalar_type(), "modulated_layer_norm: ", name, " must be ",
                   a.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == a.device(), "modulated_layer_norm: ", name, " is on ", t.device(), ", a on ",
                    a.device());
  return t.contiguous();
}

// The incoming gradient with exactly x's strides: gradients often arrive as stride-0 expands.
inline at::Tensor grad_like(const at::Tensor& dy, const at::Tensor& x) {
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "modulated_layer_norm: dy must have x's shape ", x.sizes(), ", got ",
                    dy.sizes());
  TORCH_CHECK_VALUE(dy.device() == x.device(), "modulated_layer_norm: dy is on ", dy.device(), ", x on ",
                    x.device());
  if (dy.strides() == x.strides() && dy.scalar_type() == x.scalar_type()) return dy;
  return at::empty_like(x).copy_(dy);
}

}  // namespace lldif_kernels::mln

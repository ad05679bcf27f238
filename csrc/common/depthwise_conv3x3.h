// Argument checks and the problem view shared by the CPU kernels and the CUDA glue of depthwise_conv3x3,
// so both backends accept exactly the same inputs.
//
// Contract of lldif_native::depthwise_conv3x3_{fwd,bwd} (every backend, Triton included):
//   x       (B, C, H, W), contiguous (planar) or channels_last (channels inner); other strides are copied
//   weight  (C, 1, 3, 3), nn.Conv2d's depth-wise weight, in x's dtype
//   bias    (C,) in x's dtype, or None
//   gate    false: out = y = conv(x) (3x3, padding 1, one filter per channel), (B, C, H, W);
//           true:  out = gelu(y[:, :C/2]) * y[:, C/2:] (exact erf GELU), (B, C/2, H, W); C must be even
//   fwd -> out in x's dtype and layout; y is accumulated in float32 (float64 for float64 x) and never stored
//   bwd -> (dx like x, dweight (C, 1, 3, 3), dbias (C,)), both in x's dtype; dy has out's shape. The gated
//          backward recomputes y from x. dweight and dbias are sums over (sample, position) reduced in a
//          fixed order (bitwise repeatable); dbias is returned even when bias is None.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

namespace lldif_kernels::dwc {

// The op schemas (lldif_native::*, and the test-only lldif_cuda_emulated::* of tests/cuda_host).
constexpr const char* kForwardSchema =
    "depthwise_conv3x3_fwd(Tensor x, Tensor weight, Tensor? bias, bool gate) -> Tensor";
constexpr const char* kBackwardSchema =
    "depthwise_conv3x3_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? bias, bool gate) -> (Tensor, Tensor, "
    "Tensor)";

struct Problem {
  at::Tensor x;       // x itself when dense in a served layout, else a contiguous copy
  at::Tensor weight;  // (C, 9) contiguous
  at::Tensor bias;    // (C,) contiguous, or undefined
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  bool channels_inner = false;  // channels_last: the C values of a pixel are adjacent
  bool gate = false;
  int64_t out_channels() const { return gate ? channels / 2 : channels; }
};

inline Problem make_problem(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            bool gate) {
  TORCH_CHECK_VALUE(x.dim() == 4, "depthwise_conv3x3: x must be (B, C, H, W), got shape ", x.sizes());
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                   "depthwise_conv3x3: x must be float32, float16, bfloat16 or float64, got ", t);
  Problem p;
  p.batch = x.size(0), p.channels = x.size(1), p.height = x.size(2), p.width = x.size(3);
  p.gate = gate;
  TORCH_CHECK_VALUE(!gate || p.channels % 2 == 0, "depthwise_conv3x3: gate needs an even number of channels "
                    "(gelu of the first half times the second), got C=", p.channels);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == p.channels && weight.size(1) == 1 &&
                        weight.size(2) == 3 && weight.size(3) == 3,
                    "depthwise_conv3x3: weight must be (C, 1, 3, 3) = (", p.channels, ", 1, 3, 3), got ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == t, "depthwise_conv3x3: weight must be ", t, " like x, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "depthwise_conv3x3: weight is on ", weight.device(), ", x on ",
                    x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.channels, "depthwise_conv3x3: bias must be (C,) = (",
                      p.channels, ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == t, "depthwise_conv3x3: bias must be ", t, " like x, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "depthwise_conv3x3: bias is on ", bias->device(), ", x on ",
                      x.device());
    p.bias = bias->contiguous();
  }
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  p.x = channels_last ? x : x.contiguous();
  p.channels_inner = channels_last;
  p.weight = weight.reshape({p.channels, 9}).contiguous();
  return p;
}

// An empty output of the problem, in x's dtype and layout.
inline at::Tensor new_output(const Problem& p) {
  return at::empty({p.batch, p.out_channels(), p.height, p.width},
                   p.x.options().memory_format(p.channels_inner ? at::MemoryFormat::ChannelsLast
                                                                : at::MemoryFormat::Contiguous));
}

// The incoming gradient laid out as the output is (gradients often arrive as stride-0 expands).
inline at::Tensor grad_like_output(const at::Tensor& dy, const Problem& p) {
  const std::array<int64_t, 4> shape{p.batch, p.out_channels(), p.height, p.width};
  const at::IntArrayRef expected(shape);
  TORCH_CHECK_VALUE(dy.sizes() == expected, "depthwise_conv3x3: dy must have the output's shape ", expected,
                    ", got ", dy.sizes());
  TORCH_CHECK_VALUE(dy.device() == p.x.device(), "depthwise_conv3x3: dy is on ", dy.device(), ", x on ",
                    p.x.device());
  const auto format = p.channels_inner ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (dy.is_contiguous(format) && dy.scalar_type() == p.x.scalar_type()) return dy;
  return dy.to(p.x.scalar_type()).contiguous(format);
}

}  // namespace lldif_kernels::dwc

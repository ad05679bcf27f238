// Argument checks and the problem view shared by the CPU kernels and the CUDA glue of channel_attention,
// so both backends accept exactly the same inputs.
//
// Contract of lldif_native::channel_attention_{fwd,bwd} (every backend, Triton included):
//   q, k, v      (B, heads, d, N), equal sizes and strides, position stride 1 (the packed qkv of a
//                depth-wise conv output is served as three views, without copies)
//   temperature  (heads,) in the accumulation dtype: float32, or float64 for float64 inputs
//   fwd -> out (B, heads, d, N) contiguous in q's dtype; cosine = q̂ k̂ᵀ (B, heads, d, d), q_norm and
//          k_norm (B, heads, d): the norms over N clamped at kNormEps, all in the accumulation dtype
//   bwd    writes dq, dk, dv into the given tensors: q's shape and dtype, equal strides, position stride 1
//          (three tensors, or three views of one packed gradient); returns dtemperature (B, heads) per
//          (sample, head) in the accumulation dtype, summed over samples by the caller
#pragma once

#include <ATen/ATen.h>

namespace lldif_kernels::cha {

// The op schemas (lldif_native::*, and the test-only lldif_cuda_emulated::* of tests/cuda_host).
constexpr const char* kForwardSchema =
    "channel_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor temperature) -> (Tensor, Tensor, Tensor, "
    "Tensor)";
constexpr const char* kBackwardSchema =
    "channel_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor temperature, Tensor cosine, "
    "Tensor q_norm, Tensor k_norm, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> Tensor";

// F.normalize's clamp on the norm; a clamped row takes no gradient through its norm.
constexpr double kNormEps = 1e-12;

struct Problem {
  at::Tensor q, k, v;
  int64_t batch = 0, heads = 0, dim = 0, positions = 0;
  int64_t stride_batch = 0, stride_head = 0, stride_dim = 0;  // shared by q, k, v; position stride is 1
  at::ScalarType acc = at::kFloat;
};

inline Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& temperature) {
  TORCH_CHECK_VALUE(q.dim() == 4, "channel_attention: q must be (B, heads, d, N), got shape ", q.sizes());
  const at::ScalarType t = q.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                   "channel_attention: q must be float32, float16, bfloat16 or float64, got ", t);
  Problem p;
  p.acc = t == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [name, x] : {std::pair{"k", &k}, std::pair{"v", &v}}) {
    TORCH_CHECK_VALUE(x->sizes() == q.sizes(), "channel_attention: ", name, " must have q's shape ", q.sizes(),
                      ", got ", x->sizes());
    TORCH_CHECK_TYPE(x->scalar_type() == t, "channel_attention: ", name, " must be ", t, " like q, got ",
                     x->scalar_type());
    TORCH_CHECK_VALUE(x->device() == q.device(), "channel_attention: ", name, " is on ", x->device(), ", q on ",
                      q.device());
  }
  const bool shared_strides = q.stride(3) == 1 && k.strides() == q.strides() && v.strides() == q.strides();
  p.q = shared_strides ? q : q.contiguous();
  p.k = shared_strides ? k : k.contiguous();
  p.v = shared_strides ? v : v.contiguous();
  p.batch = q.size(0), p.heads = q.size(1), p.dim = q.size(2), p.positions = q.size(3);
  p.stride_batch = p.q.stride(0), p.stride_head = p.q.stride(1), p.stride_dim = p.q.stride(2);
  TORCH_CHECK_VALUE(temperature.dim() == 1 && temperature.size(0) == p.heads,
                    "channel_attention: temperature must be (heads,) = (", p.heads, ",), got ", temperature.sizes());
  TORCH_CHECK_TYPE(temperature.scalar_type() == p.acc, "channel_attention: temperature must be ", p.acc,
                   " for ", t, " inputs, got ", temperature.scalar_type());
  TORCH_CHECK_VALUE(temperature.device() == q.device(), "channel_attention: temperature is on ",
                    temperature.device(), ", q on ", q.device());
  return p;
}

// A saved statistic (cosine, q_norm or k_norm) checked against the problem and made contiguous.
inline at::Tensor saved(const at::Tensor& t, const Problem& p, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "channel_attention: ", name, " must be ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == p.acc, "channel_attention: ", name, " must be ", p.acc, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == p.q.device(), "channel_attention: ", name, " is on ", t.device(), ", q on ",
                    p.q.device());
  return t.contiguous();
}

// The gradients' view of where to write: dq, dk and dv checked against the problem, sharing strides.
struct Grads {
  at::Tensor dq, dk, dv;
  int64_t stride_batch = 0, stride_head = 0, stride_dim = 0;
};

inline Grads grad_outputs(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const Problem& p) {
  for (const auto& [name, x] : {std::pair{"dq", &dq}, std::pair{"dk", &dk}, std::pair{"dv", &dv}}) {
    TORCH_CHECK_VALUE(x->sizes() == p.q.sizes(), "channel_attention: ", name, " must have q's shape ", p.q.sizes(),
                      ", got ", x->sizes());
    TORCH_CHECK_TYPE(x->scalar_type() == p.q.scalar_type(), "channel_attention: ", name, " must be ",
                     p.q.scalar_type(), ", got ", x->scalar_type());
    TORCH_CHECK_VALUE(x->device() == p.q.device(), "channel_attention: ", name, " is on ", x->device(), ", q on ",
                      p.q.device());
    TORCH_CHECK_VALUE(x->strides() == dq.strides() && dq.stride(3) == 1, "channel_attention: dq, dk and dv must ",
                      "share strides with position stride 1, got ", dq.strides(), ", ", dk.strides(), ", ",
                      dv.strides());
  }
  return {dq, dk, dv, dq.stride(0), dq.stride(1), dq.stride(2)};
}

// The incoming gradient, contiguous in q's dtype (gradients often arrive as stride-0 expands).
inline at::Tensor grad_of_out(const at::Tensor& dout, const Problem& p) {
  TORCH_CHECK_VALUE(dout.sizes() == p.q.sizes(), "channel_attention: dout must have q's shape ", p.q.sizes(),
                    ", got ", dout.sizes());
  TORCH_CHECK_VALUE(dout.device() == p.q.device(), "channel_attention: dout is on ", dout.device(), ", q on ",
                    p.q.device());
  return dout.to(p.q.scalar_type()).contiguous();
}

}  // namespace lldif_kernels::cha

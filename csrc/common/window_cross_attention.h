// Argument checks and the problem view shared by the CPU kernels and the CUDA glue of window_cross_attention,
// so both backends accept exactly the same inputs.
//
// Contract of lldif_native::window_cross_attention_{fwd,bwd} (every backend, Triton included):
//   k, v    (W, heads, M, d): W windows, M = ws² tokens, d channels per head, channel stride 1, any other
//           strides (each tensor its own: k and v are usually views of one kv projection)
//   q       (Wq, heads, M, d) with W % Wq == 0: window w reads q[w / (W / Wq)], so a query given once per
//           image serves that image's W / Wq consecutive windows without a copy; channel stride 1
//   table   ((2ws-1)², heads), contiguous, in the accumulation dtype (float32; float64 for float64 inputs)
//   logits  s_ij = scale · q_i·k_j + table[idx(i,j), h] with idx(i,j) = (r_i - r_j + ws-1)(2ws-1) +
//           (c_i - c_j + ws-1) for token i = r_i·ws + c_i; the M x M bias is never materialised
//   fwd -> out (W, heads, M, d) contiguous in q's dtype, and lse (W, heads, M) in the accumulation dtype:
//          lse_i = log Σ_j exp(s_ij). A row whose logits are all -inf gets out 0 and lse +inf.
//   bwd    takes dout (W, heads, M, d) contiguous in q's dtype and the forward's out and lse; recomputes
//          P = exp(s - lse) and returns dq (q's shape, summed over the windows that share a query; an empty
//          (0,) tensor when need_dq is false), dk, dv (W, heads, M, d) contiguous in q's dtype and dtable
//          (table's shape, accumulation dtype). Bitwise repeatable: every sum over windows, heads or blocks
//          runs in an order fixed by the shape, with no floating-point atomics.
#pragma once

#include <ATen/ATen.h>

namespace lldif_kernels::wca {

// The op schemas (lldif_native::*, and the test-only lldif_cuda_emulated::* of tests/cuda_host).
constexpr const char* kForwardSchema =
    "window_cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor table, int window_size, "
    "float scale) -> (Tensor, Tensor)";
constexpr const char* kBackwardSchema =
    "window_cross_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor table, Tensor out, "
    "Tensor lse, int window_size, float scale, bool need_dq) -> (Tensor, Tensor, Tensor, Tensor)";

struct Strides {
  int64_t window = 0, head = 0, token = 0;  // channel stride is 1
};

struct Problem {
  at::Tensor q, k, v, table;
  int64_t windows = 0, query_windows = 0, heads = 0, tokens = 0, dim = 0, window_size = 0;
  int64_t windows_per_query = 1;  // W / Wq
  double scale = 1.0;
  Strides q_strides, k_strides, v_strides;
  at::ScalarType acc = at::kFloat;
};

inline int64_t table_rows(int64_t window_size) { return (2 * window_size - 1) * (2 * window_size - 1); }

inline Strides strides_of(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2)}; }

inline at::Tensor channel_stride_one(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

inline Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                            int64_t window_size, double scale) {
  TORCH_CHECK_VALUE(k.dim() == 4, "window_cross_attention: k must be (windows, heads, M, d), got shape ", k.sizes());
  const at::ScalarType t = k.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
                   "window_cross_attention: k must be float32, float16, bfloat16 or float64, got ", t);
  TORCH_CHECK_VALUE(window_size >= 1 && k.size(2) == window_size * window_size, "window_cross_attention: k has M=",
                    k.size(2), " tokens, which is not window_size²=", window_size, "²");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "window_cross_attention: v must have k's shape ", k.sizes(), ", got ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(1) == k.size(1) && q.size(2) == k.size(2) && q.size(3) == k.size(3) &&
                        (q.size(0) > 0) == (k.size(0) > 0) && (q.size(0) == 0 || k.size(0) % q.size(0) == 0),
                    "window_cross_attention: q must be (Wq, heads, M, d) with k's heads, M, d and Wq dividing k's ",
                    k.size(0), " windows, got ", q.sizes(), " for k ", k.sizes());
  for (const auto& [name, x] : {std::pair{"q", &q}, std::pair{"v", &v}}) {
    TORCH_CHECK_TYPE(x->scalar_type() == t, "window_cross_attention: ", name, " must be ", t, " like k, got ",
                     x->scalar_type());
    TORCH_CHECK_VALUE(x->device() == k.device(), "window_cross_attention: ", name, " is on ", x->device(),
                      ", k on ", k.device());
  }
  Problem p;
  p.acc = t == at::kDouble ? at::kDouble : at::kFloat;
  p.q = channel_stride_one(q), p.k = channel_stride_one(k), p.v = channel_stride_one(v);
  p.windows = k.size(0), p.query_windows = q.size(0), p.heads = k.size(1), p.tokens = k.size(2), p.dim = k.size(3);
  p.windows_per_query = p.query_windows > 0 ? p.windows / p.query_windows : 1;
  p.window_size = window_size, p.scale = scale;
  p.q_strides = strides_of(p.q), p.k_strides = strides_of(p.k), p.v_strides = strides_of(p.v);
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == table_rows(window_size) && table.size(1) == p.heads,
                    "window_cross_attention: table must be ((2ws-1)², heads) = (", table_rows(window_size), ", ",
                    p.heads, "), got ", table.sizes());
  TORCH_CHECK_TYPE(table.scalar_type() == p.acc, "window_cross_attention: table must be ", p.acc, " for ", t,
                   " inputs, got ", table.scalar_type());
  TORCH_CHECK_VALUE(table.device() == k.device(), "window_cross_attention: table is on ", table.device(), ", k on ",
                    k.device());
  p.table = table.contiguous();
  return p;
}

// A tensor the backward takes (dout, out or lse), checked against the problem and made contiguous.
inline at::Tensor saved(const at::Tensor& x, const Problem& p, at::IntArrayRef shape, at::ScalarType dtype,
                        const char* name) {
  TORCH_CHECK_VALUE(x.sizes() == shape, "window_cross_attention: ", name, " must be ", shape, ", got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == dtype, "window_cross_attention: ", name, " must be ", dtype, ", got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == p.k.device(), "window_cross_attention: ", name, " is on ", x.device(), ", k on ",
                    p.k.device());
  return x.contiguous();
}

// dout, out and lse of a backward call, checked and contiguous.
struct Saved {
  at::Tensor dout, out, lse;
};

inline Saved saved_tensors(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse, const Problem& p) {
  const at::ScalarType t = p.k.scalar_type();
  return {saved(dout, p, p.k.sizes(), t, "dout"), saved(out, p, p.k.sizes(), t, "out"),
          saved(lse, p, p.k.sizes().slice(0, 3), p.acc, "lse")};
}

}  // namespace lldif_kernels::wca

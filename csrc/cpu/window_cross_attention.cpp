// DLNet window cross-attention (LLDif Eq. 5–7; POSTER++'s window attention with a relative-position bias)
// on the CPU.
//
// Per (window, head), with q, k, v in R^{M x d} (M = ws² tokens), in blocks of kBlockRows query rows:
//   forward   S = q kᵀ,  P = softmax(scale·S + bias),  out = P v,  lse = log Σ exp(scale·S + bias)
//   backward  P = exp(scale·S + bias - lse) recomputed, dP = dO vᵀ, dS = P ⊙ (dP - D) with D = rowsum(dO ⊙ out);
//             dvᵀ += dOᵀ P, dkᵀ += qᵀ dS, dq += dS k, dbias += dS
// A block's S and dP rows (kBlockRows x M) are the only M-wide data and stay in cache; nothing M x M is
// ever stored (../../LLDIF_SPEC §8.3). Every product is a call of the register-blocked GEMM of small_gemm.h
// on operands staged once per window in the accumulation type, transposed where that makes them row-major.
//
// The bias needs no gather. With ρ = ws-1 - r_i + r_j, the table row of (i, j) is
// R-1 - (ρ(2ws-1) + ws-1 - c_i + c_j), so for a fixed query column c_i the bias over all keys j = r_j·ws + c_j
// is a contiguous slice of the array BiasPlanes stores per (head, c_i): plane[ρ·ws + c_j]. The backward
// adds dS rows into planes of the same layout and folds them onto the table once per task.
//
// The backward runs one task per (query, head) and loops over the windows sharing that query in order, so
// dq needs no cross-thread sum; each task's table gradient is a partial summed in task order afterwards.
// Results are bitwise repeatable whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/window_cross_attention.h"
#include "small_gemm.h"

namespace lldif_kernels {
namespace {

using namespace cpu;

// Query rows per block: a block's S and dP (2 x 32 x M floats, 200 KB at M = 784) stay in L2 next to the
// window's transposed k and v. 16 and 48 rows measured the same; the GEMMs, not the cache, set the pace.
constexpr int64_t kBlockRows = 32;

template <typename acc_t>
using ivec_t = typename Register<std::conditional_t<std::is_same_v<acc_t, float>, int32_t, int64_t>>::type;

template <typename acc_t>
inline vec_t<acc_t> select(ivec_t<acc_t> mask, vec_t<acc_t> yes, vec_t<acc_t> no) {
  return reinterpret_cast<vec_t<acc_t>>((reinterpret_cast<ivec_t<acc_t>>(yes) & mask) |
                                        (reinterpret_cast<ivec_t<acc_t>>(no) & ~mask));
}

// exp of every lane; 0 below the smallest normal result, so exp(-inf) = 0 (a row's lse of +inf gives P = 0),
// and nan for nan, so a nan logit spoils its row as it does in eager.
// float: 2^n · e^r with n = round(x / ln 2) and Cephes' degree-6 polynomial for e^r on |r| <= ln2 / 2,
// accurate to about 1 ulp, which keeps the kernel within the float32 tolerance of eager's softmax.
inline vec_t<float> exp_lanes(vec_t<float> x) {
  using V = vec_t<float>;
  using I = ivec_t<float>;
  constexpr float kLow = -87.33654f, kHigh = 88.37626f;
  const I keep = ~(x < kLow);
  x = select<float>(x > kHigh, V{} + kHigh, select<float>(keep, x, V{} + kLow));
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + kRound) - kRound;
  const V r = x - n * 0.693359375f - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = p * r + c;
  p = p * r * r + r + 1.0f;
  const I exponent = (__builtin_convertvector(n, I) + 127) << 23;
  return select<float>(keep, p * reinterpret_cast<V>(exponent), V{});
}

inline vec_t<double> exp_lanes(vec_t<double> x) {
  for (int64_t l = 0; l < kLanes<double>; ++l) x[l] = std::exp(x[l]);
  return x;
}

template <typename acc_t>
inline acc_t exp_one(acc_t x) {
  vec_t<acc_t> v{};
  v[0] = x;
  return exp_lanes(v)[0];
}

// Where the bias of query row i starts in the planes of its head; see the file comment.
struct BiasPlanes {
  int64_t ws, plane_size, table_rows;

  explicit BiasPlanes(int64_t window_size)
      : ws(window_size), plane_size((2 * window_size - 1) * window_size), table_rows(wca::table_rows(window_size)) {}
  int64_t head_size() const { return ws * plane_size; }
  int64_t row_offset(int64_t i) const { return i % ws * plane_size + (ws - 1 - i / ws) * ws; }
  // The table row that plane c's entry ρ·ws + c_j holds.
  int64_t table_row(int64_t c, int64_t entry) const {
    const int64_t rho = entry / ws, cj = entry % ws;
    return table_rows - 1 - (rho * (2 * ws - 1) + ws - 1 - c + cj);
  }
};

template <typename acc_t>
std::vector<acc_t> expand_table(const wca::Problem& p, const BiasPlanes& b) {
  std::vector<acc_t> planes(p.heads * b.head_size(), acc_t(0));
  const acc_t* table = p.table.const_data_ptr<acc_t>();
  for (int64_t h = 0; h < p.heads; ++h)
    for (int64_t c = 0; c < b.ws; ++c)
      for (int64_t e = 0; e < b.plane_size; ++e)
        planes[h * b.head_size() + c * b.plane_size + e] = table[b.table_row(c, e) * p.heads + h];
  return planes;
}

// dst (rows x n, row stride dst_stride, zero in columns [n, dst_stride)) = src rows in the accumulation type.
template <typename scalar_t, typename acc_t>
void stage_rows(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t n, acc_t* dst, int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < n; ++c) dst[r * dst_stride + c] = static_cast<acc_t>(src[r * src_stride + c]);
    std::fill(dst + r * dst_stride + n, dst + (r + 1) * dst_stride, acc_t(0));
  }
}

// dst (n x padded_rows) = transpose of src (rows x n) in the accumulation type, zero in columns past rows.
template <typename scalar_t, typename acc_t>
void stage_transposed(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t n, acc_t* dst,
                      int64_t padded_rows) {
  for (int64_t c = 0; c < n; ++c) std::fill(dst + c * padded_rows + rows, dst + (c + 1) * padded_rows, acc_t(0));
  int64_t r = 0;
#if defined(__AVX__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    for (; r + 8 <= rows; r += 8) {
      int64_t c = 0;
      for (; c + 8 <= n; c += 8) transpose_8x8(src + r * src_stride + c, src_stride, dst + c * padded_rows + r,
                                               padded_rows);
      for (; c < n; ++c)
        for (int64_t i = r; i < r + 8; ++i) dst[c * padded_rows + i] = src[i * src_stride + c];
    }
  }
#endif
  for (; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) dst[c * padded_rows + r] = static_cast<acc_t>(src[r * src_stride + c]);
}

// dst rows (rows x n) = factor · transpose of src (n x rows, row stride src_stride), in the output type.
template <typename scalar_t, typename acc_t>
void store_transposed(const acc_t* src, int64_t src_stride, int64_t rows, int64_t n, acc_t factor, scalar_t* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) dst[r * n + c] = static_cast<scalar_t>(factor * src[c * src_stride + r]);
}

// One row of logits in place: s <- exp(scale·s + bias - max) over m keys. Returns (max, Σ exp); a row whose
// logits are all -inf is left at 0 with max -inf and sum 0.
template <typename acc_t>
std::pair<acc_t, acc_t> softmax_row(acc_t* s, const acc_t* bias, int64_t m, acc_t scale) {
  constexpr int64_t L = kLanes<acc_t>;
  const acc_t minus_inf = -std::numeric_limits<acc_t>::infinity();
  vec_t<acc_t> vmax = vec_t<acc_t>{} + minus_inf;
  int64_t j = 0;
  // Maxima that keep a nan once they meet one, so a nan logit makes its row nan rather than a row of zeros.
  for (; j + L <= m; j += L) {
    const vec_t<acc_t> x = scale * load(s + j) + load(bias + j);
    store(s + j, x);
    vmax = select<acc_t>((x > vmax) | (x != x), x, vmax);
  }
  acc_t max = minus_inf;
  const auto keep_nan_max = [&max](acc_t x) { max = x > max || x != x ? x : max; };
  for (int64_t l = 0; l < L; ++l) keep_nan_max(vmax[l]);
  for (; j < m; ++j) keep_nan_max(s[j] = scale * s[j] + bias[j]);
  if (max == minus_inf) {
    std::fill(s, s + m, acc_t(0));
    return {max, acc_t(0)};
  }
  vec_t<acc_t> vsum{};
  for (j = 0; j + L <= m; j += L) {
    const vec_t<acc_t> e = exp_lanes(load(s + j) - max);
    store(s + j, e);
    vsum += e;
  }
  acc_t sum = 0;
  for (int64_t l = 0; l < L; ++l) sum += vsum[l];
  for (; j < m; ++j) sum += s[j] = exp_one(s[j] - max);
  return {max, sum};
}

// One row of the backward in place: s (logits before scale and bias) <- P = exp(scale·s + bias - lse),
// dp <- dS = P (dp - delta), dbias += dS, over m keys.
template <typename acc_t>
void grad_row(acc_t* s, acc_t* dp, const acc_t* bias, acc_t* dbias, int64_t m, acc_t scale, acc_t lse,
              acc_t delta) {
  constexpr int64_t L = kLanes<acc_t>;
  int64_t j = 0;
  for (; j + L <= m; j += L) {
    const vec_t<acc_t> prob = exp_lanes(scale * load(s + j) + load(bias + j) - lse);
    const vec_t<acc_t> ds = prob * (load(dp + j) - delta);
    store(s + j, prob);
    store(dp + j, ds);
    store(dbias + j, load(dbias + j) + ds);
  }
  for (; j < m; ++j) {
    const acc_t prob = exp_one(scale * s[j] + bias[j] - lse);
    s[j] = prob;
    dp[j] = prob * (dp[j] - delta);
    dbias[j] += dp[j];
  }
}

// Sizes of one (window, head) problem as the kernels lay it out: rows that are GEMM right-hand operands are
// padded with zeros to a whole number of column panels (kCols<float> is a multiple of kCols<double>).
struct Layout {
  static constexpr int64_t kPadding = kCols<float>;
  int64_t tokens, padded_tokens, padded_dim;

  explicit Layout(const wca::Problem& p)
      : tokens(p.tokens), padded_tokens(round_up(p.tokens, kPadding)), padded_dim(round_up(p.dim, kPadding)) {}
};

// What both passes derive from the problem: the layout, every head's bias planes and the scale.
template <typename acc_t>
struct Setup {
  Layout layout;
  BiasPlanes bias;
  std::vector<acc_t> planes;
  acc_t scale;

  explicit Setup(const wca::Problem& p)
      : layout(p), bias(p.window_size), planes(expand_table<acc_t>(p, bias)), scale(static_cast<acc_t>(p.scale)) {}
};

template <typename scalar_t>
const scalar_t* slice(const at::Tensor& x, const wca::Strides& s, int64_t window, int64_t head) {
  return x.const_data_ptr<scalar_t>() + window * s.window + head * s.head;
}

template <typename scalar_t>
void forward_kernel(const wca::Problem& p, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const Setup<acc_t> setup(p);
  const BiasPlanes& bias = setup.bias;
  const int64_t m = setup.layout.tokens, mp = setup.layout.padded_tokens, d = p.dim, dp = setup.layout.padded_dim;
  const acc_t scale = setup.scale;
  at::parallel_for(0, p.windows * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(m * d), kt(d * mp), v(m * dp), s(kBlockRows * mp), o(kBlockRows * dp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t w = task / p.heads, h = task % p.heads;
      stage_rows(slice<scalar_t>(p.q, p.q_strides, w / p.windows_per_query, h), p.q_strides.token, m, d, q.data(), d);
      stage_transposed(slice<scalar_t>(p.k, p.k_strides, w, h), p.k_strides.token, m, d, kt.data(), mp);
      stage_rows(slice<scalar_t>(p.v, p.v_strides, w, h), p.v_strides.token, m, d, v.data(), dp);
      const acc_t* head_planes = setup.planes.data() + h * bias.head_size();
      scalar_t* out_task = out.data_ptr<scalar_t>() + task * m * d;
      acc_t* lse_task = lse.data_ptr<acc_t>() + task * m;
      for (int64_t i0 = 0; i0 < m; i0 += kBlockRows) {
        const int64_t rows = std::min(kBlockRows, m - i0);
        gemm<acc_t>(rows, mp, d, q.data() + i0 * d, d, Right<acc_t>::row_major(kt.data(), mp), s.data(), mp, false);
        acc_t sums[kBlockRows];
        for (int64_t r = 0; r < rows; ++r) {
          const auto [max, sum] = softmax_row(s.data() + r * mp, head_planes + bias.row_offset(i0 + r), m, scale);
          sums[r] = sum;
          lse_task[i0 + r] = sum > 0 ? max + std::log(sum) : std::numeric_limits<acc_t>::infinity();
        }
        gemm<acc_t>(rows, dp, m, s.data(), mp, Right<acc_t>::row_major(v.data(), dp), o.data(), dp, false);
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t inverse = sums[r] > 0 ? acc_t(1) / sums[r] : acc_t(0);
          for (int64_t c = 0; c < d; ++c) out_task[(i0 + r) * d + c] = static_cast<scalar_t>(o[r * dp + c] * inverse);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const wca::Problem& p, const wca::Saved& saved, bool need_dq, at::Tensor& dq, at::Tensor& dk,
                     at::Tensor& dv, at::Tensor& dtable) {
  using acc_t = at::opmath_type<scalar_t>;
  const Setup<acc_t> setup(p);
  const BiasPlanes& bias = setup.bias;
  const int64_t m = setup.layout.tokens, mp = setup.layout.padded_tokens, d = p.dim, dp = setup.layout.padded_dim;
  const acc_t scale = setup.scale;
  const int64_t tasks = p.query_windows * p.heads;
  std::vector<acc_t> table_partials(tasks * bias.table_rows);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(m * d), qt(d * mp), kt(d * mp), vt(d * mp), k(need_dq ? m * dp : 0), g(m * d),
        gt(d * mp), s(kBlockRows * mp), ds(kBlockRows * mp), dvt(d * mp), dkt(d * mp), dq_sum(need_dq ? m * dp : 0),
        dplanes(bias.head_size()), delta(m);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t wq = task / p.heads, h = task % p.heads;
      const scalar_t* q_task = slice<scalar_t>(p.q, p.q_strides, wq, h);
      stage_rows(q_task, p.q_strides.token, m, d, q.data(), d);
      stage_transposed(q_task, p.q_strides.token, m, d, qt.data(), mp);
      std::fill(dplanes.begin(), dplanes.end(), acc_t(0));
      const acc_t* head_planes = setup.planes.data() + h * bias.head_size();
      for (int64_t w = wq * p.windows_per_query; w < (wq + 1) * p.windows_per_query; ++w) {
        const int64_t pair = w * p.heads + h;
        const scalar_t* k_task = slice<scalar_t>(p.k, p.k_strides, w, h);
        stage_transposed(k_task, p.k_strides.token, m, d, kt.data(), mp);
        stage_transposed(slice<scalar_t>(p.v, p.v_strides, w, h), p.v_strides.token, m, d, vt.data(), mp);
        if (need_dq) stage_rows(k_task, p.k_strides.token, m, d, k.data(), dp);
        const scalar_t* g_task = saved.dout.const_data_ptr<scalar_t>() + pair * m * d;
        const scalar_t* out_task = saved.out.const_data_ptr<scalar_t>() + pair * m * d;
        stage_rows(g_task, d, m, d, g.data(), d);
        stage_transposed(g_task, d, m, d, gt.data(), mp);
        for (int64_t i = 0; i < m; ++i) {
          acc_t dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += g[i * d + c] * static_cast<acc_t>(out_task[i * d + c]);
          delta[i] = dot;
        }
        const acc_t* lse = saved.lse.const_data_ptr<acc_t>() + pair * m;
        for (int64_t i0 = 0; i0 < m; i0 += kBlockRows) {
          const int64_t rows = std::min(kBlockRows, m - i0);
          gemm<acc_t>(rows, mp, d, q.data() + i0 * d, d, Right<acc_t>::row_major(kt.data(), mp), s.data(), mp, false);
          gemm<acc_t>(rows, mp, d, g.data() + i0 * d, d, Right<acc_t>::row_major(vt.data(), mp), ds.data(), mp, false);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t offset = bias.row_offset(i0 + r);
            grad_row(s.data() + r * mp, ds.data() + r * mp, head_planes + offset, dplanes.data() + offset, m, scale,
                     lse[i0 + r], delta[i0 + r]);
          }
          // Columns past m of P and dS hold the GEMMs' zeros, so the padded columns of dvᵀ and dkᵀ stay finite.
          const bool accumulate = i0 > 0;
          gemm<acc_t>(d, mp, rows, gt.data() + i0, mp, Right<acc_t>::row_major(s.data(), mp), dvt.data(), mp,
                      accumulate);
          gemm<acc_t>(d, mp, rows, qt.data() + i0, mp, Right<acc_t>::row_major(ds.data(), mp), dkt.data(), mp,
                      accumulate);
          if (need_dq)
            gemm<acc_t>(rows, dp, m, ds.data(), mp, Right<acc_t>::row_major(k.data(), dp), dq_sum.data() + i0 * dp,
                        dp, w > wq * p.windows_per_query);
        }
        store_transposed(dvt.data(), mp, m, d, acc_t(1), dv.data_ptr<scalar_t>() + pair * m * d);
        store_transposed(dkt.data(), mp, m, d, scale, dk.data_ptr<scalar_t>() + pair * m * d);
      }
      if (need_dq) {
        scalar_t* dq_task = dq.data_ptr<scalar_t>() + task * m * d;
        for (int64_t i = 0; i < m; ++i)
          for (int64_t c = 0; c < d; ++c) dq_task[i * d + c] = static_cast<scalar_t>(scale * dq_sum[i * dp + c]);
      }
      acc_t* partial = table_partials.data() + task * bias.table_rows;
      std::fill(partial, partial + bias.table_rows, acc_t(0));
      for (int64_t c = 0; c < bias.ws; ++c)
        for (int64_t e = 0; e < bias.plane_size; ++e) partial[bias.table_row(c, e)] += dplanes[c * bias.plane_size + e];
    }
  });
  acc_t* dt = dtable.data_ptr<acc_t>();
  std::fill(dt, dt + dtable.numel(), acc_t(0));
  for (int64_t task = 0; task < tasks; ++task) {
    const acc_t* partial = table_partials.data() + task * bias.table_rows;
    for (int64_t r = 0; r < bias.table_rows; ++r) dt[r * p.heads + task % p.heads] += partial[r];
  }
}

std::tuple<at::Tensor, at::Tensor> window_cross_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& table,
                                                                  int64_t window_size, double scale) {
  const wca::Problem p = wca::make_problem(q, k, v, table, window_size, scale);
  auto out = at::empty(p.k.sizes(), p.k.options());
  auto lse = at::empty({p.windows, p.heads, p.tokens}, p.k.options().dtype(p.acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.k.scalar_type(), "window_cross_attention_fwd_cpu",
                                  [&] { forward_kernel<scalar_t>(p, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_cross_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
    const at::Tensor& out, const at::Tensor& lse, int64_t window_size, double scale, bool need_dq) {
  const wca::Problem p = wca::make_problem(q, k, v, table, window_size, scale);
  const wca::Saved saved = wca::saved_tensors(dout, out, lse, p);
  auto dq = need_dq ? at::empty(p.q.sizes(), p.q.options()) : at::empty({0}, p.q.options());
  auto dk = at::empty(p.k.sizes(), p.k.options());
  auto dv = at::empty(p.k.sizes(), p.k.options());
  auto dtable = at::empty(p.table.sizes(), p.table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.k.scalar_type(), "window_cross_attention_bwd_cpu",
                                  [&] { backward_kernel<scalar_t>(p, saved, need_dq, dq, dk, dv, dtable); });
  return {dq, dk, dv, dtable};
}

}  // namespace
}  // namespace lldif_kernels

TORCH_LIBRARY_FRAGMENT(lldif_native, m) {
  m.def(lldif_kernels::wca::kForwardSchema);
  m.def(lldif_kernels::wca::kBackwardSchema);
}

TORCH_LIBRARY_IMPL(lldif_native, CPU, m) {
  m.impl("window_cross_attention_fwd", &lldif_kernels::window_cross_attention_fwd_cpu);
  m.impl("window_cross_attention_bwd", &lldif_kernels::window_cross_attention_bwd_cpu);
}

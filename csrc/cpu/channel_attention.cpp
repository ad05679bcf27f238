// DMNet transposed (channel) attention (LLDif Eq. 3, Restormer's MDTA core) on the CPU.
//
// Per (sample, head) pair with q, k, v in R^{d x N}:
//   forward   G = q kᵀ, |q_i|², |k_j|²  (pass 1 over N)   ->  C = q̂ k̂ᵀ, P = softmax_j(τ C)  ->  out = P v  (pass 2)
//   backward  dP = dO vᵀ and dv = Pᵀ dO (pass 1; P is the forward's)  ->  dS, dτ, M, ρ, κ (d x d)
//             ->  dq = M k - ρ/nq² q, dk = Mᵀ q - κ/nk² k  (pass 2)
// so the normalisation backward needs no reduction over N of its own (../../LLDIF_SPEC §8.2).
//
// Every product over N is a small GEMM on a chunk of positions, done by the register-blocked kernel of
// small_gemm.h (fp32 or fp64 accumulation). Pass-1 partial d x d sums are kept per split
// of N and reduced in split order, so results are bitwise repeatable whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/channel_attention.h"
#include "small_gemm.h"

namespace lldif_kernels {
namespace {

using namespace cpu;

// Positions per GEMM call: one packed panel (256 x kCols) stays in L1, the d x 256 left rows in L2.
constexpr int64_t kChunk = 256;
// Positions per pass-1 partial sum: few enough partials to reduce cheaply, enough tasks for the threads.
constexpr int64_t kSplit = 4 * kChunk;

// Asks for the next chunk of each row while this one is in use. The hardware prefetcher restarts on every
// row (rows are short and far apart), so without this each chunk's first reads wait on memory; this way
// the next chunk is in L2 by the time the GEMM of this one is done.
template <typename scalar_t>
void prefetch_next_chunk(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t n) {
  constexpr int64_t kLine = 64;
  for (int64_t r = 0; r < rows; ++r) {
    const char* next = reinterpret_cast<const char*>(src + r * src_stride + n);
    for (int64_t byte = 0; byte < kChunk * static_cast<int64_t>(sizeof(scalar_t)); byte += kLine)
      __builtin_prefetch(next + byte, 0, 2);
  }
}

// A (rows x n) block of an input in the accumulation type: the tensor's own memory when it already is,
// else a converted copy.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t n, acc_t* stage,
                         int64_t& stride) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    stride = src_stride;
    return src;
  }
  stride = n;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) stage[r * n + i] = static_cast<acc_t>(src[r * src_stride + i]);
  return stage;
}

// Where a GEMM writes a (rows x n) block of an output: the output itself when its type and width allow,
// else a stage that commit() converts into the output.
template <typename scalar_t, typename acc_t>
struct OutRows {
  scalar_t* dst;
  int64_t dst_stride, rows, n;
  acc_t* data;
  int64_t stride;

  OutRows(scalar_t* dst_, int64_t dst_stride_, int64_t rows_, int64_t n_, acc_t* stage)
      : dst(dst_), dst_stride(dst_stride_), rows(rows_), n(n_), data(stage), stride(round_up(n_, kCols<acc_t>)) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (n % kCols<acc_t> == 0) data = dst, stride = dst_stride;
    }
  }

  void commit() const {
    if (data == reinterpret_cast<const acc_t*>(dst)) return;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < n; ++i) dst[r * dst_stride + i] = static_cast<scalar_t>(data[r * stride + i]);
  }
};

// Σ_n x[r][n]² for every row of a (rows x n) block.
template <typename acc_t>
void add_row_squares(const acc_t* x, int64_t stride, int64_t rows, int64_t n, acc_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* row = x + r * stride;
    vec_t<acc_t> acc{};
    int64_t i = 0;
    for (; i + kLanes<acc_t> <= n; i += kLanes<acc_t>) {
      const vec_t<acc_t> v = load(row + i);
      acc += v * v;
    }
    acc_t sum = 0;
    for (int64_t l = 0; l < kLanes<acc_t>; ++l) sum += acc[l];
    for (; i < n; ++i) sum += row[i] * row[i];
    out[r] += sum;
  }
}

// Σ_i panels[i][c]² for every column c of transposed panels (depth n, padded_rows columns).
template <typename acc_t>
void add_column_squares(const acc_t* panels, int64_t n, int64_t rows, int64_t padded_rows, acc_t* out) {
  constexpr int64_t W = kCols<acc_t>;
  for (int64_t p = 0; p * W < padded_rows; ++p) {
    acc_t sums[W] = {};
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < W; ++c) sums[c] += panels[(p * n + i) * W + c] * panels[(p * n + i) * W + c];
    for (int64_t c = 0; c < W && p * W + c < rows; ++c) out[p * W + c] += sums[c];
  }
}

struct Shape {
  int64_t pairs, heads, dim, padded_dim, positions, splits, chunks;
  int64_t stride_batch, stride_head, stride_dim;

  explicit Shape(const cha::Problem& p, int64_t columns_per_panel)
      : pairs(p.batch * p.heads), heads(p.heads), dim(p.dim), padded_dim(round_up(p.dim, columns_per_panel)),
        positions(p.positions), splits((p.positions + kSplit - 1) / kSplit),
        chunks((p.positions + kChunk - 1) / kChunk), stride_batch(p.stride_batch), stride_head(p.stride_head),
        stride_dim(p.stride_dim) {}

  // Offset of (pair, row 0, position 0) in q, k or v.
  int64_t input_offset(int64_t pair) const { return pair / heads * stride_batch + pair % heads * stride_head; }
};

// Pass 1: per (pair, split) the partial Gram Σ_n left_in right_jn (d x padded_dim) and, when squares is
// given, the partial Σ_n left_in² and Σ_n right_jn² (2 x d). Left and right share the problem's strides
// when left_contiguous is false; else left is a contiguous (B, heads, d, N) tensor (the incoming gradient).
// on_chunk(pair, start, n, panels, stage) runs after each chunk, with the chunk still in cache and two
// d x kChunk scratch buffers for apply().
template <typename scalar_t, typename acc_t, typename OnChunk>
void gram_partials(const Shape& s, const scalar_t* left, bool left_contiguous, const scalar_t* right,
                   acc_t* gram_partials, acc_t* square_partials, const OnChunk& on_chunk) {
  const int64_t d = s.dim, dp = s.padded_dim;
  at::parallel_for(0, s.pairs * s.splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> left_stage(d * kChunk), panels(kChunk * dp), scratch_panels(d * kChunk),
        scratch_stage(d * kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / s.splits, split = task % s.splits;
      const int64_t left_base = left_contiguous ? pair * d * s.positions : s.input_offset(pair);
      const int64_t left_stride = left_contiguous ? s.positions : s.stride_dim;
      acc_t* gram = gram_partials + task * d * dp;
      acc_t* squares = square_partials ? square_partials + task * 2 * d : nullptr;
      if (squares) std::fill(squares, squares + 2 * d, acc_t(0));
      const int64_t first = split * kSplit, last = std::min(first + kSplit, s.positions);
      for (int64_t start = first; start < last; start += kChunk) {
        const int64_t n = std::min(kChunk, last - start);
        int64_t a_row = 0;
        prefetch_next_chunk(left + left_base + start, left_stride, d, n);
        prefetch_next_chunk(right + s.input_offset(pair) + start, s.stride_dim, d, n);
        const acc_t* a = rows_as_acc(left + left_base + start, left_stride, d, n, left_stage.data(), a_row);
        pack_transposed_panels(right + s.input_offset(pair) + start, s.stride_dim, d, dp, n, panels.data());
        gemm<acc_t>(d, dp, n, a, a_row, Right<acc_t>::packed(panels.data(), n), gram, dp, start != first);
        if (squares) {
          add_row_squares(a, a_row, d, n, squares);
          add_column_squares(panels.data(), n, d, dp, squares + d);
        }
        on_chunk(pair, start, n, scratch_panels.data(), scratch_stage.data());
      }
    }
  });
}

// Sum of a pair's partials over its splits, in split order.
template <typename acc_t>
void sum_splits(const acc_t* partials, int64_t splits, int64_t size, acc_t* out) {
  std::fill(out, out + size, acc_t(0));
  for (int64_t s = 0; s < splits; ++s)
    for (int64_t i = 0; i < size; ++i) out[i] += partials[s * size + i];
}

// P = softmax_j(τ C) of one pair (d x d, row-major).
template <typename acc_t>
void softmax_rows(const acc_t* cosine, acc_t tau, int64_t d, acc_t* p) {
  for (int64_t i = 0; i < d; ++i) {
    const acc_t* c = cosine + i * d;
    acc_t* row = p + i * d;
    acc_t max = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < d; ++j) max = std::max(max, tau * c[j]);
    acc_t total = 0;
    for (int64_t j = 0; j < d; ++j) total += row[j] = std::exp(tau * c[j] - max);
    for (int64_t j = 0; j < d; ++j) row[j] /= total;
  }
}

// Pass 2 of one (pair, chunk): out_rows = coefficients (d x d) · rows of input (d x n, packed on the way),
// written to output rows (row stride output_stride).
template <typename scalar_t, typename acc_t>
OutRows<scalar_t, acc_t> apply(const acc_t* coefficients, const scalar_t* input, int64_t input_stride,
                               scalar_t* output, int64_t output_stride, int64_t d, int64_t n, acc_t* panels,
                               acc_t* stage) {
  prefetch_next_chunk(input, input_stride, d, n);
  pack_panels(input, input_stride, d, n, panels);
  OutRows<scalar_t, acc_t> target(output, output_stride, d, n, stage);
  gemm<acc_t>(d, round_up(n, kCols<acc_t>), d, coefficients, d, Right<acc_t>::packed(panels, d), target.data,
              target.stride, false);
  return target;
}

template <typename scalar_t>
void forward_kernel(const cha::Problem& p, const at::Tensor& temperature, at::Tensor& out, at::Tensor& cosine,
                    at::Tensor& q_norm, at::Tensor& k_norm) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape s(p, kCols<acc_t>);
  const int64_t d = s.dim, dp = s.padded_dim;
  const auto acc_options = cosine.options();
  auto grams = at::empty({s.pairs, s.splits, d, dp}, acc_options);
  auto squares = at::empty({s.pairs, s.splits, 2, d}, acc_options);
  gram_partials<scalar_t, acc_t>(s, p.q.const_data_ptr<scalar_t>(), false, p.k.const_data_ptr<scalar_t>(),
                                 grams.data_ptr<acc_t>(), squares.data_ptr<acc_t>(), [](auto...) {});

  auto attention = at::empty({s.pairs, d, d}, acc_options);
  const acc_t* tau = temperature.const_data_ptr<acc_t>();
  acc_t *c_out = cosine.data_ptr<acc_t>(), *nq_out = q_norm.data_ptr<acc_t>(), *nk_out = k_norm.data_ptr<acc_t>();
  at::parallel_for(0, s.pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gram(d * dp), sq(2 * d);
    for (int64_t pair = begin; pair < end; ++pair) {
      sum_splits(grams.const_data_ptr<acc_t>() + pair * s.splits * d * dp, s.splits, d * dp, gram.data());
      sum_splits(squares.const_data_ptr<acc_t>() + pair * s.splits * 2 * d, s.splits, 2 * d, sq.data());
      acc_t *nq = nq_out + pair * d, *nk = nk_out + pair * d, *c = c_out + pair * d * d;
      for (int64_t i = 0; i < d; ++i) {
        nq[i] = std::max(std::sqrt(sq[i]), static_cast<acc_t>(cha::kNormEps));
        nk[i] = std::max(std::sqrt(sq[d + i]), static_cast<acc_t>(cha::kNormEps));
      }
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) c[i * d + j] = gram[i * dp + j] / (nq[i] * nk[j]);
      softmax_rows(c, tau[pair % s.heads], d, attention.data_ptr<acc_t>() + pair * d * d);
    }
  });

  scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t* v = p.v.const_data_ptr<scalar_t>();
  at::parallel_for(0, s.pairs * s.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> panels(d * kChunk), stage(d * kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / s.chunks, start = task % s.chunks * kChunk;
      apply(attention.const_data_ptr<acc_t>() + pair * d * d, v + s.input_offset(pair) + start, s.stride_dim,
            o + pair * d * s.positions + start, s.positions, d, std::min(kChunk, s.positions - start),
            panels.data(), stage.data())
          .commit();
    }
  });
}

template <typename scalar_t>
void backward_kernel(const cha::Problem& p, const at::Tensor& dout, const at::Tensor& temperature,
                     const at::Tensor& cosine, const at::Tensor& q_norm, const at::Tensor& k_norm,
                     const cha::Grads& grads, at::Tensor& dtemperature) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape s(p, kCols<acc_t>);
  const int64_t d = s.dim, dp = s.padded_dim, n_all = s.positions;
  const auto acc_options = cosine.options();
  const scalar_t *g = dout.const_data_ptr<scalar_t>(), *q = p.q.const_data_ptr<scalar_t>(),
                 *k = p.k.const_data_ptr<scalar_t>(), *v = p.v.const_data_ptr<scalar_t>();
  const acc_t *tau = temperature.const_data_ptr<acc_t>(), *c_all = cosine.const_data_ptr<acc_t>();
  const acc_t *nq_all = q_norm.const_data_ptr<acc_t>(), *nk_all = k_norm.const_data_ptr<acc_t>();
  scalar_t* outputs[3] = {grads.dq.data_ptr<scalar_t>(), grads.dk.data_ptr<scalar_t>(), grads.dv.data_ptr<scalar_t>()};
  auto out_offset = [&](int64_t pair, int64_t start) {
    return pair / s.heads * grads.stride_batch + pair % s.heads * grads.stride_head + start;
  };

  // Per pair, the left operands of pass 2, M and Mᵀ, then Pᵀ, and the diagonals ρ/nq², κ/nk² of
  // dq = M k - diag(ρ/nq²) q, dk = Mᵀ q - diag(κ/nk²) k, dv = Pᵀ dO.
  auto coefficients = at::empty({s.pairs, 3, d, d}, acc_options);
  auto probabilities = at::empty({s.pairs, d, d}, acc_options);
  acc_t* prob_all = probabilities.data_ptr<acc_t>();
  at::parallel_for(0, s.pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      acc_t* prob = prob_all + pair * d * d;
      acc_t* pt = coefficients.data_ptr<acc_t>() + (pair * 3 + 2) * d * d;
      softmax_rows(c_all + pair * d * d, tau[pair % s.heads], d, prob);
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) pt[j * d + i] = prob[i * d + j];
    }
  });

  // P is known from the forward, so dv = Pᵀ dO is computed in pass 1, while its chunk of dO is in cache.
  auto grams = at::empty({s.pairs, s.splits, d, dp}, acc_options);
  gram_partials<scalar_t, acc_t>(s, g, true, v, grams.data_ptr<acc_t>(), nullptr,
                                 [&](int64_t pair, int64_t start, int64_t n, acc_t* panels, acc_t* stage) {
                                   apply(coefficients.const_data_ptr<acc_t>() + (pair * 3 + 2) * d * d,
                                         g + pair * d * n_all + start, n_all, outputs[2] + out_offset(pair, start),
                                         grads.stride_dim, d, n, panels, stage)
                                       .commit();
                                 });

  auto diagonals = at::empty({s.pairs, 2, d}, acc_options);
  acc_t* dtau = dtemperature.data_ptr<acc_t>();
  at::parallel_for(0, s.pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dprob(d * dp), kappa(d);
    for (int64_t pair = begin; pair < end; ++pair) {
      sum_splits(grams.const_data_ptr<acc_t>() + pair * s.splits * d * dp, s.splits, d * dp, dprob.data());
      const acc_t t = tau[pair % s.heads];
      const acc_t *c = c_all + pair * d * d, *nq = nq_all + pair * d, *nk = nk_all + pair * d;
      const acc_t* prob = prob_all + pair * d * d;
      acc_t* m = coefficients.data_ptr<acc_t>() + pair * 3 * d * d;
      acc_t* mt = m + d * d;
      acc_t* diag = diagonals.data_ptr<acc_t>() + pair * 2 * d;
      acc_t dt = 0;
      std::fill(kappa.begin(), kappa.end(), acc_t(0));
      for (int64_t i = 0; i < d; ++i) {
        acc_t row_dot = 0;
        for (int64_t j = 0; j < d; ++j) row_dot += prob[i * d + j] * dprob[i * dp + j];
        acc_t rho = 0;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t ds = prob[i * d + j] * (dprob[i * dp + j] - row_dot);
          // dτ from the cosine, not dS·S/τ, which would divide by a temperature that may be 0.
          dt += ds * c[i * d + j];
          const acc_t dc = t * ds;
          rho += dc * c[i * d + j];
          kappa[j] += dc * c[i * d + j];
          m[i * d + j] = mt[j * d + i] = dc / (nq[i] * nk[j]);
        }
        // A norm at the clamp is a constant, so the row takes no gradient through it.
        diag[i] = nq[i] > static_cast<acc_t>(cha::kNormEps) ? rho / (nq[i] * nq[i]) : acc_t(0);
      }
      for (int64_t j = 0; j < d; ++j)
        diag[d + j] = nk[j] > static_cast<acc_t>(cha::kNormEps) ? kappa[j] / (nk[j] * nk[j]) : acc_t(0);
      dtau[pair] = dt;
    }
  });

  at::parallel_for(0, s.pairs * s.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> panels(d * kChunk), stage(d * kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / s.chunks, start = task % s.chunks * kChunk;
      const int64_t n = std::min(kChunk, n_all - start), in = s.input_offset(pair) + start;
      const acc_t* m = coefficients.const_data_ptr<acc_t>() + pair * 3 * d * d;
      const acc_t* diag = diagonals.const_data_ptr<acc_t>() + pair * 2 * d;
      // dq = M k - diag(ρ/nq²) q, dk = Mᵀ q - diag(κ/nk²) k.
      const scalar_t* right[2] = {k + in, q + in};
      const scalar_t* scaled[2] = {q + in, k + in};
      for (int which = 0; which < 2; ++which) {
        auto target = apply(m + which * d * d, right[which], s.stride_dim, outputs[which] + out_offset(pair, start),
                            grads.stride_dim, d, n, panels.data(), stage.data());
        for (int64_t r = 0; r < d; ++r) {
          const acc_t scale = diag[which * d + r];
          acc_t* row = target.data + r * target.stride;
          const scalar_t* x = scaled[which] + r * s.stride_dim;
          for (int64_t i = 0; i < n; ++i) row[i] -= scale * static_cast<acc_t>(x[i]);
        }
        target.commit();
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_fwd_cpu(const at::Tensor& q,
                                                                                     const at::Tensor& k,
                                                                                     const at::Tensor& v,
                                                                                     const at::Tensor& temperature) {
  const cha::Problem p = cha::make_problem(q, k, v, temperature);
  const auto acc_options = p.q.options().dtype(p.acc);
  auto out = at::empty(p.q.sizes(), p.q.options());
  auto cosine = at::empty({p.batch, p.heads, p.dim, p.dim}, acc_options);
  auto q_norm = at::empty({p.batch, p.heads, p.dim}, acc_options);
  auto k_norm = at::empty({p.batch, p.heads, p.dim}, acc_options);
  const auto t = temperature.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.q.scalar_type(), "channel_attention_fwd_cpu",
                                  [&] { forward_kernel<scalar_t>(p, t, out, cosine, q_norm, k_norm); });
  return {out, cosine, q_norm, k_norm};
}

at::Tensor channel_attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& temperature, const at::Tensor& cosine,
                                     const at::Tensor& q_norm, const at::Tensor& k_norm, at::Tensor& dq,
                                     at::Tensor& dk, at::Tensor& dv) {
  const cha::Problem p = cha::make_problem(q, k, v, temperature);
  const auto g = cha::grad_of_out(dout, p);
  const auto c = cha::saved(cosine, p, {p.batch, p.heads, p.dim, p.dim}, "cosine");
  const auto nq = cha::saved(q_norm, p, {p.batch, p.heads, p.dim}, "q_norm");
  const auto nk = cha::saved(k_norm, p, {p.batch, p.heads, p.dim}, "k_norm");
  const cha::Grads grads = cha::grad_outputs(dq, dk, dv, p);
  auto dtemperature = at::empty({p.batch, p.heads}, c.options());
  const auto t = temperature.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.q.scalar_type(), "channel_attention_bwd_cpu",
                                  [&] { backward_kernel<scalar_t>(p, g, t, c, nq, nk, grads, dtemperature); });
  return dtemperature;
}

}  // namespace
}  // namespace lldif_kernels

TORCH_LIBRARY_FRAGMENT(lldif_native, m) {
  m.def(lldif_kernels::cha::kForwardSchema);
  m.def(lldif_kernels::cha::kBackwardSchema);
}

TORCH_LIBRARY_IMPL(lldif_native, CPU, m) {
  m.impl("channel_attention_fwd", &lldif_kernels::channel_attention_fwd_cpu);
  m.impl("channel_attention_bwd", &lldif_kernels::channel_attention_bwd_cpu);
}

// Depth-wise 3x3 convolution (padding 1) with Restormer's optional GELU gate (LLDif's DGNet, Eq. 4) on the CPU.
//
//   y = conv3x3_c(x) + bias[c];   gate: out = gelu(y[:, :C/2]) * y[:, C/2:]
//
// y lives only in row buffers: the gated forward reads x once and writes half as many channels, and the
// backward recomputes y instead of reading it back. Two layouts, two decompositions:
//   planar (NCHW):          a task is one channel, or one gate pair, of one sample. Its planes are copied once
//                           into zero-padded buffers of the accumulation type, so the stencil has no border
//                           cases and runs as one vector loop over the whole padded plane.
//   channels-inner (NHWC):  a task is a band of rows of one sample; the stencil vectorises along channels with
//                           the weights transposed to (tap, C).
// dweight/dbias are summed per task in a fixed order and the tasks' partials are reduced in task order, so the
// backward is bitwise repeatable whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/depthwise_conv3x3.h"

namespace lldif_kernels {
namespace {

constexpr int kTaps = 9;
// A channels-inner band's buffers (d_pre with its halo rows) stay within L2.
constexpr int64_t kBandBytes = 256 * 1024;

// --- the standard normal's cdf and pdf, for gelu(g) = g Phi(g) and gelu'(g) = Phi(g) + g phi(g) ---------------

// exp(x) for x <= 0 in operations that vectorise (no library call, no float-to-int conversion, which GCC will
// not vectorise under the default trapping-math): Cody-Waite reduction by ln 2, a degree-7 Taylor polynomial, and
// 2^n built in the exponent bits. Relative error below 1e-7.
inline float exp_nonpositive(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
  x = std::max(x, -87.0f);               // keeps 2^n a normal float
  const float shifted = std::fma(x, 1.44269504088896341f, kRound);
  const float n = shifted - kRound;
  float r = std::fma(n, -0.693145751953125f, x);
  r = std::fma(n, -1.428606765330187e-06f, r);
  float p = std::fma(1.0f / 5040, r, 1.0f / 720);
  p = std::fma(p, r, 1.0f / 120);
  p = std::fma(p, r, 1.0f / 24);
  p = std::fma(p, r, 1.0f / 6);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t exponent = std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kRound) + 127;
  return p * std::bit_cast<float>(exponent << 23);
}

template <typename acc_t>
struct NormalTerms {
  acc_t cdf, pdf;  // Phi(g), phi(g)
};

// float: erfc by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), the formula of PyTorch's own vectorised
// GELU, on |g| so that Phi(g) for g < 0 is the tail itself rather than 1 - (1 - tail). signbit rather than
// g < 0: an ordered comparison may trap on NaN, which keeps GCC from vectorising the loop.
inline NormalTerms<float> normal_terms(float g) {
  const float a = std::fabs(g) * 0.70710678118654752f;
  const float t = 1.0f / std::fma(0.3275911f, a, 1.0f);
  float poly = std::fma(1.061405429f, t, -1.453152027f);
  poly = std::fma(poly, t, 1.421413741f);
  poly = std::fma(poly, t, -0.284496736f);
  poly = std::fma(poly, t, 0.254829592f);
  const float gauss = exp_nonpositive(-0.5f * g * g);
  const float tail = 0.5f * poly * t * gauss;
  return {std::signbit(g) ? tail : 1.0f - tail, gauss * 0.39894228040143268f};
}

inline NormalTerms<double> normal_terms(double g) {
  return {0.5 * std::erfc(-g * 0.70710678118654752), std::exp(-0.5 * g * g) * 0.39894228040143268};
}

template <typename acc_t>
void gate_forward(const acc_t* gate, const acc_t* value, acc_t* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = gate[i] * normal_terms(gate[i]).cdf * value[i];
  }
}

// dL/dy of both halves from dL/dout: d gate = dout * value * gelu'(gate), d value = dout * gelu(gate).
template <typename acc_t>
void gate_backward(const acc_t* gate, const acc_t* value, const acc_t* dout, acc_t* dgate, acc_t* dvalue,
                   int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const NormalTerms<acc_t> terms = normal_terms(gate[i]);
    dgate[i] = dout[i] * value[i] * (terms.cdf + gate[i] * terms.pdf);
    dvalue[i] = dout[i] * gate[i] * terms.cdf;
  }
}

template <typename scalar_t, typename acc_t>
void widen(const scalar_t* src, acc_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

template <typename scalar_t, typename acc_t>
void narrow(const acc_t* src, scalar_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// The channels a task of the planar kernels owns: c, and with the gate its value partner c + C/2.
int channels_per_task(const dwc::Problem& p) { return p.gate ? 2 : 1; }

// --- planar ----------------------------------------------------------------------------------------------------

// A (H + 2) x (W + 2) plane with a zero border, the stencil's padding, plus one spare element before and after:
// the stencils run over whole padded rows (border columns included, their results discarded), so that short
// image rows make one long vector loop instead of many short ones, and their corner taps reach one element
// past the border.
template <typename acc_t>
struct PaddedPlane {
  int64_t height, width, stride;
  std::vector<acc_t> data;

  PaddedPlane(int64_t h, int64_t w) : height(h), width(w), stride(w + 2), data((h + 2) * (w + 2) + 2, acc_t(0)) {}
  acc_t* row(int64_t r) { return data.data() + 1 + (r + 1) * stride + 1; }  // image row r, column 0
  acc_t* padded_rows(int64_t r) { return row(r) - 1; }                     // from image row r's left border

  template <typename scalar_t>
  void fill(const scalar_t* plane) {
    for (int64_t h = 0; h < height; ++h) widen(plane + h * width, row(h), width);
  }
};

// out[q] = bias + sum over taps k[3i + j] * in[q + (i - 1) * stride + j - 1] for n consecutive padded positions
// starting at `in` (flipped: in[q - (i - 1) * stride - (j - 1)], the transposed stencil).
template <typename acc_t>
void stencil(const acc_t* in, int64_t stride, const acc_t* k, acc_t bias, bool flipped, acc_t* out, int64_t n) {
  acc_t taps[kTaps];
  for (int t = 0; t < kTaps; ++t) taps[t] = k[flipped ? kTaps - 1 - t : t];
  const acc_t* above = in - stride - 1;
  const acc_t* level = in - 1;
  const acc_t* below = in + stride - 1;
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) {
    out[q] = bias + taps[0] * above[q] + taps[1] * above[q + 1] + taps[2] * above[q + 2] + taps[3] * level[q] +
             taps[4] * level[q + 1] + taps[5] * level[q + 2] + taps[6] * below[q] + taps[7] * below[q + 1] +
             taps[8] * below[q + 2];
  }
}

// Rows of a padded buffer (stride W + 2, from the left border) to an image plane, borders dropped.
template <typename scalar_t, typename acc_t>
void narrow_rows(const acc_t* padded, int64_t rows, int64_t width, scalar_t* plane) {
  for (int64_t h = 0; h < rows; ++h) narrow(padded + h * (width + 2) + 1, plane + h * width, width);
}

// Forward bands of rows keep the y buffers in L1/L2 on large planes.
constexpr int64_t kForwardBandElements = 4096;

template <typename scalar_t>
void forward_planar(const dwc::Problem& p, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = p.out_channels(), plane = p.height * p.width, stride = p.width + 2;
  const int64_t band = std::clamp<int64_t>(kForwardBandElements / stride, 1, std::max<int64_t>(p.height, 1));
  const acc_t* k = weight.data_ptr<acc_t>();
  const acc_t* b = bias.data_ptr<acc_t>();
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  scalar_t* y = out.data_ptr<scalar_t>();
  at::parallel_for(0, p.batch * half, 1, [&](int64_t begin, int64_t end) {
    const int task_channels = channels_per_task(p);
    std::vector<PaddedPlane<acc_t>> planes(task_channels, PaddedPlane<acc_t>(p.height, p.width));
    std::vector<acc_t> ys(2 * band * stride);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / half, c = task % half;
      for (int u = 0; u < task_channels; ++u) planes[u].fill(x + (sample * p.channels + c + u * half) * plane);
      for (int64_t h0 = 0; h0 < p.height; h0 += band) {
        const int64_t n = std::min(band, p.height - h0) * stride;
        for (int u = 0; u < task_channels; ++u) {
          const int64_t channel = c + u * half;
          stencil(planes[u].padded_rows(h0), stride, k + kTaps * channel, b[channel], false, ys.data() + u * n, n);
        }
        if (p.gate) gate_forward(ys.data(), ys.data() + n, ys.data(), n);
        narrow_rows(ys.data(), n / stride, p.width, y + (sample * half + c) * plane + h0 * p.width);
      }
    }
  });
}

template <typename scalar_t>
void backward_planar(const dwc::Problem& p, const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& bias,
                     at::Tensor& dx, at::Tensor& partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = p.out_channels(), plane = p.height * p.width, width = p.width, stride = width + 2;
  const int64_t n = p.height * stride;  // padded positions of the image rows
  const acc_t* k = weight.data_ptr<acc_t>();
  const acc_t* b = bias.data_ptr<acc_t>();
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  const scalar_t* g = dy.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  acc_t* sums = partials.data_ptr<acc_t>();  // (B, taps + 1, C): dweight, then dbias
  at::parallel_for(0, p.batch * half, 1, [&](int64_t begin, int64_t end) {
    const int task_channels = channels_per_task(p);
    std::vector<PaddedPlane<acc_t>> xs(task_channels, PaddedPlane<acc_t>(p.height, width));
    std::vector<PaddedPlane<acc_t>> ds(task_channels, PaddedPlane<acc_t>(p.height, width));  // dL/dy
    PaddedPlane<acc_t> dout(p.height, width);
    std::vector<acc_t> ys(2 * n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / half, c = task % half;
      for (int u = 0; u < task_channels; ++u) xs[u].fill(x + (sample * p.channels + c + u * half) * plane);
      const scalar_t* g_plane = g + (sample * half + c) * plane;
      if (!p.gate) {
        ds[0].fill(g_plane);
      } else {
        dout.fill(g_plane);  // zero on the border columns, so d is too
        for (int u = 0; u < 2; ++u) {
          const int64_t channel = c + u * half;
          stencil(xs[u].padded_rows(0), stride, k + kTaps * channel, b[channel], false, ys.data() + u * n, n);
        }
        gate_backward(ys.data(), ys.data() + n, dout.padded_rows(0), ds[0].padded_rows(0), ds[1].padded_rows(0), n);
        // 0 * y there is NaN where a non-finite x reaches the border's y; padding takes no gradient.
        for (PaddedPlane<acc_t>& d : ds) {
          for (int64_t h = 0; h < p.height; ++h) d.row(h)[-1] = d.row(h)[width] = acc_t(0);
        }
      }
      for (int u = 0; u < task_channels; ++u) {
        const int64_t channel = c + u * half;
        const acc_t* d = ds[u].padded_rows(0);
        stencil(d, stride, k + kTaps * channel, acc_t(0), true, ys.data(), n);
        narrow_rows(ys.data(), p.height, width, dxp + (sample * p.channels + channel) * plane);
        // dweight[t] = sum over positions of d * x shifted by tap t; d is zero on the border columns.
        const acc_t* xc = xs[u].padded_rows(0);
        for (int t = 0; t <= kTaps; ++t) {
          const acc_t* src = xc + (t / 3 - 1) * stride + t % 3 - 1;
          acc_t s = 0;
          if (t == kTaps) {
#pragma omp simd reduction(+ : s)
            for (int64_t q = 0; q < n; ++q) s += d[q];
          } else {
#pragma omp simd reduction(+ : s)
            for (int64_t q = 0; q < n; ++q) s += d[q] * src[q];
          }
          sums[(sample * (kTaps + 1) + t) * p.channels + channel] = s;
        }
      }
    }
  });
}

// --- channels-inner --------------------------------------------------------------------------------------------

// Channels-inner tasks: bands of `rows` image rows (the last one shorter), `count` of them per sample, each
// band's d_pre buffer (band + 2 halo rows) about kBandBytes.
struct Bands {
  int64_t rows, count;
};

Bands bands_of(const dwc::Problem& p, int64_t acc_bytes) {
  const int64_t row_bytes = std::max<int64_t>(p.width * p.channels * acc_bytes, 1);
  const int64_t rows = std::clamp<int64_t>(kBandBytes / row_bytes - 2, 1, std::max<int64_t>(p.height, 1));
  return {rows, (p.height + rows - 1) / rows};
}

// acc[c] = bias[c] + sum over the taps inside the image of kt[t][c] * in(h + i - 1, w + j - 1)[c] (flipped: the
// transposed stencil, in(h - i + 1, w - j + 1)); `in(r, col)` returns a pointer to that pixel's C values, or the
// rows outside [row_lo, row_hi) count as zero padding.
template <typename acc_t, typename Pixel>
void stencil_pixel(const acc_t* kt, const acc_t* bias, int64_t channels, int64_t h, int64_t w, int64_t row_lo,
                   int64_t row_hi, int64_t width, bool flipped, Pixel in, acc_t* acc) {
  std::copy_n(bias, channels, acc);
  for (int t = 0; t < kTaps; ++t) {
    const int64_t dr = t / 3 - 1, dc = t % 3 - 1;
    const int64_t r = flipped ? h - dr : h + dr, col = flipped ? w - dc : w + dc;
    if (r < row_lo || r >= row_hi || col < 0 || col >= width) continue;
    const auto* src = in(r, col);
    const acc_t* kc = kt + t * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) acc[c] += kc[c] * static_cast<acc_t>(src[c]);
  }
}

template <typename scalar_t>
void forward_channels_inner(const dwc::Problem& p, const at::Tensor& weight_t, const at::Tensor& bias,
                            at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.channels, half = p.out_channels(), W = p.width;
  const auto [band, bands] = bands_of(p, sizeof(acc_t));
  const acc_t* kt = weight_t.data_ptr<acc_t>();
  const acc_t* b = bias.data_ptr<acc_t>();
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  scalar_t* y = out.data_ptr<scalar_t>();
  at::parallel_for(0, p.batch * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C), gated(half);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / bands, h0 = task % bands * band, h1 = std::min(h0 + band, p.height);
      const scalar_t* xs = x + sample * p.height * W * C;
      auto pixel = [&](int64_t r, int64_t col) { return xs + (r * W + col) * C; };
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          stencil_pixel(kt, b, C, h, w, 0, p.height, W, false, pixel, acc.data());
          scalar_t* dst = y + ((sample * p.height + h) * W + w) * half;
          if (p.gate) {
            gate_forward(acc.data(), acc.data() + half, gated.data(), half);
            narrow(gated.data(), dst, half);
          } else {
            narrow(acc.data(), dst, C);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_channels_inner(const dwc::Problem& p, const at::Tensor& dy, const at::Tensor& weight_t,
                             const at::Tensor& bias, at::Tensor& dx, at::Tensor& partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.channels, half = p.out_channels(), W = p.width;
  const auto [band, bands] = bands_of(p, sizeof(acc_t));
  const acc_t* kt = weight_t.data_ptr<acc_t>();
  const acc_t* b = bias.data_ptr<acc_t>();
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  const scalar_t* g = dy.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  acc_t* sums = partials.data_ptr<acc_t>();  // (B * bands, taps + 1, C): dweight, then dbias
  at::parallel_for(0, p.batch * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> d((band + 2) * W * C), acc(C), dout(half);
    const std::vector<acc_t> zeros(C, acc_t(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / bands, h0 = task % bands * band, h1 = std::min(h0 + band, p.height);
      const int64_t lo = std::max<int64_t>(h0 - 1, 0), hi = std::min(h1 + 1, p.height);  // with the halo rows
      const scalar_t* xs = x + sample * p.height * W * C;
      const scalar_t* gs = g + sample * p.height * W * half;
      auto x_pixel = [&](int64_t r, int64_t col) { return xs + (r * W + col) * C; };
      auto d_pixel = [&](int64_t r, int64_t col) { return d.data() + ((r - lo) * W + col) * C; };
      for (int64_t h = lo; h < hi; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          acc_t* dp = d_pixel(h, w);
          const scalar_t* gp = gs + (h * W + w) * half;
          if (!p.gate) {
            widen(gp, dp, C);
            continue;
          }
          stencil_pixel(kt, b, C, h, w, 0, p.height, W, false, x_pixel, acc.data());
          widen(gp, dout.data(), half);
          gate_backward(acc.data(), acc.data() + half, dout.data(), dp, dp + half, half);
        }
      }
      acc_t* task_sums = sums + task * (kTaps + 1) * C;
      std::fill_n(task_sums, (kTaps + 1) * C, acc_t(0));
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          stencil_pixel(kt, zeros.data(), C, h, w, lo, hi, W, true, d_pixel, acc.data());
          narrow(acc.data(), dxp + ((sample * p.height + h) * W + w) * C, C);
          const acc_t* dp = d_pixel(h, w);
          for (int t = 0; t < kTaps; ++t) {
            const int64_t r = h + t / 3 - 1, col = w + t % 3 - 1;
            if (r < 0 || r >= p.height || col < 0 || col >= W) continue;
            const scalar_t* src = x_pixel(r, col);
            acc_t* s = task_sums + t * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) s[c] += dp[c] * static_cast<acc_t>(src[c]);
          }
          acc_t* s = task_sums + kTaps * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) s[c] += dp[c];
        }
      }
    }
  });
}

// --- the ops ---------------------------------------------------------------------------------------------------

at::ScalarType accumulation_type(const dwc::Problem& p) {
  return p.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The weights as the kernels read them, in the accumulation type: planar (C, taps), channels-inner (taps, C).
at::Tensor kernel_weight(const dwc::Problem& p) {
  const at::Tensor w = p.weight.to(accumulation_type(p));
  return p.channels_inner ? w.t().contiguous() : w.contiguous();
}

at::Tensor kernel_bias(const dwc::Problem& p) {
  return p.bias.defined() ? p.bias.to(accumulation_type(p)).contiguous()
                          : at::zeros({p.channels}, p.x.options().dtype(accumulation_type(p)));
}

at::Tensor depthwise_conv3x3_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, bool gate) {
  const dwc::Problem p = dwc::make_problem(x, weight, bias, gate);
  at::Tensor out = dwc::new_output(p);
  if (out.numel() == 0) return out;
  const at::Tensor k = kernel_weight(p), b = kernel_bias(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv3x3_fwd", [&] {
    if (p.channels_inner) {
      forward_channels_inner<scalar_t>(p, k, b, out);
    } else {
      forward_planar<scalar_t>(p, k, b, out);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv3x3_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                         const at::Tensor& weight,
                                                                         const std::optional<at::Tensor>& bias,
                                                                         bool gate) {
  const dwc::Problem p = dwc::make_problem(x, weight, bias, gate);
  const at::Tensor g = dwc::grad_like_output(dy, p);
  at::Tensor dx = at::empty_like(p.x);
  const auto acc_options = p.x.options().dtype(accumulation_type(p));
  at::Tensor dweight = at::zeros({p.channels, kTaps}, acc_options);
  at::Tensor dbias = at::zeros({p.channels}, acc_options);
  if (dx.numel() > 0) {
    const at::Tensor k = kernel_weight(p), b = kernel_bias(p);
    const int64_t tasks = p.channels_inner ? p.batch * bands_of(p, at::elementSize(accumulation_type(p))).count
                                           : p.batch;
    at::Tensor partials = at::empty({tasks, kTaps + 1, p.channels}, acc_options);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv3x3_bwd", [&] {
      if (p.channels_inner) {
        backward_channels_inner<scalar_t>(p, g, k, b, dx, partials);
      } else {
        backward_planar<scalar_t>(p, g, k, b, dx, partials);
      }
    });
    // (tasks, taps + 1, C) reduced over the tasks one after another: the same order on every call.
    at::Tensor total = partials[0].clone();
    for (int64_t task = 1; task < partials.size(0); ++task) total.add_(partials[task]);
    dweight.copy_(total.narrow(0, 0, kTaps).t());
    dbias.copy_(total[kTaps]);
  }
  const auto dtype = p.x.scalar_type();
  return {dx, dweight.to(dtype).reshape({p.channels, 1, 3, 3}), dbias.to(dtype)};
}

}  // namespace
}  // namespace lldif_kernels

TORCH_LIBRARY_FRAGMENT(lldif_native, m) {
  m.def(lldif_kernels::dwc::kForwardSchema);
  m.def(lldif_kernels::dwc::kBackwardSchema);
}

TORCH_LIBRARY_IMPL(lldif_native, CPU, m) {
  m.impl("depthwise_conv3x3_fwd", &lldif_kernels::depthwise_conv3x3_fwd_cpu);
  m.impl("depthwise_conv3x3_bwd", &lldif_kernels::depthwise_conv3x3_bwd_cpu);
}

// EPD-modulated LayerNorm (LLDif Eq. 2) on the CPU.
//
//   y = a[b,c] * n + e[b,c],   n = (x - centre) * r,   r = 1 / sqrt(var_c(x) + eps)
//   centre = mean_c(x), or 0 for Restormer's BiasFree variant (whose variance is still centred).
//
// Work is split into tiles of positions of one sample; every tile is read from memory once and then
// swept from cache. Column sums for da/de are written per tile and reduced in tile order afterwards,
// so the backward pass is bitwise repeatable whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "../common/modulated_layer_norm.h"

namespace lldif_kernels {
namespace {

// A tile's bytes of x: long runs per channel for the prefetcher, and L2-resident for the later sweeps.
constexpr int64_t kTileBytes = 128 * 1024;
// A planar sample up to this size is one tile: splitting short channel rows costs more than it saves.
constexpr int64_t kWholeSampleBytes = 384 * 1024;
// Planar tiles keep per-position statistics in stack arrays of this length.
constexpr int64_t kMaxPlanarTile = 1024;
// Outputs this large would not stay in cache anyway, so they are streamed past it (see write_out).
constexpr int64_t kStreamBytes = 2 * 1024 * 1024;

int64_t tile_positions(const mln::Problem& p) {
  const int64_t per_position = p.channels * static_cast<int64_t>(p.x.element_size());
  const int64_t positions = std::max<int64_t>(p.positions, 1);
  if (!p.channels_inner && positions <= kMaxPlanarTile && positions * per_position <= kWholeSampleBytes)
    return positions;
  const int64_t cap = p.channels_inner ? 1024 : kMaxPlanarTile;
  int64_t tile = std::clamp<int64_t>(kTileBytes / per_position, 1, cap);
  if (!p.channels_inner && tile >= 16) tile -= tile % 16;  // whole vectors along the position axis
  return std::min(tile, positions);
}

// Streaming pays only for large outputs whose channel rows start on cache lines: a partly written line
// makes the streaming store read the line back from memory.
bool stream_output(const mln::Problem& p) {
  return p.x.nbytes() >= kStreamBytes && (p.positions * p.x.element_size()) % 64 == 0;
}

// Large outputs are written once and not read back soon: streaming stores skip the read-for-ownership that
// an ordinary store costs for every cache line of the output (a third of the memory traffic of the forward).
template <typename T>
inline void write_out(T* dst, const T* src, int64_t n, bool /*stream*/) {
  std::copy_n(src, n, dst);
}
#if defined(__AVX__)
inline void write_out(float* dst, const float* src, int64_t n, bool stream) {
  if (!stream) {
    std::copy_n(src, n, dst);
    return;
  }
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) % 32) != 0; ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}
inline void finish_streaming() { _mm_sfence(); }
#else
inline void finish_streaming() {}
#endif

template <typename acc_t>
struct RowStats {
  acc_t centre, rstd, offset;  // offset = (mean - centre) * rstd turns n into the centred x-hat
};

template <typename scalar_t, typename acc_t>
inline RowStats<acc_t> row_stats(const scalar_t* x, int64_t C, acc_t eps, bool bias_free) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) sum += static_cast<acc_t>(x[c]);
  const acc_t mean = sum / C;
  acc_t squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t d = static_cast<acc_t>(x[c]) - mean;
    squares += d * d;
  }
  const acc_t rstd = acc_t(1) / std::sqrt(squares / C + eps);
  const acc_t centre = bias_free ? acc_t(0) : mean;
  return {centre, rstd, (mean - centre) * rstd};
}

// Per-position statistics of a planar tile (x points at channel 0, position p0; channel stride P).
template <typename scalar_t, typename acc_t>
inline void planar_stats(const scalar_t* x, int64_t C, int64_t P, int64_t width, acc_t eps, bool bias_free,
                         acc_t* centre, acc_t* rstd, acc_t* offset) {
  std::fill_n(centre, width, acc_t(0));
  std::fill_n(rstd, width, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = x + c * P;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) centre[i] += static_cast<acc_t>(row[i]);
  }
  for (int64_t i = 0; i < width; ++i) centre[i] /= C;
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = x + c * P;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const acc_t d = static_cast<acc_t>(row[i]) - centre[i];
      rstd[i] += d * d;
    }
  }
  for (int64_t i = 0; i < width; ++i) {
    rstd[i] = acc_t(1) / std::sqrt(rstd[i] / C + eps);
    offset[i] = bias_free ? centre[i] * rstd[i] : acc_t(0);
    if (bias_free) centre[i] = 0;
  }
}

template <typename scalar_t>
void forward_kernel(const mln::Problem& p, const at::Tensor& a, const at::Tensor& e, double eps, bool bias_free,
                    at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.channels, P = p.positions, tile = tile_positions(p);
  const int64_t tiles = (P + tile - 1) / tile;
  const bool stream = stream_output(p);
  const scalar_t* x_data = p.x.const_data_ptr<scalar_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  const acc_t* a_data = a.const_data_ptr<acc_t>();
  const acc_t* e_data = e.const_data_ptr<acc_t>();
  const acc_t eps_acc = static_cast<acc_t>(eps);

  at::parallel_for(0, p.batch * tiles, 1, [&](int64_t begin, int64_t end) {
    std::array<acc_t, kMaxPlanarTile> centre, rstd, offset;
    std::array<scalar_t, kMaxPlanarTile> out;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, p0 = (item % tiles) * tile, width = std::min(tile, P - p0);
      const acc_t* ab = a_data + b * C;
      const acc_t* eb = e_data + b * C;
      if (p.channels_inner) {
        for (int64_t i = p0; i < p0 + width; ++i) {
          const scalar_t* xr = x_data + (b * P + i) * C;
          scalar_t* yr = y_data + (b * P + i) * C;
          const auto s = row_stats(xr, C, eps_acc, bias_free);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c)
            yr[c] = static_cast<scalar_t>(ab[c] * ((static_cast<acc_t>(xr[c]) - s.centre) * s.rstd) + eb[c]);
        }
        continue;
      }
      const scalar_t* xt = x_data + b * C * P + p0;
      scalar_t* yt = y_data + b * C * P + p0;
      planar_stats(xt, C, P, width, eps_acc, bias_free, centre.data(), rstd.data(), offset.data());
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xr = xt + c * P;
        scalar_t* yr = yt + c * P;
        const acc_t ac = ab[c], ec = eb[c];
#pragma omp simd
        for (int64_t i = 0; i < width; ++i)
          out[i] = static_cast<scalar_t>(ac * ((static_cast<acc_t>(xr[i]) - centre[i]) * rstd[i]) + ec);
        write_out(yr, out.data(), width, stream);
      }
    }
    finish_streaming();
  });
}

// dx = r * (a*g - m1 - x_hat * m2) with m1 = mean_c(a*g) (0 when bias-free), m2 = mean_c(a*g*n);
// da = sum_p g*n and de = sum_p g, first per tile into `partials` (B, tiles, 2, C), then summed in tile
// order (not thread order, which depends on the thread count).
template <typename scalar_t>
void backward_kernel(const mln::Problem& p, const at::Tensor& dy, const at::Tensor& a, double eps, bool bias_free,
                     at::Tensor& dx, at::Tensor& partials, at::Tensor& da_out, at::Tensor& de_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.channels, P = p.positions, tile = tile_positions(p);
  const int64_t tiles = partials.size(1);
  const bool stream = stream_output(p);
  const scalar_t* x_data = p.x.const_data_ptr<scalar_t>();
  const scalar_t* g_data = dy.const_data_ptr<scalar_t>();
  scalar_t* dx_data = dx.data_ptr<scalar_t>();
  const acc_t* a_data = a.const_data_ptr<acc_t>();
  acc_t* part_data = partials.data_ptr<acc_t>();
  const acc_t eps_acc = static_cast<acc_t>(eps);

  at::parallel_for(0, p.batch * tiles, 1, [&](int64_t begin, int64_t end) {
    std::array<acc_t, kMaxPlanarTile> centre, rstd, offset, m1, m2;
    std::array<scalar_t, kMaxPlanarTile> out;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, p0 = (item % tiles) * tile, width = std::min(tile, P - p0);
      const acc_t* ab = a_data + b * C;
      acc_t* da = part_data + item * 2 * C;
      acc_t* de = da + C;
      std::fill_n(da, 2 * C, acc_t(0));
      if (p.channels_inner) {
        for (int64_t i = p0; i < p0 + width; ++i) {
          const int64_t row = (b * P + i) * C;
          const scalar_t *xr = x_data + row, *gr = g_data + row;
          const auto s = row_stats(xr, C, eps_acc, bias_free);
          acc_t sum_ag = 0, sum_agn = 0;
#pragma omp simd reduction(+ : sum_ag, sum_agn)
          for (int64_t c = 0; c < C; ++c) {
            const acc_t g = static_cast<acc_t>(gr[c]);
            const acc_t n = (static_cast<acc_t>(xr[c]) - s.centre) * s.rstd;
            sum_ag += ab[c] * g;
            sum_agn += ab[c] * g * n;
            da[c] += g * n;
            de[c] += g;
          }
          const acc_t mean_ag = bias_free ? acc_t(0) : sum_ag / C, mean_agn = sum_agn / C;
          scalar_t* dxr = dx_data + row;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t n = (static_cast<acc_t>(xr[c]) - s.centre) * s.rstd;
            dxr[c] = static_cast<scalar_t>(
                s.rstd * (ab[c] * static_cast<acc_t>(gr[c]) - mean_ag - (n - s.offset) * mean_agn));
          }
        }
        continue;
      }
      const int64_t origin = b * C * P + p0;
      const scalar_t *xt = x_data + origin, *gt = g_data + origin;
      planar_stats(xt, C, P, width, eps_acc, bias_free, centre.data(), rstd.data(), offset.data());
      std::fill_n(m1.data(), width, acc_t(0));
      std::fill_n(m2.data(), width, acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t *xr = xt + c * P, *gr = gt + c * P;
        const acc_t ac = ab[c];
        acc_t sum_gn = 0, sum_g = 0;
#pragma omp simd reduction(+ : sum_gn, sum_g)
        for (int64_t i = 0; i < width; ++i) {
          const acc_t g = static_cast<acc_t>(gr[i]);
          const acc_t n = (static_cast<acc_t>(xr[i]) - centre[i]) * rstd[i];
          m1[i] += ac * g;
          m2[i] += ac * g * n;
          sum_gn += g * n;
          sum_g += g;
        }
        da[c] = sum_gn;
        de[c] = sum_g;
      }
      for (int64_t i = 0; i < width; ++i) {
        m1[i] = bias_free ? acc_t(0) : m1[i] / C;
        m2[i] /= C;
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t *xr = xt + c * P, *gr = gt + c * P;
        scalar_t* dxr = dx_data + origin + c * P;
        const acc_t ac = ab[c];
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          const acc_t n = (static_cast<acc_t>(xr[i]) - centre[i]) * rstd[i];
          out[i] = static_cast<scalar_t>(rstd[i] * (ac * static_cast<acc_t>(gr[i]) - m1[i] - (n - offset[i]) * m2[i]));
        }
        write_out(dxr, out.data(), width, stream);
      }
    }
    finish_streaming();
  });

  acc_t* da_sum = da_out.data_ptr<acc_t>();
  acc_t* de_sum = de_out.data_ptr<acc_t>();
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t t = 0; t < tiles; ++t) {
      const acc_t* da = part_data + (b * tiles + t) * 2 * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        da_sum[b * C + c] += da[c];
        de_sum[b * C + c] += da[C + c];
      }
    }
  }
}

at::Tensor modulated_layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& e, double eps,
                                        bool bias_free) {
  const auto p = mln::make_problem(x, a, eps);
  const auto a_c = mln::modulation(a, a, "a"), e_c = mln::modulation(e, a, "e");
  auto y = at::empty_like(p.x);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "modulated_layer_norm_fwd_cpu",
                                  [&] { forward_kernel<scalar_t>(p, a_c, e_c, eps, bias_free, y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_layer_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                            const at::Tensor& a, double eps,
                                                                            bool bias_free) {
  const auto p = mln::make_problem(x, a, eps);
  const auto a_c = mln::modulation(a, a, "a");
  const auto g = mln::grad_like(dy, p.x);
  auto dx = at::empty_like(p.x);
  auto da = at::zeros_like(a_c), de = at::zeros_like(a_c);
  if (dx.numel() == 0) return {dx, da, de};
  const int64_t tile = tile_positions(p);
  auto partials = at::empty({p.batch, (p.positions + tile - 1) / tile, 2, p.channels}, a_c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "modulated_layer_norm_bwd_cpu", [&] {
    backward_kernel<scalar_t>(p, g, a_c, eps, bias_free, dx, partials, da, de);
  });
  return {dx, da, de};
}

}  // namespace
}  // namespace lldif_kernels

TORCH_LIBRARY_FRAGMENT(lldif_native, m) {
  m.def(lldif_kernels::mln::kForwardSchema);
  m.def(lldif_kernels::mln::kBackwardSchema);
}

TORCH_LIBRARY_IMPL(lldif_native, CPU, m) {
  m.impl("modulated_layer_norm_fwd", &lldif_kernels::modulated_layer_norm_fwd_cpu);
  m.impl("modulated_layer_norm_bwd", &lldif_kernels::modulated_layer_norm_bwd_cpu);
}

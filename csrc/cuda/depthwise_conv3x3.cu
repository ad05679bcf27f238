// 3x3 depth-wise convolution (padding 1, stride 1, one filter per channel) and Restormer's gate on its
// result, out = gelu(y[:, :C/2]) * y[:, C/2:] (exact erf GELU), forward and backward.
//
// x is (B, C, H, W), planar (NCHW) or channels-inner (channels_last). A block stages a tile of x plus a halo
// in shared memory, in the accumulation type, so each x element of the tile leaves global memory once, and
// every output reads its 3x3 window from there. With the gate a block owns the channel pairs (c, c + C/2):
// the same thread forms both halves of y in registers and stores only the gated product.
//   planar:         one channel (pair) per block; the tile is 8, 16 or 32 columns (lanes along w, so loads
//                   and stores are coalesced) by 8 thread rows, each thread walking 1, 2 or 4 rows down.
//   channels-inner: 32 channels (pairs) per block with lane = channel (coalesced); warp r walks row r of a
//                   tile of up to 8 x 8 pixels along w. Its shared tile holds 32 channels per pixel, so the
//                   tile shrinks where it would pass the default 48 KB (float64, and the gated backward).
// Walking its line, a thread keeps the window's three cross-sections (across the line) in registers and
// reads one new cross-section per output: 3 shared loads per output instead of 9.
//
// The backward recomputes y on the tile and a 1-pixel halo from x staged with a 2-pixel halo (gate), forms
// d = dL/dy there (zero outside the image; d = dy without the gate), then dx by the flipped stencil and the
// block's sums of d * x (dweight) and d (dbias). Those are reduced within the block in a fixed order and
// written as one partial per (sample, tile, channel); the glue sums them, so no atomics and the results are
// bitwise repeatable.
//
// This file deliberately includes no torch header; the ATen glue is depthwise_conv3x3_glue.cpp; both include
// depthwise_conv3x3_launch.h.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cmath>
#include <cstdint>

#include "element_types.cuh"
#include "portability.cuh"
#include "depthwise_conv3x3_launch.h"

namespace lldif_kernels {

namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreadRows = 8;     // planar: thread rows of a block
constexpr int kMaxTileSide = 8;    // channels-inner: tile rows (= warps) and columns
constexpr int kMaxThreads = kThreadRows * 32;
// Caps registers at 128, within which the float64 gated backward fits; with no minimum ptxas spilled the
// half-precision channels-inner backward on sm_90 (at 64 registers).
constexpr int kMinBlocks = 2;
constexpr int kTaps = 9;
constexpr int kSums = kTaps + 1;   // a channel's partial: the 9 dweight taps, then dbias
constexpr size_t kSharedLimit = 48 * 1024;  // dynamic shared memory without an opt-in
// Channel, row and column coordinates stay in int with the halo added.
constexpr int64_t kMaxExtent = INT32_MAX - 64;
constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrtTwoPi = 0.39894228040143267794;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

using device::Acc;
using device::with_element_type;
using device::store;
using device::widen;

LLDIF_DYNAMIC_SHARED(dwc_smem);

// The launch's geometry. A block serves one sample, one group of out channels (1 planar, 32 channels-inner;
// with their gate partners) and one tile of rows x cols outputs.
struct Tiling {
  int height, width, channels, out_channels;
  int rows, cols;
  int line;  // outputs per thread: along h (planar) or w (channels-inner)
  int tiles_across;
  int64_t tiles, groups;
};

template <bool kChannelsInner>
constexpr int kGroupWidth = kChannelsInner ? kWarpSize : 1;

template <bool kChannelsInner>
__device__ __forceinline__ int lane_channel() {
  return kChannelsInner ? static_cast<int>(threadIdx.x % kWarpSize) : 0;
}

struct Place {
  int64_t b, tile;
  int c0, h0, w0;
};

// Tiles vary fastest along the grid, so neighbouring blocks share halo rows in L2.
template <bool kChannelsInner>
__device__ __forceinline__ Place place_of(const Tiling& t) {
  const int64_t block = blockIdx.x;
  const int64_t tile = block % t.tiles, rest = block / t.tiles;
  return {rest / t.groups, tile, static_cast<int>(rest % t.groups) * kGroupWidth<kChannelsInner>,
          static_cast<int>(tile / t.tiles_across) * t.rows, static_cast<int>(tile % t.tiles_across) * t.cols};
}

// Element (b, c, h, w) of a dense tensor with `channels` channels in the layout.
template <bool kChannelsInner>
__device__ __forceinline__ int64_t offset(int64_t b, int c, int h, int w, int channels, const Tiling& t) {
  if constexpr (kChannelsInner) return ((b * t.height + h) * t.width + w) * channels + c;
  return ((b * channels + c) * t.height + h) * static_cast<int64_t>(t.width) + w;
}

// A shared tile: planes x (rows x cols of the block's tile plus `halo` on each side) x the group's channels,
// channel fastest, so that consecutive threads of a load write consecutive elements.
template <bool kChannelsInner>
struct View {
  int rows, cols, halo;

  // The element of this thread's channel at (r, col) of the output tile (-halo .. size + halo - 1).
  __device__ int at(int plane, int r, int col) const {
    return ((plane * rows + r + halo) * cols + col + halo) * kGroupWidth<kChannelsInner> +
           lane_channel<kChannelsInner>();
  }
  __device__ int size(int planes) const { return planes * rows * cols * kGroupWidth<kChannelsInner>; }
  // Element steps along the thread's line and across it.
  __device__ int along() const { return kChannelsInner ? kWarpSize : cols; }
  __device__ int across() const { return kChannelsInner ? cols * kWarpSize : 1; }
};

template <bool kChannelsInner>
__device__ __forceinline__ View<kChannelsInner> view_of(const Tiling& t, int halo) {
  return {t.rows + 2 * halo, t.cols + 2 * halo, halo};
}

// Calls f(plane, r, col) for this thread's share of the view's cells, in tile coordinates. Planar: lanes along
// the columns; channels-inner: a warp per pixel, each lane its channel.
template <bool kChannelsInner, typename F>
__device__ __forceinline__ void for_each_cell(const View<kChannelsInner>& v, int planes, const Tiling& t, F&& f) {
  if constexpr (kChannelsInner) {
    const int warps = blockDim.x / kWarpSize, cells = v.rows * v.cols;
    for (int i = threadIdx.x / kWarpSize; i < planes * cells; i += warps) {
      const int plane = i / cells, cell = i % cells;
      f(plane, cell / v.cols - v.halo, cell % v.cols - v.halo);
    }
  } else {
    const int tx = threadIdx.x % t.cols, ty = threadIdx.x / t.cols;
    for (int i = ty; i < planes * v.rows; i += kThreadRows) {
      const int plane = i / v.rows, r = i % v.rows - v.halo;
      for (int col = tx; col < v.cols; col += t.cols) f(plane, r, col - v.halo);
    }
  }
}

// Plane p of the tile holds channel c0 + lane + p * out_channels of src; zeros outside the image (the
// padding) and for channels past the group's end.
template <bool kChannelsInner, typename T, typename A>
__device__ __forceinline__ void stage(const T* __restrict__ src, int src_channels, int planes,
                                      const View<kChannelsInner>& v, A* tile, const Tiling& t, const Place& at) {
  const int c = at.c0 + lane_channel<kChannelsInner>();
  const bool channel_ok = c < t.out_channels;
  for_each_cell(v, planes, t, [&](int plane, int r, int col) {
    const int h = at.h0 + r, w = at.w0 + col;
    const bool inside = channel_ok && h >= 0 && h < t.height && w >= 0 && w < t.width;
    tile[v.at(plane, r, col)] =
        inside ? widen(src[offset<kChannelsInner>(at.b, c + plane * t.out_channels, h, w, src_channels, t)]) : A(0);
  });
}

template <typename A>
struct Filter {
  A w[kTaps];
  A bias;
};

template <typename A, typename T>
__device__ __forceinline__ Filter<A> filter_of(const T* __restrict__ weight, const T* __restrict__ bias, int c,
                                               bool valid) {
  Filter<A> f;
  const T* w = weight + static_cast<int64_t>(c) * kTaps;
#pragma unroll
  for (int i = 0; i < kTaps; ++i) f.w[i] = valid ? widen(w[i]) : A(0);
  f.bias = valid && bias != nullptr ? widen(bias[c]) : A(0);
  return f;
}

// The tap of the window offset (a along the line, b across it): a is the row offset for planar lines (down
// the column), the column offset for channels-inner ones (along the row).
template <bool kChannelsInner>
__device__ constexpr int tap(int a, int b) {
  return kChannelsInner ? 3 * (b + 1) + (a + 1) : 3 * (a + 1) + (b + 1);
}

// This thread's line of t.line outputs in tile coordinates, from (r0, col0) down (planar) or right.
struct Line {
  int r0, col0;
};

template <bool kChannelsInner>
__device__ __forceinline__ Line line_of(const Tiling& t) {
  if constexpr (kChannelsInner) return {static_cast<int>(threadIdx.x / kWarpSize), 0};
  return {static_cast<int>(threadIdx.x / t.cols) * t.line, static_cast<int>(threadIdx.x % t.cols)};
}

template <typename A>
__device__ __forceinline__ void load_section(const A* tile, int centre, int across, A (&section)[3]) {
#pragma unroll
  for (int b = 0; b < 3; ++b) section[b] = tile[centre + (b - 1) * across];
}

template <typename A>
__device__ __forceinline__ void shift_window(A (&window)[3][3]) {
#pragma unroll
  for (int b = 0; b < 3; ++b) {
    window[0][b] = window[1][b];
    window[1][b] = window[2][b];
  }
}

// window[a + 1][b + 1]: the value at offset (a along the line, b across it) from the output.
template <bool kChannelsInner, typename A>
__device__ __forceinline__ A convolve(const A (&window)[3][3], const Filter<A>& f) {
  A y = f.bias;
#pragma unroll
  for (int a = -1; a <= 1; ++a) {
#pragma unroll
    for (int b = -1; b <= 1; ++b) y += f.w[tap<kChannelsInner>(a, b)] * window[a + 1][b + 1];
  }
  return y;
}

// erf and exp, not their fast intrinsics: the result is held to twice PyTorch's own error.
template <typename A>
__device__ __forceinline__ A normal_cdf(A g) {
  return A(0.5) * (A(1) + erf(g * A(kSqrtHalf)));
}

template <typename A>
__device__ __forceinline__ A gelu(A g) {
  return g * normal_cdf(g);
}

template <typename A>
__device__ __forceinline__ A gelu_slope(A g, A cdf) {
  return cdf + g * (A(kInvSqrtTwoPi) * exp(A(-0.5) * g * g));
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(kFullMask, v, mask);
  return v;
}

template <typename T, bool kChannelsInner, bool kGate>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    depthwise_conv3x3_fwd_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                 const T* __restrict__ bias, T* __restrict__ out, Tiling t) {
  using A = Acc<T>;
  constexpr int kPlanes = kGate ? 2 : 1;
  A* tile = reinterpret_cast<A*>(dwc_smem);
  const Place at = place_of<kChannelsInner>(t);
  const View<kChannelsInner> v = view_of<kChannelsInner>(t, 1);
  stage(x, t.channels, kPlanes, v, tile, t, at);

  const int c = at.c0 + lane_channel<kChannelsInner>();
  const bool channel_ok = c < t.out_channels;
  Filter<A> f[kPlanes];
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) f[p] = filter_of<A>(weight, bias, c + p * t.out_channels, channel_ok);
  const Line line = line_of<kChannelsInner>(t);
  const int along = v.along(), across = v.across(), plane_size = v.size(1);
  int centre = v.at(0, line.r0, line.col0);
  __syncthreads();

  A window[kPlanes][3][3];
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
    load_section(tile, centre + p * plane_size - along, across, window[p][0]);
    load_section(tile, centre + p * plane_size, across, window[p][1]);
  }
  for (int u = 0; u < t.line; ++u, centre += along) {
    A y[kPlanes];
#pragma unroll
    for (int p = 0; p < kPlanes; ++p) {
      load_section(tile, centre + p * plane_size + along, across, window[p][2]);
      y[p] = convolve<kChannelsInner>(window[p], f[p]);
      shift_window(window[p]);
    }
    const int h = at.h0 + line.r0 + (kChannelsInner ? 0 : u), w = at.w0 + line.col0 + (kChannelsInner ? u : 0);
    if (channel_ok && h < t.height && w < t.width) {
      A result = y[0];
      if constexpr (kGate) result = gelu(y[0]) * y[1];
      store(out + offset<kChannelsInner>(at.b, c, h, w, t.out_channels, t), result);
    }
  }
}

// partials[((b * tiles + tile) * kSums + s) * C + c]: the block's sum over its tile of d * x at tap s (s < 9)
// or of d (s = 9), for each channel c of the block; every element is written by exactly one block.
template <typename T, bool kChannelsInner, bool kGate>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    depthwise_conv3x3_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ weight,
                                 const T* __restrict__ bias, T* __restrict__ dx, Acc<T>* __restrict__ partials,
                                 Tiling t) {
  using A = Acc<T>;
  constexpr int kPlanes = kGate ? 2 : 1;
  constexpr int kK = kGroupWidth<kChannelsInner>;
  A* smem = reinterpret_cast<A*>(dwc_smem);
  const Place at = place_of<kChannelsInner>(t);
  // The gate's d needs y, hence x, one pixel beyond the d tile's halo.
  const View<kChannelsInner> xv = view_of<kChannelsInner>(t, kGate ? 2 : 1), dv = view_of<kChannelsInner>(t, 1);
  A* x_tile = smem;
  A* d_tile = smem + xv.size(kPlanes);
  stage(x, t.channels, kPlanes, xv, x_tile, t, at);

  const int c = at.c0 + lane_channel<kChannelsInner>();
  const bool channel_ok = c < t.out_channels;
  Filter<A> f[kPlanes];
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) f[p] = filter_of<A>(weight, bias, c + p * t.out_channels, channel_ok);

  if constexpr (kGate) {
    __syncthreads();
    const int x_plane = xv.size(1);
    for_each_cell(dv, 1, t, [&](int, int r, int col) {
      const int h = at.h0 + r, w = at.w0 + col;
      A d_gate = A(0), d_value = A(0);
      if (channel_ok && h >= 0 && h < t.height && w >= 0 && w < t.width) {
        A y[kPlanes];
#pragma unroll
        for (int p = 0; p < kPlanes; ++p) {
          A window[3][3];
#pragma unroll
          for (int a = 0; a < 3; ++a) {
            load_section(x_tile, xv.at(0, r, col) + p * x_plane + (a - 1) * xv.along(), xv.across(), window[a]);
          }
          y[p] = convolve<kChannelsInner>(window, f[p]);
        }
        const A grad = widen(dy[offset<kChannelsInner>(at.b, c, h, w, t.out_channels, t)]);
        const A cdf = normal_cdf(y[0]);
        d_gate = grad * y[1] * gelu_slope(y[0], cdf);
        d_value = grad * (y[0] * cdf);
      }
      d_tile[dv.at(0, r, col)] = d_gate;
      d_tile[dv.at(1, r, col)] = d_value;
    });
  } else {
    stage(dy, t.channels, 1, dv, d_tile, t, at);
  }
  __syncthreads();

  const Line line = line_of<kChannelsInner>(t);
  A sums[kPlanes][kSums];
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
#pragma unroll
    for (int s = 0; s < kSums; ++s) sums[p][s] = A(0);
    int x_centre = xv.at(p, line.r0, line.col0), d_centre = dv.at(p, line.r0, line.col0);
    A x_window[3][3], d_window[3][3];
    load_section(x_tile, x_centre - xv.along(), xv.across(), x_window[0]);
    load_section(x_tile, x_centre, xv.across(), x_window[1]);
    load_section(d_tile, d_centre - dv.along(), dv.across(), d_window[0]);
    load_section(d_tile, d_centre, dv.across(), d_window[1]);
    for (int u = 0; u < t.line; ++u, x_centre += xv.along(), d_centre += dv.along()) {
      load_section(x_tile, x_centre + xv.along(), xv.across(), x_window[2]);
      load_section(d_tile, d_centre + dv.along(), dv.across(), d_window[2]);
      const int h = at.h0 + line.r0 + (kChannelsInner ? 0 : u), w = at.w0 + line.col0 + (kChannelsInner ? u : 0);
      // Outputs beyond the image have d = 0 but would still multiply x (an inf there would give NaN).
      if (channel_ok && h < t.height && w < t.width) {
        // dx(q) = sum over taps of w(a, b) * d(q - (a, b)).
        A grad_x = A(0);
#pragma unroll
        for (int a = -1; a <= 1; ++a) {
#pragma unroll
          for (int b = -1; b <= 1; ++b) grad_x += f[p].w[tap<kChannelsInner>(a, b)] * d_window[1 - a][1 - b];
        }
        store(dx + offset<kChannelsInner>(at.b, c + p * t.out_channels, h, w, t.channels, t), grad_x);
        const A d = d_window[1][1];
#pragma unroll
        for (int a = -1; a <= 1; ++a) {
#pragma unroll
          for (int b = -1; b <= 1; ++b) sums[p][tap<kChannelsInner>(a, b)] += d * x_window[a + 1][b + 1];
        }
        sums[p][kTaps] += d;
      }
      shift_window(x_window);
      shift_window(d_window);
    }
  }

  // Block reduction in a fixed order: planar lanes share the channel (xor butterfly, identical bits in every
  // lane), then scratch[(value * warps + warp) * kK + lane] is summed over the warps in index order.
  __syncthreads();  // the tiles are dead; the scratch reuses their memory
  A* scratch = smem;
  const int warps = blockDim.x / kWarpSize, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int p = 0; p < kPlanes; ++p) {
#pragma unroll
    for (int s = 0; s < kSums; ++s) {
      const int value = p * kSums + s;
      if constexpr (kChannelsInner) {
        scratch[(value * warps + warp) * kK + lane] = sums[p][s];
      } else {
        const A total = warp_sum(sums[p][s]);
        if (lane == 0) scratch[value * warps + warp] = total;
      }
    }
  }
  __syncthreads();
  A* block_partials = partials + (at.b * t.tiles + at.tile) * kSums * t.channels;
  for (int i = threadIdx.x; i < kPlanes * kSums * kK; i += blockDim.x) {
    const int value = i / kK, k = i % kK;
    const int p = value / kSums, s = value % kSums;
    if (at.c0 + k >= t.out_channels) continue;
    A total = A(0);
    for (int w = 0; w < warps; ++w) total += scratch[(value * warps + w) * kK + k];
    block_partials[static_cast<int64_t>(s) * t.channels + at.c0 + k + p * t.out_channels] = total;
  }
}

struct Plan {
  Tiling t;
  int threads;
  size_t shared_bytes;
  int64_t blocks;
};

size_t shared_bytes_of(const Tiling& t, int threads, const DwcShape& s, bool backward, size_t acc_bytes) {
  const int64_t group = s.channels_inner ? kWarpSize : 1, planes = s.gate ? 2 : 1;
  auto cells = [&](int halo) { return planes * (t.rows + 2 * halo) * (t.cols + 2 * halo) * group; };
  if (!backward) return static_cast<size_t>(cells(1)) * acc_bytes;
  const int64_t tiles = cells(s.gate ? 2 : 1) + cells(1);
  const int64_t scratch = planes * kSums * (threads / kWarpSize) * group;
  return static_cast<size_t>(tiles > scratch ? tiles : scratch) * acc_bytes;
}

int power_of_two_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

// Depends on the shape, the accumulation type and the direction only, which keeps the partials (and so
// dweight and dbias) repeatable. Extents must be within kMaxExtent (the glue checks).
Plan plan_of(ElementType dtype, const DwcShape& s, bool backward) {
  const size_t acc_bytes = dtype == ElementType::kFloat64 ? sizeof(double) : sizeof(float);
  Plan plan{};
  Tiling& t = plan.t;
  t.height = static_cast<int>(s.height), t.width = static_cast<int>(s.width);
  t.channels = static_cast<int>(s.channels), t.out_channels = static_cast<int>(s.gate ? s.channels / 2 : s.channels);
  if (s.channels_inner) {
    t.rows = power_of_two_at_least(s.height, kMaxTileSide);
    t.cols = power_of_two_at_least(s.width, kMaxTileSide);
    while (shared_bytes_of(t, kWarpSize * t.rows, s, backward, acc_bytes) > kSharedLimit) {
      if (t.cols >= t.rows) {
        t.cols /= 2;
      } else {
        t.rows /= 2;
      }
    }
    t.line = t.cols;
    plan.threads = kWarpSize * t.rows;
  } else {
    t.cols = s.width > 16 ? 32 : s.width > 8 ? 16 : 8;
    t.line = s.height > 16 ? 4 : s.height > 8 ? 2 : 1;
    t.rows = kThreadRows * t.line;
    plan.threads = kThreadRows * t.cols;
  }
  plan.shared_bytes = shared_bytes_of(t, plan.threads, s, backward, acc_bytes);
  const int64_t tiles_across = ceil_div(s.width, t.cols);
  t.tiles_across = static_cast<int>(tiles_across);
  t.tiles = tiles_across * ceil_div(s.height, t.rows);
  t.groups = s.channels_inner ? ceil_div(t.out_channels, kWarpSize) : t.out_channels;
  plan.blocks = s.batch * t.groups * t.tiles;
  return plan;
}

bool is_empty(const DwcShape& s) { return s.batch == 0 || s.channels == 0 || s.height == 0 || s.width == 0; }

template <typename T>
using FwdKernel = void (*)(const T*, const T*, const T*, T*, Tiling);
template <typename T>
using BwdKernel = void (*)(const T*, const T*, const T*, const T*, T*, Acc<T>*, Tiling);

template <typename T>
FwdKernel<T> fwd_kernel(const DwcShape& s) {
  if (s.channels_inner) {
    return s.gate ? depthwise_conv3x3_fwd_kernel<T, true, true> : depthwise_conv3x3_fwd_kernel<T, true, false>;
  }
  return s.gate ? depthwise_conv3x3_fwd_kernel<T, false, true> : depthwise_conv3x3_fwd_kernel<T, false, false>;
}

template <typename T>
BwdKernel<T> bwd_kernel(const DwcShape& s) {
  if (s.channels_inner) {
    return s.gate ? depthwise_conv3x3_bwd_kernel<T, true, true> : depthwise_conv3x3_bwd_kernel<T, true, false>;
  }
  return s.gate ? depthwise_conv3x3_bwd_kernel<T, false, true> : depthwise_conv3x3_bwd_kernel<T, false, false>;
}

// Empty problems launch nothing; otherwise plans the launch and calls launch(element, plan) with a value of
// the element type that dtype names, then reports the launch error.
template <typename F>
cudaError_t plan_and_launch(ElementType dtype, const DwcShape& shape, bool backward, F&& launch) {
  if (is_empty(shape)) return cudaSuccess;
  if (shape.channels > kMaxExtent || shape.height > kMaxExtent || shape.width > kMaxExtent) {
    return cudaErrorInvalidConfiguration;
  }
  const Plan plan = plan_of(dtype, shape, backward);
  if (plan.blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  return with_element_type(dtype, [&](auto element) {
    launch(element, plan);
    return cudaGetLastError();
  });
}

}  // namespace

int64_t depthwise_conv3x3_max_extent() { return kMaxExtent; }

int64_t depthwise_conv3x3_blocks(ElementType dtype, const DwcShape& shape, bool backward) {
  return is_empty(shape) ? 0 : plan_of(dtype, shape, backward).blocks;
}

int64_t depthwise_conv3x3_bwd_tiles(ElementType dtype, const DwcShape& shape) {
  return shape.height == 0 || shape.width == 0 ? 0 : plan_of(dtype, shape, true).t.tiles;
}

// x, out: the element type of dtype, dense in the layout of shape.channels_inner (out has C/2 channels with
// the gate); weight (C, 9) and bias (C,) (or null) contiguous in the same type. Asynchronous on stream; an
// empty problem launches nothing.
cudaError_t depthwise_conv3x3_fwd_cuda(ElementType dtype, const DwcShape& shape, const void* x, const void* weight,
                                       const void* bias, void* out, cudaStream_t stream) {
  return plan_and_launch(dtype, shape, false, [&](auto element, const Plan& plan) {
    using T = decltype(element);
    const FwdKernel<T> kernel = fwd_kernel<T>(shape);
    LLDIF_LAUNCH(static_cast<unsigned>(plan.blocks), plan.threads, plan.shared_bytes, stream, kernel)(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(out),
        plan.t);
  });
}

// dy: out's shape and layout; x, weight, bias: as in the forward; dx: x's shape and layout. partials:
// (B, depthwise_conv3x3_bwd_tiles, 10, C) of the accumulation type (float, double for kFloat64), every
// element overwritten (no zero fill needed): per tile, the 9 dweight taps then dbias of each channel.
cudaError_t depthwise_conv3x3_bwd_cuda(ElementType dtype, const DwcShape& shape, const void* dy, const void* x,
                                       const void* weight, const void* bias, void* dx, void* partials,
                                       cudaStream_t stream) {
  return plan_and_launch(dtype, shape, true, [&](auto element, const Plan& plan) {
    using T = decltype(element);
    const BwdKernel<T> kernel = bwd_kernel<T>(shape);
    LLDIF_LAUNCH(static_cast<unsigned>(plan.blocks), plan.threads, plan.shared_bytes, stream, kernel)(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(weight),
        static_cast<const T*>(bias), static_cast<T*>(dx), static_cast<Acc<T>*>(partials), plan.t);
  });
}

}  // namespace lldif_kernels

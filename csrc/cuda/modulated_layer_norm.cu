// EPD-modulated LayerNorm over channels, y = a * (x - centre) * rsqrt(var + eps) + e, forward and backward.
//
// An activation is seen as (B, C, P) in one of two dense layouts (see lldif_kernels/_layout.py):
//   channels-inner: channel stride 1, position stride C  -> a row (b, p) is C adjacent values;
//   planar:         channel stride P, position stride 1  -> adjacent positions share a channel.
// Every block serves one sample and a tile of kTilePositions positions. Channels-inner rows go to whole warps
// (lanes stride over c); planar blocks put 32 adjacent positions on the lanes (coalesced loads) and split the
// channels over the warps. Statistics are computed with Welford in one read of x instead of E[x^2] - mu^2.
//
// This file deliberately includes no torch header, so it compiles in seconds; the ATen glue is
// modulated_layer_norm_glue.cpp; both include modulated_layer_norm_launch.h.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

#include "element_types.cuh"
#include "portability.cuh"
#include "modulated_layer_norm_launch.h"

namespace lldif_kernels {

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 8;
constexpr int kTilePositions = 32;  // planar: one position per lane; channels-inner: four rows per warp
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int64_t position_tiles(int64_t positions) { return (positions + kTilePositions - 1) / kTilePositions; }

using device::Acc;
using device::with_element_type;
using device::store;
using device::widen;

// Welford divides by a count once per element, so the IEEE division sequences are avoided: float uses the
// 2-ulp hardware division; for double (whose IEEE division is a called subroutine that spills on sm_80) two
// Newton steps from the float reciprocal reach full double precision.
__device__ __forceinline__ float divide_by_count(float num, float count) { return __fdividef(num, count); }
__device__ __forceinline__ double divide_by_count(double num, double count) {
  double inv = __frcp_rn(static_cast<float>(count));
  inv *= 2.0 - count * inv;
  inv *= 2.0 - count * inv;
  return num * inv;
}

// Running mean and m2 (sum of squared deviations); NaN in any input propagates into both.
template <typename A>
struct MeanVar {
  A count, mean, m2;

  __device__ static MeanVar empty() { return {A(0), A(0), A(0)}; }

  __device__ void push(A v) {
    count += A(1);
    const A delta = v - mean;
    mean += divide_by_count(delta, count);
    m2 += delta * (v - mean);
  }

  // Chan's combination. Its rounding depends on operand order, so callers always pass the lower-numbered
  // thread's part first: every thread of a row then ends with the same bits of mean and r.
  __device__ static MeanVar merge(const MeanVar& lo, const MeanVar& hi) {
    const A count = lo.count + hi.count;
    // Both parts empty happens for lanes beyond C and for tail positions.
    const A hi_share = count > A(0) ? divide_by_count(hi.count, count) : A(0);
    const A delta = hi.mean - lo.mean;
    return {count, lo.mean + delta * hi_share, lo.m2 + hi.m2 + delta * delta * lo.count * hi_share};
  }
};

// Channels of row (b, p) visited by this thread: c = first, first + step, ... < C at x[base + c * stride].
struct RowSlice {
  int64_t base, stride;
  int first, step;
};

template <bool kChannelsInner>
__device__ __forceinline__ RowSlice row_slice(int64_t b, int64_t p, int C, int64_t P) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (kChannelsInner) return {(b * P + p) * C, 1, lane, kWarpSize};
  return {b * C * P + p, P, warp, static_cast<int>(blockDim.x / kWarpSize)};
}

// xor butterfly: both partners add the same two values, so all lanes end with identical bits.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(kFullMask, v, mask);
  return v;
}

// Combines the parts of every thread that shares this thread's row. Planar: contains __syncthreads(), so all
// threads of the block must call it (tail positions with empty parts included).
template <bool kChannelsInner, typename A>
__device__ MeanVar<A> row_mean_var(MeanVar<A> part, A* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if constexpr (kChannelsInner) {
#pragma unroll
    for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
      const MeanVar<A> other{__shfl_xor_sync(kFullMask, part.count, mask),
                             __shfl_xor_sync(kFullMask, part.mean, mask),
                             __shfl_xor_sync(kFullMask, part.m2, mask)};
      part = (lane & mask) ? MeanVar<A>::merge(other, part) : MeanVar<A>::merge(part, other);
    }
    return part;
  } else {
    constexpr int kSlot = kMaxWarps * kWarpSize;
    const int slot = warp * kWarpSize + lane;
    scratch[slot] = part.count;
    scratch[kSlot + slot] = part.mean;
    scratch[2 * kSlot + slot] = part.m2;
    __syncthreads();
    MeanVar<A> row = MeanVar<A>::empty();
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) {
      const int s = w * kWarpSize + lane;
      row = MeanVar<A>::merge(row, {scratch[s], scratch[kSlot + s], scratch[2 * kSlot + s]});
    }
    __syncthreads();  // scratch is reused by the next reduction
    return row;
  }
}

// Same contract as row_mean_var, for two plain sums at once (warps are summed in index order).
template <bool kChannelsInner, typename A>
__device__ void row_sums(A& u, A& v, A* scratch) {
  if constexpr (kChannelsInner) {
    u = warp_sum(u);
    v = warp_sum(v);
  } else {
    constexpr int kSlot = kMaxWarps * kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const int slot = (threadIdx.x / kWarpSize) * kWarpSize + lane;
    scratch[slot] = u;
    scratch[kSlot + slot] = v;
    __syncthreads();
    u = v = A(0);
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) {
      u += scratch[w * kWarpSize + lane];
      v += scratch[kSlot + w * kWarpSize + lane];
    }
    __syncthreads();
  }
}

template <typename A>
struct RowStats {
  A mean, r, centre;
};

template <bool kChannelsInner, typename T, typename A>
__device__ RowStats<A> row_stats(const T* __restrict__ x, const RowSlice& s, bool valid, int C, A eps,
                                 bool bias_free, A* scratch) {
  MeanVar<A> part = MeanVar<A>::empty();
  if (valid) {
#pragma unroll 4
    for (int c = s.first; c < C; c += s.step) part.push(widen(x[s.base + c * s.stride]));
  }
  const MeanVar<A> row = row_mean_var<kChannelsInner>(part, scratch);
  return {row.mean, rsqrt(row.m2 / A(C) + eps), bias_free ? A(0) : row.mean};
}

// This block's sample, its first position and how many of the tile's positions exist, and the thread's place.
struct BlockTile {
  int64_t b, tile_start;
  int rows, lane, warp, warps;
};

__device__ __forceinline__ BlockTile block_tile(int64_t P, int64_t tiles) {
  const int64_t tile_start = (blockIdx.x % tiles) * kTilePositions;
  return {blockIdx.x / tiles, tile_start,
          static_cast<int>(P - tile_start < kTilePositions ? P - tile_start : kTilePositions),
          static_cast<int>(threadIdx.x % kWarpSize), static_cast<int>(threadIdx.x / kWarpSize),
          static_cast<int>(blockDim.x / kWarpSize)};
}

template <typename T, bool kChannelsInner>
__global__ void __launch_bounds__(kMaxWarps * kWarpSize)
    modulated_layer_norm_fwd_kernel(const T* __restrict__ x, const Acc<T>* __restrict__ a,
                                    const Acc<T>* __restrict__ e, T* __restrict__ y, int C, int64_t P,
                                    int64_t tiles, Acc<T> eps, bool bias_free) {
  using A = Acc<T>;
  __shared__ A scratch[3 * kMaxWarps * kWarpSize];
  const BlockTile t = block_tile(P, tiles);
  const int64_t b = t.b, tile_start = t.tile_start;
  const int rows = t.rows, lane = t.lane, warp = t.warp, warps = t.warps;
  const A* a_b = a + b * C;
  const A* e_b = e + b * C;

  auto normalise_row = [&](int row, bool valid) {
    const RowSlice s = row_slice<kChannelsInner>(b, tile_start + row, C, P);
    const RowStats<A> st = row_stats<kChannelsInner>(x, s, valid, C, eps, bias_free, scratch);
    if (!valid) return;
#pragma unroll 4
    for (int c = s.first; c < C; c += s.step) {
      const int64_t i = s.base + c * s.stride;
      store(y + i, a_b[c] * ((widen(x[i]) - st.centre) * st.r) + e_b[c]);
    }
  };
  if constexpr (kChannelsInner) {
    for (int row = warp; row < rows; row += warps) normalise_row(row, true);
  } else {
    normalise_row(lane, lane < rows);
  }
}

// dx = r * (gh - m1 - (x - mu) * r * m2), gh = a * dy, m1 = mean_c gh (0 if bias_free), m2 = mean_c gh * n.
// da, de are summed over this block's positions into da_partials / de_partials[(b * tiles + tile) * C + c]
// in a fixed order (no atomics); the glue sums the tiles, which keeps the result deterministic.
template <typename T, bool kChannelsInner>
__global__ void __launch_bounds__(kMaxWarps * kWarpSize)
    modulated_layer_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                    const Acc<T>* __restrict__ a, T* __restrict__ dx,
                                    Acc<T>* __restrict__ da_partials, Acc<T>* __restrict__ de_partials, int C,
                                    int64_t P, int64_t tiles, Acc<T> eps, bool bias_free) {
  using A = Acc<T>;
  __shared__ A scratch[3 * kMaxWarps * kWarpSize];
  const BlockTile t = block_tile(P, tiles);
  const int64_t b = t.b, tile_start = t.tile_start;
  const int rows = t.rows, lane = t.lane, warp = t.warp, warps = t.warps;
  const A* a_b = a + b * C;
  A* da_tile = da_partials + static_cast<int64_t>(blockIdx.x) * C;
  A* de_tile = de_partials + static_cast<int64_t>(blockIdx.x) * C;

  // Everything dx needs besides gh and x: centre and r for n, then m1 and k = r * m2.
  struct RowGrad {
    RowStats<A> st;
    A m1, k;
  };
  auto row_grad = [&](const RowSlice& s, bool valid) -> RowGrad {
    const RowStats<A> st = row_stats<kChannelsInner>(x, s, valid, C, eps, bias_free, scratch);
    A sum_gh = A(0), sum_gh_n = A(0);
    if (valid) {
#pragma unroll 4
      for (int c = s.first; c < C; c += s.step) {
        const int64_t i = s.base + c * s.stride;
        const A gh = a_b[c] * widen(dy[i]);
        sum_gh += gh;
        sum_gh_n += gh * ((widen(x[i]) - st.centre) * st.r);
      }
    }
    row_sums<kChannelsInner>(sum_gh, sum_gh_n, scratch);
    return {st, bias_free ? A(0) : sum_gh / A(C), st.r * (sum_gh_n / A(C))};
  };

  if constexpr (kChannelsInner) {
    // Phase 1, one warp per row: row statistics into shared memory.
    A* row_mean = scratch;
    A* row_r = scratch + kTilePositions;
    A* row_m1 = scratch + 2 * kTilePositions;
    A* row_k = scratch + 3 * kTilePositions;
    for (int row = warp; row < rows; row += warps) {
      const RowGrad g = row_grad(row_slice<true>(b, tile_start + row, C, P), true);
      if (lane == 0) {
        row_mean[row] = g.st.mean;
        row_r[row] = g.st.r;
        row_m1[row] = g.m1;
        row_k[row] = g.k;
      }
    }
    __syncthreads();
    // Phase 2, one thread per channel walking the tile's rows in order: da/de accumulate in registers and
    // consecutive threads still touch consecutive addresses.
    const int64_t tile_base = (b * P + tile_start) * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const A a_c = a_b[c];
      A da = A(0), de = A(0);
#pragma unroll 4
      for (int row = 0; row < rows; ++row) {
        const int64_t i = tile_base + static_cast<int64_t>(row) * C + c;
        const A g = widen(dy[i]), xv = widen(x[i]);
        const A centre = bias_free ? A(0) : row_mean[row];
        da += g * ((xv - centre) * row_r[row]);
        de += g;
        store(dx + i, row_r[row] * (a_c * g - row_m1[row] - (xv - row_mean[row]) * row_k[row]));
      }
      da_tile[c] = da;
      de_tile[c] = de;
    }
  } else {
    // Each warp owns channels warp, warp + warps, ...; its lanes hold the tile's positions, so one warp_sum
    // per channel finishes that channel's da/de for the block. The c loop is warp-uniform: tail lanes join
    // in with zeros.
    const bool valid = lane < rows;
    const RowSlice s = row_slice<false>(b, tile_start + lane, C, P);
    const RowGrad g = row_grad(s, valid);
#pragma unroll 4
    for (int c = s.first; c < C; c += s.step) {
      const int64_t i = s.base + c * s.stride;
      const A go = valid ? widen(dy[i]) : A(0);
      const A xv = valid ? widen(x[i]) : A(0);
      if (valid) store(dx + i, g.st.r * (a_b[c] * go - g.m1 - (xv - g.st.mean) * g.k));
      const A da = warp_sum(valid ? go * ((xv - g.st.centre) * g.st.r) : A(0));
      const A de = warp_sum(go);
      if (lane == 0) {
        da_tile[c] = da;
        de_tile[c] = de;
      }
    }
  }
}

struct LaunchPlan {
  dim3 grid, block;
  int C;
  int64_t tiles;
};

// One block per (sample, tile of positions). Planar splits channels over warps, so it never uses more warps
// than channels. The grid is one-dimensional (y and z stop at 65535), hence the INT32_MAX limit on B * tiles.
cudaError_t plan_launch(int64_t batch, int64_t channels, int64_t positions, bool channels_inner,
                        LaunchPlan& plan) {
  plan.tiles = position_tiles(positions);
  const int64_t blocks = batch * plan.tiles;
  if (blocks > INT32_MAX || channels > INT32_MAX) return cudaErrorInvalidConfiguration;
  plan.C = static_cast<int>(channels);
  const int warps = channels_inner || plan.C >= kMaxWarps ? kMaxWarps : plan.C;
  plan.grid = dim3(static_cast<unsigned>(blocks));
  plan.block = dim3(warps * kWarpSize);
  return cudaSuccess;
}

// Empty problems launch nothing; otherwise plans the launch and calls launch(element, plan) with a value of
// the element type that dtype names, then reports the launch error.
template <typename F>
cudaError_t plan_and_launch(ElementType dtype, int64_t batch, int64_t channels, int64_t positions, bool channels_inner,
                            F&& launch) {
  if (batch == 0 || channels == 0 || positions == 0) return cudaSuccess;
  LaunchPlan plan;
  const cudaError_t planned = plan_launch(batch, channels, positions, channels_inner, plan);
  if (planned != cudaSuccess) return planned;
  return with_element_type(dtype, [&](auto element) {
    launch(element, plan);
    return cudaGetLastError();
  });
}

}  // namespace

// Rows of the (B, tiles, C) da/de partial buffers the backward launcher expects.
int64_t modulated_layer_norm_position_tiles(int64_t positions) { return position_tiles(positions); }

// x, y: the element type of dtype in the layout given by channels_inner; a, e: (B, C) contiguous, float32
// (float64 for kFloat64). Asynchronous on stream; an empty problem launches nothing.
cudaError_t modulated_layer_norm_fwd_cuda(ElementType dtype, const void* x, const void* a, const void* e,
                                          void* y, int64_t batch, int64_t channels, int64_t positions,
                                          bool channels_inner, double eps, bool bias_free,
                                          cudaStream_t stream) {
  return plan_and_launch(dtype, batch, channels, positions, channels_inner, [&](auto element, const LaunchPlan& plan) {
    using T = decltype(element);
    using A = Acc<T>;
    const auto kernel =
        channels_inner ? modulated_layer_norm_fwd_kernel<T, true> : modulated_layer_norm_fwd_kernel<T, false>;
    LLDIF_LAUNCH(plan.grid, plan.block, 0, stream, kernel)(static_cast<const T*>(x), static_cast<const A*>(a),
                                                           static_cast<const A*>(e), static_cast<T*>(y), plan.C,
                                                           positions, plan.tiles, A(eps), bias_free);
  });
}

// dy, x, dx: one layout as in the forward; a: as in the forward. da_partials, de_partials: (B,
// position_tiles(P), C) of a's type, every element overwritten (no zero fill needed).
cudaError_t modulated_layer_norm_bwd_cuda(ElementType dtype, const void* dy, const void* x, const void* a,
                                          void* dx, void* da_partials, void* de_partials, int64_t batch,
                                          int64_t channels, int64_t positions, bool channels_inner,
                                          double eps, bool bias_free, cudaStream_t stream) {
  return plan_and_launch(dtype, batch, channels, positions, channels_inner, [&](auto element, const LaunchPlan& plan) {
    using T = decltype(element);
    using A = Acc<T>;
    const auto kernel =
        channels_inner ? modulated_layer_norm_bwd_kernel<T, true> : modulated_layer_norm_bwd_kernel<T, false>;
    LLDIF_LAUNCH(plan.grid, plan.block, 0, stream, kernel)(static_cast<const T*>(dy), static_cast<const T*>(x),
                                                           static_cast<const A*>(a), static_cast<T*>(dx),
                                                           static_cast<A*>(da_partials), static_cast<A*>(de_partials),
                                                           plan.C, positions, plan.tiles, A(eps), bias_free);
  });
}

}  // namespace lldif_kernels

// Transposed (channel) attention of DMNet / Restormer MDTA, forward and backward, per (sample, head) pair:
//   C = q̂ k̂ᵀ (rows of q and k normalised over the N positions), P = softmax_rows(τ C), out = P v.
//
// Only B * heads pairs exist and each is a d x d problem reduced over up to ~50k positions, so the work is
// split along N. Each direction runs three kernels:
//   1. gram_partials: grid (pair, N-split); a block reduces its chunk of positions to a d x d Gram partial
//      (G = q kᵀ forward, dP = dO vᵀ backward) plus, forward, the squared row norms of q and k.
//   2. one block per pair sums the partials in split order (deterministic, no atomics) and does the d x d
//      math: cosine and P forward; dS, dtemperature and the coefficient matrices backward.
//   3. apply_coefficients: grid (pair, N-tile, job); y = W x (+ diag(c) z) with a d x d coefficient matrix W:
//      out = P v forward; dq = M k - diag(ρ/nq²) q, dk = Mᵀ q - diag(κ/nk²) k and dv = Pᵀ dO backward.
// All sums run in float (double for double inputs) and in a fixed order, so results are bitwise repeatable.
//
// This file deliberately includes no torch header (its 48 kernel instantiations already take a while to
// compile); the ATen glue is channel_attention_glue.cpp; both include channel_attention_launch.h.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "element_types.cuh"
#include "portability.cuh"
#include "channel_attention_launch.h"

namespace lldif_kernels {

namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxDim = 128;
constexpr int kRowSlots = kMaxDim / kWarpSize;  // row elements per lane in the per-pair kernels

// Splits along N: enough gram blocks for a few per SM of a 132-SM part, but no chunk under kMinChunk
// positions (each split costs a d x d partial). Depends only on the shape, which keeps sums repeatable.
constexpr int64_t kTargetGramBlocks = 4 * 132;
constexpr int64_t kMinChunk = 256;
constexpr int64_t kChunkAlign = 32;  // a multiple of every gram tile width
// Positions per apply block: four per lane in float, two in double (whose accumulators take twice the
// registers).
template <typename A>
constexpr int kApplyTile = 16 / sizeof(A) * kWarpSize;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks per SM to ask of __launch_bounds__ for a kernel whose threads keep `values` accumulators and
// operands of `bytes` each live. Unbounded, the unrolled loops hoist loads until a block takes most of an
// SM's registers; the cap 65536 / (kThreads * blocks) must still leave room for addresses, loop state and
// loads in flight. The thresholds are the tightest without spills on sm_80 and sm_90 (ptxas -warn-spills).
constexpr int blocks_for(int values, int bytes) {
  const int registers = values * (bytes / 4);
  return registers <= 32 ? 3 : registers <= 64 ? 2 : 1;
}

// Positions per split; the last split may be shorter.
constexpr int64_t chunk_of(int64_t pairs, int64_t positions) {
  const int64_t by_blocks = ceil_div(kTargetGramBlocks, pairs);
  const int64_t by_chunk = ceil_div(positions, kMinChunk);
  const int64_t splits = by_blocks < by_chunk ? by_blocks : by_chunk;
  return ceil_div(ceil_div(positions, splits), kChunkAlign) * kChunkAlign;
}

using device::Acc;
using device::with_element_type;
using device::store;
using device::widen;

// Vector shared-memory reads (callers guarantee the alignment): they halve the load instructions of the
// inner products, whose shared-memory bandwidth otherwise bounds them.
__device__ __forceinline__ void load2(const float* p, float& x0, float& x1) {
  const float2 v = *reinterpret_cast<const float2*>(p);
  x0 = v.x, x1 = v.y;
}
__device__ __forceinline__ void load2(const double* p, double& x0, double& x1) {
  const double2 v = *reinterpret_cast<const double2*>(p);
  x0 = v.x, x1 = v.y;
}
template <typename A>
__device__ __forceinline__ void load4(const A* p, A (&x)[4]) {
  load2(p, x[0], x[1]);
  load2(p + 2, x[2], x[3]);
}

// xor butterflies: all lanes end with identical bits.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(kFullMask, v, mask);
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) v = fmax(v, __shfl_xor_sync(kFullMask, v, mask));
  return v;
}

// Rows i of one (sample, head) pair at data + b * batch + h * head + i * dim, positions contiguous.
template <typename Pointer>
struct Rows {
  Pointer data;
  ChaStrides strides;

  __device__ Pointer pair(int64_t pair_index, int64_t heads) const {
    return data + (pair_index / heads) * strides.batch + (pair_index % heads) * strides.head;
  }
};
template <typename T>
using Operand = Rows<const T*>;
template <typename T>
using Target = Rows<T*>;

// ---------------------------------------------------------------------------------------------------------
// Pass 1: gram[i][j] = sum_n a[i][n] * b[j][n] over a block's chunk of positions (and, when squares_a is
// set, squares_a[i] = sum_n a[i][n]², squares_b likewise).
//
// kCover (16..128, >= d) rows of a and b are staged per tile of kTile positions, zero-padded, in fp32 (fp64).
// Threads form kGroups square groups of kSide x kSide; a group's thread owns the kReg x kReg block of G at
// rows ty + kSide * r, columns tx + kSide * c, and the groups split each tile's positions. For d <= 64 four
// 8 x 8 groups give each thread up to 8 x 8 outputs, enough arithmetic per shared-memory read; groups are
// summed in group order at the end.
template <int kCover>
struct GramLayout {
  static constexpr int kSide = kCover <= 64 ? 8 : 16;
  static constexpr int kReg = kCover / kSide;
  static constexpr int kGroups = kThreads / (kSide * kSide);
};

template <typename A>
struct GramTile {
  static constexpr int kPositions = 128 / sizeof(A);  // 32 float, 16 double: one 128-byte row
  static constexpr int kLd = kPositions + 2;          // keeps 8/16-byte alignment, spreads rows over banks
};

template <typename T, int kCover>
__global__ void __launch_bounds__(kThreads, blocks_for(GramLayout<kCover>::kReg * (GramLayout<kCover>::kReg + 4),
                                                       sizeof(Acc<T>)))
    gram_partials_kernel(Operand<T> a, Operand<T> b, Acc<T>* __restrict__ gram, Acc<T>* __restrict__ squares_a,
                         Acc<T>* __restrict__ squares_b, int d, int64_t heads, int64_t positions, int64_t splits,
                         int64_t chunk) {
  using A = Acc<T>;
  using L = GramLayout<kCover>;
  constexpr int kTile = GramTile<A>::kPositions, kLd = GramTile<A>::kLd;
  constexpr int kTileElems = 2 * kCover * kLd;
  constexpr int kGroupElems = L::kGroups > 1 ? kCover * kCover : 0;
  constexpr int kSmemElems = kTileElems > kGroupElems ? kTileElems : kGroupElems;
  // The staged tiles, and after the position loop the buffer through which the groups are summed.
  __shared__ __align__(16) A smem[kSmemElems];
  A* tile_a = smem;
  A* tile_b = smem + kCover * kLd;

  const int64_t pair = blockIdx.x / splits;
  const int64_t begin = (blockIdx.x % splits) * chunk;
  const int64_t end = begin + chunk < positions ? begin + chunk : positions;
  const T* a_pair = a.pair(pair, heads);
  const T* b_pair = b.pair(pair, heads);

  const int tid = threadIdx.x;
  constexpr int kGroupThreads = L::kSide * L::kSide;
  constexpr int kGroupPositions = kTile / L::kGroups;
  const int group = tid / kGroupThreads;
  const int ty = tid % kGroupThreads / L::kSide, tx = tid % L::kSide;
  // The loaders put consecutive threads on consecutive positions (coalesced) of rows load_row + kRowStep * s.
  constexpr int kRowStep = kThreads / kTile;
  const int load_position = tid % kTile, load_row = tid / kTile;
  // Squares: thread t < 2 kCover takes row t of the stacked tiles [a; b].
  const bool squares_thread = squares_a != nullptr && tid < 2 * kCover;
  const A* square_row = squares_thread ? smem + tid * kLd : smem;

  A acc[L::kReg][L::kReg] = {};
  A square = A(0);
  for (int64_t tile_start = begin; tile_start < end; tile_start += kTile) {
    const int64_t n = tile_start + load_position;
    const bool in_range = n < end;
#pragma unroll
    for (int s = 0; s < kCover / kRowStep; ++s) {
      const int row = load_row + kRowStep * s;
      const bool valid = in_range && row < d;
      tile_a[row * kLd + load_position] = valid ? widen(a_pair[row * a.strides.dim + n]) : A(0);
      tile_b[row * kLd + load_position] = valid ? widen(b_pair[row * b.strides.dim + n]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int pp = 0; pp < kGroupPositions; pp += 2) {
      const int p = group * kGroupPositions + pp;
      A a0[L::kReg], a1[L::kReg], b0[L::kReg], b1[L::kReg];
#pragma unroll
      for (int r = 0; r < L::kReg; ++r) {
        load2(tile_a + (ty + L::kSide * r) * kLd + p, a0[r], a1[r]);
        load2(tile_b + (tx + L::kSide * r) * kLd + p, b0[r], b1[r]);
      }
#pragma unroll
      for (int r = 0; r < L::kReg; ++r) {
#pragma unroll
        for (int c = 0; c < L::kReg; ++c) {
          acc[r][c] += a0[r] * b0[c];
          acc[r][c] += a1[r] * b1[c];
        }
      }
    }
    if (squares_thread) {
#pragma unroll
      for (int p = 0; p < kTile; p += 2) {
        A x0, x1;
        load2(square_row + p, x0, x1);
        square += x0 * x0;
        square += x1 * x1;
      }
    }
    __syncthreads();
  }

  if constexpr (L::kGroups > 1) {
    // Group g's block is added to group 0's after groups 1 .. g-1: a fixed order.
    A* group_sum = smem;
    for (int g = 1; g < L::kGroups; ++g) {
      if (group == g) {
#pragma unroll
        for (int r = 0; r < L::kReg; ++r) {
#pragma unroll
          for (int c = 0; c < L::kReg; ++c) group_sum[(ty + L::kSide * r) * kCover + tx + L::kSide * c] = acc[r][c];
        }
      }
      __syncthreads();
      if (group == 0) {
#pragma unroll
        for (int r = 0; r < L::kReg; ++r) {
#pragma unroll
          for (int c = 0; c < L::kReg; ++c) acc[r][c] += group_sum[(ty + L::kSide * r) * kCover + tx + L::kSide * c];
        }
      }
      __syncthreads();
    }
  }

  const int64_t partial = blockIdx.x;  // (pair, split) row of the partial buffers
  if (group == 0) {
    A* gram_block = gram + partial * d * d;
#pragma unroll
    for (int r = 0; r < L::kReg; ++r) {
      const int i = ty + L::kSide * r;
#pragma unroll
      for (int c = 0; c < L::kReg; ++c) {
        const int j = tx + L::kSide * c;
        if (i < d && j < d) gram_block[i * d + j] = acc[r][c];
      }
    }
  }
  if (squares_thread) {
    const int row = tid < kCover ? tid : tid - kCover;
    if (row < d) (tid < kCover ? squares_a : squares_b)[partial * d + row] = square;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Pass 2, one block per pair. A warp owns rows i = warp, warp + kWarps, ...; lane l holds columns
// l + 32 m of the row, so row reductions are warp butterflies.

// Softmax row i of S = τ C for this lane's columns (absent columns get p = 0).
template <typename A>
__device__ __forceinline__ void softmax_row(const A (&cosine_row)[kRowSlots], A tau, int d, A (&p)[kRowSlots]) {
  const int lane = threadIdx.x % kWarpSize;
  A row_max = A(-INFINITY);
#pragma unroll
  for (int m = 0; m < kRowSlots; ++m) {
    if (lane + kWarpSize * m < d) row_max = fmax(row_max, tau * cosine_row[m]);
  }
  row_max = warp_max(row_max);
  A row_sum = A(0);
#pragma unroll
  for (int m = 0; m < kRowSlots; ++m) {
    p[m] = lane + kWarpSize * m < d ? exp(tau * cosine_row[m] - row_max) : A(0);
    row_sum += p[m];
  }
  row_sum = warp_sum(row_sum);
#pragma unroll
  for (int m = 0; m < kRowSlots; ++m) p[m] /= row_sum;
}

// Sum over splits, in split order, of partials[(pair * splits + s) * stride + offset].
template <typename A>
__device__ __forceinline__ A sum_splits(const A* __restrict__ partials, int64_t pair, int64_t splits,
                                        int64_t stride, int64_t offset) {
  const A* p = partials + pair * splits * stride + offset;
  A sum = A(0);
  for (int64_t s = 0; s < splits; ++s) sum += p[s * stride];
  return sum;
}

// Norms, cosine and P (into probs, (pairs, d, d)) from the forward partials.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    softmax_fwd_kernel(const A* __restrict__ gram_partials, const A* __restrict__ sq_partials,
                       const A* __restrict__ sk_partials, const A* __restrict__ temperature,
                       A* __restrict__ cosine, A* __restrict__ q_norm, A* __restrict__ k_norm,
                       A* __restrict__ probs, int d, int64_t heads, int64_t splits, A eps) {
  __shared__ A norm_q[kMaxDim], norm_k[kMaxDim];
  const int64_t pair = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  if (tid < 2 * d) {
    const bool is_q = tid < d;
    const int row = is_q ? tid : tid - d;
    // F.normalize's clamp, which keeps a NaN norm NaN (fmax would return eps).
    const A root = sqrt(sum_splits(is_q ? sq_partials : sk_partials, pair, splits, d, row));
    const A norm = root < eps ? eps : root;
    (is_q ? norm_q : norm_k)[row] = norm;
    (is_q ? q_norm : k_norm)[pair * d + row] = norm;
  }
  __syncthreads();

  const A tau = temperature[pair % heads];
  const int64_t dd = static_cast<int64_t>(d) * d;
  for (int i = warp; i < d; i += kWarps) {
    A cosine_row[kRowSlots], p[kRowSlots];
#pragma unroll
    for (int m = 0; m < kRowSlots; ++m) {
      const int j = lane + kWarpSize * m;
      cosine_row[m] = A(0);
      if (j < d) {
        cosine_row[m] = sum_splits(gram_partials, pair, splits, dd, i * d + j) / (norm_q[i] * norm_k[j]);
        cosine[pair * dd + i * d + j] = cosine_row[m];
      }
    }
    softmax_row(cosine_row, tau, d, p);
#pragma unroll
    for (int m = 0; m < kRowSlots; ++m) {
      const int j = lane + kWarpSize * m;
      if (j < d) probs[pair * dd + i * d + j] = p[m];
    }
  }
}

// From the dP partials and the saved statistics: dtemperature[pair] and the apply coefficients
// coef[pair] = (M, Mᵀ, Pᵀ) (3, d, d) and diag[pair] = (-ρ/nq², -κ/nk²) (2, d).
template <typename A>
__global__ void __launch_bounds__(kThreads)
    softmax_bwd_kernel(const A* __restrict__ dp_partials, const A* __restrict__ cosine,
                       const A* __restrict__ q_norm, const A* __restrict__ k_norm,
                       const A* __restrict__ temperature, A* coef, A* __restrict__ diag,
                       A* __restrict__ dtemperature, int d, int64_t heads, int64_t splits, A eps) {
  __shared__ A inv_q[kMaxDim], inv_k[kMaxDim], row_dtemperature[kMaxDim];
  const int64_t pair = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t dd = static_cast<int64_t>(d) * d;
  const A* cosine_pair = cosine + pair * dd;
  const A* q_norm_pair = q_norm + pair * d;
  const A* k_norm_pair = k_norm + pair * d;
  A* m_slot = coef + pair * 3 * dd;
  // Holds dC ⊙ C until the column sums κ are taken, then Mᵀ.
  A* mt_slot = m_slot + dd;
  A* pt_slot = m_slot + 2 * dd;
  A* diag_q = diag + pair * 2 * d;
  A* diag_k = diag_q + d;
  if (tid < d) inv_q[tid] = A(1) / q_norm_pair[tid];
  if (tid >= d && tid < 2 * d) inv_k[tid - d] = A(1) / k_norm_pair[tid - d];
  __syncthreads();

  const A tau = temperature[pair % heads];
  for (int i = warp; i < d; i += kWarps) {
    A cosine_row[kRowSlots], p[kRowSlots], dp[kRowSlots];
#pragma unroll
    for (int m = 0; m < kRowSlots; ++m) {
      const int j = lane + kWarpSize * m;
      cosine_row[m] = j < d ? cosine_pair[i * d + j] : A(0);
      dp[m] = j < d ? sum_splits(dp_partials, pair, splits, dd, i * d + j) : A(0);
    }
    softmax_row(cosine_row, tau, d, p);
    A p_dp = A(0);
#pragma unroll
    for (int m = 0; m < kRowSlots; ++m) p_dp += p[m] * dp[m];
    p_dp = warp_sum(p_dp);
    A ds_c = A(0), dc_c = A(0);
#pragma unroll
    for (int m = 0; m < kRowSlots; ++m) {
      const int j = lane + kWarpSize * m;
      if (j < d) {
        const A ds = p[m] * (dp[m] - p_dp);
        const A dc = tau * ds;
        ds_c += ds * cosine_row[m];
        dc_c += dc * cosine_row[m];
        m_slot[i * d + j] = dc * inv_q[i] * inv_k[j];
        mt_slot[i * d + j] = dc * cosine_row[m];
        pt_slot[j * d + i] = p[m];
      }
    }
    ds_c = warp_sum(ds_c);
    const A rho = warp_sum(dc_c);
    if (lane == 0) {
      row_dtemperature[i] = ds_c;
      // A norm clamped at eps is a constant: no gradient flows through it.
      diag_q[i] = q_norm_pair[i] > eps ? -rho * inv_q[i] * inv_q[i] : A(0);
    }
  }
  __syncthreads();  // also orders the global writes above before the reads below (same block)

  if (tid < d) {
    A kappa = A(0);
    for (int i = 0; i < d; ++i) kappa += mt_slot[i * d + tid];
    diag_k[tid] = k_norm_pair[tid] > eps ? -kappa * inv_k[tid] * inv_k[tid] : A(0);
  }
  if (tid == 0) {
    A sum = A(0);
    for (int i = 0; i < d; ++i) sum += row_dtemperature[i];
    dtemperature[pair] = sum;
  }
  __syncthreads();
  for (int64_t e = tid; e < dd; e += kThreads) {
    const int64_t j = e / d, i = e % d;
    mt_slot[e] = m_slot[i * d + j];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Pass 3: y[i][n] = sum_j W[i][j] x[j][n] + c[i] z[i][n] (c, z optional) for one pair and kApplyTile
// positions. W and x are staged in chunks of kChunk columns / rows; warp w owns rows w + kWarps * r,
// lane l positions l + 32 c. W reads are warp-uniform (broadcast) and 4 wide.
template <typename T>
struct ApplyJob {
  const Acc<T>* coef;  // W of pair p at coef + p * coef_pair_stride, (d, d) row-major
  int64_t coef_pair_stride;
  Operand<T> x;
  const Acc<T>* diag;  // c of pair p at diag + p * diag_pair_stride; nullptr: no diagonal term
  int64_t diag_pair_stride;
  Operand<T> z;
  Target<T> y;
};

constexpr int kMaxJobs = 3;
template <typename T>
struct ApplyJobs {
  ApplyJob<T> job[kMaxJobs];
};

template <typename T, int kCover>
__global__ void __launch_bounds__(kThreads, blocks_for((kCover / kWarps + 5) * kApplyTile<Acc<T>> / kWarpSize,
                                                       sizeof(Acc<T>)))
    apply_coefficients_kernel(const __grid_constant__ ApplyJobs<T> jobs, int d, int64_t heads, int64_t positions, int64_t tiles) {
  using A = Acc<T>;
  constexpr int kRows = kCover / kWarps;
  constexpr int kTile = kApplyTile<A>;
  constexpr int kPerLane = kTile / kWarpSize;
  constexpr int kChunk = 128 / sizeof(A);  // 32 float, 16 double: one 128-byte row of W
  __shared__ __align__(16) A w_chunk[kCover * kChunk];
  __shared__ __align__(16) A x_chunk[kChunk * kTile];

  const ApplyJob<T>& job = jobs.job[blockIdx.y];
  const int64_t pair = blockIdx.x / tiles;
  const int64_t tile_start = (blockIdx.x % tiles) * kTile;
  const A* w_pair = job.coef + pair * job.coef_pair_stride;
  const T* x_pair = job.x.pair(pair, heads);
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  // Each thread loads one column of the W chunk and one position of the x chunk, stepping over rows (few
  // loop-invariant values to keep across chunks).
  const int w_column = tid % kChunk, w_row = tid / kChunk;
  constexpr int kWRowStep = kThreads / kChunk;
  const int x_position = tid % kTile, x_row = tid / kTile;
  constexpr int kXRowStep = kThreads / kTile;
  const bool x_in_range = tile_start + x_position < positions;
  const T* x_column = x_pair + tile_start + x_position;

  A acc[kRows][kPerLane] = {};
  for (int j0 = 0; j0 < d; j0 += kChunk) {
    const int j = j0 + w_column;
#pragma unroll
    for (int i = w_row; i < kCover; i += kWRowStep) {
      w_chunk[i * kChunk + w_column] = i < d && j < d ? w_pair[i * d + j] : A(0);
    }
#pragma unroll
    for (int jj = x_row; jj < kChunk; jj += kXRowStep) {
      x_chunk[jj * kTile + x_position] =
          x_in_range && j0 + jj < d ? widen(x_column[(j0 + jj) * job.x.strides.dim]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kChunk; jj += 4) {
      A x[4][kPerLane];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) x[q][c] = x_chunk[(jj + q) * kTile + lane + kWarpSize * c];
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        A w[4];
        load4(w_chunk + (warp + kWarps * r) * kChunk + jj, w);
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[r][c] += w[q] * x[q][c];
        }
      }
    }
    __syncthreads();
  }

  T* y_pair = job.y.pair(pair, heads);
  const A* c_pair = job.diag != nullptr ? job.diag + pair * job.diag_pair_stride : nullptr;
  const T* z_pair = c_pair != nullptr ? job.z.pair(pair, heads) : nullptr;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = warp + kWarps * r;
    if (i >= d) continue;
    const A c_i = c_pair != nullptr ? c_pair[i] : A(0);
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int64_t n = tile_start + lane + kWarpSize * c;
      if (n >= positions) continue;
      A value = acc[r][c];
      if (c_pair != nullptr) value += c_i * widen(z_pair[i * job.z.strides.dim + n]);
      store(y_pair + i * job.y.strides.dim + n, value);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launch plumbing.

// Calls f with the kernels' row cover as a std::integral_constant: the smallest of 16, 32, 48, 64, 96, 128
// that is >= d (a few sizes keep the instantiations few; d = 48 of LLDif is one of them).
template <int kCover>
using Cover = std::integral_constant<int, kCover>;
template <typename F>
cudaError_t with_cover(int64_t d, F&& f) {
  if (d <= 16) return f(Cover<16>{});
  if (d <= 32) return f(Cover<32>{});
  if (d <= 48) return f(Cover<48>{});
  if (d <= 64) return f(Cover<64>{});
  if (d <= 96) return f(Cover<96>{});
  if (d <= kMaxDim) return f(Cover<kMaxDim>{});
  return cudaErrorInvalidValue;
}

struct Split {
  int64_t chunk, splits;
};

Split split_of(int64_t pairs, int64_t positions) {
  if (pairs == 0 || positions == 0) return {0, 0};
  const int64_t chunk = chunk_of(pairs, positions);
  return {chunk, ceil_div(positions, chunk)};
}

template <typename A>
int64_t position_tiles(int64_t positions) {
  return ceil_div(positions, kApplyTile<A>);
}

// The kernels index rows with int and put (pair, split) and (pair, tile) on the x dimension of the grid.
template <typename A>
bool fits_kernels(const ChaShape& s) {
  const int64_t pairs = s.batch * s.heads;
  return s.dim <= kMaxDim && pairs * split_of(pairs, s.positions).splits <= INT32_MAX &&
         pairs * position_tiles<A>(s.positions) <= INT32_MAX;
}

template <typename T>
Operand<T> operand(const void* data, const ChaStrides& strides) {
  return {static_cast<const T*>(data), strides};
}

template <typename T>
Target<T> target(void* data, const ChaStrides& strides) {
  return {static_cast<T*>(data), strides};
}

// A contiguous (B, heads, d, N) tensor.
ChaStrides contiguous_strides(const ChaShape& s) {
  return {s.heads * s.dim * s.positions, s.dim * s.positions, s.positions};
}

template <typename T>
cudaError_t launch_gram(const ChaShape& s, Operand<T> a, Operand<T> b, void* gram, void* squares_a,
                        void* squares_b, const Split& split, cudaStream_t stream) {
  using A = Acc<T>;
  const int64_t pairs = s.batch * s.heads;
  return with_cover(s.dim, [&](auto cover) {
    LLDIF_LAUNCH(static_cast<unsigned>(pairs * split.splits), kThreads, 0, stream,
                 gram_partials_kernel<T, decltype(cover)::value>)(
            a, b, static_cast<A*>(gram), static_cast<A*>(squares_a), static_cast<A*>(squares_b),
            static_cast<int>(s.dim), s.heads, s.positions, split.splits, split.chunk);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_apply(const ChaShape& s, const ApplyJobs<T>& jobs, int job_count, cudaStream_t stream) {
  const int64_t tiles = position_tiles<Acc<T>>(s.positions);
  const dim3 grid(static_cast<unsigned>(s.batch * s.heads * tiles), static_cast<unsigned>(job_count));
  return with_cover(s.dim, [&](auto cover) {
    LLDIF_LAUNCH(grid, kThreads, 0, stream, apply_coefficients_kernel<T, decltype(cover)::value>)(
        jobs, static_cast<int>(s.dim), s.heads, s.positions, tiles);
    return cudaGetLastError();
  });
}

bool is_empty(const ChaShape& s) { return s.batch == 0 || s.heads == 0 || s.dim == 0 || s.positions == 0; }

}  // namespace

// Rows of the (B * heads, splits, ...) partial buffers the launchers expect.
int64_t channel_attention_splits(int64_t batch, int64_t heads, int64_t positions) {
  return split_of(batch * heads, positions).splits;
}

// The kernels' limits, checked by the glue: d <= max_dim, and B * heads times splits or position tiles
// within INT32_MAX (x dimension of the grid).
int64_t channel_attention_max_dim() { return kMaxDim; }
int64_t channel_attention_position_tiles(ElementType dtype, int64_t positions) {
  return dtype == ElementType::kFloat64 ? position_tiles<double>(positions) : position_tiles<float>(positions);
}

// q, k, v: the element type of dtype, strided as shape.inputs. temperature: (heads,), float32 (float64 for
// kFloat64), as are the outputs cosine (B, heads, d, d), q_norm and k_norm (B, heads, d) and the workspaces
// gram_partials (B * heads, splits, d, d), sq_partials and sk_partials (B * heads, splits, d) and probs
// (B * heads, d, d), every element of which is overwritten. out: (B, heads, d, N) contiguous, q's type.
// Asynchronous on stream; an empty problem launches nothing and writes nothing.
cudaError_t channel_attention_fwd_cuda(ElementType dtype, const ChaShape& shape, const void* q, const void* k,
                                       const void* v, const void* temperature, void* out, void* cosine,
                                       void* q_norm, void* k_norm, void* gram_partials, void* sq_partials,
                                       void* sk_partials, void* probs, double eps, cudaStream_t stream) {
  if (is_empty(shape)) return cudaSuccess;
  const ChaShape& s = shape;
  const int64_t pairs = s.batch * s.heads;
  const Split split = split_of(pairs, s.positions);
  return with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    using A = Acc<T>;
    if (!fits_kernels<A>(s)) return cudaErrorInvalidConfiguration;
    cudaError_t err = launch_gram<T>(s, operand<T>(q, s.inputs), operand<T>(k, s.inputs), gram_partials, sq_partials,
                                     sk_partials, split, stream);
    if (err != cudaSuccess) return err;
    LLDIF_LAUNCH(static_cast<unsigned>(pairs), kThreads, 0, stream, softmax_fwd_kernel<A>)(
        static_cast<const A*>(gram_partials), static_cast<const A*>(sq_partials),
        static_cast<const A*>(sk_partials), static_cast<const A*>(temperature), static_cast<A*>(cosine),
        static_cast<A*>(q_norm), static_cast<A*>(k_norm), static_cast<A*>(probs), static_cast<int>(s.dim),
        s.heads, split.splits, static_cast<A>(eps));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    ApplyJobs<T> jobs{};
    jobs.job[0] = {static_cast<const A*>(probs), s.dim * s.dim, operand<T>(v, s.inputs), nullptr, 0, {},
                   target<T>(out, contiguous_strides(s))};
    return launch_apply<T>(s, jobs, 1, stream);
  });
}

// dout: (B, heads, d, N) contiguous, q's type; q, k, v as in the forward; cosine, q_norm, k_norm: the
// forward's outputs. dq, dk, dv: q's shape and type, strided as grads (views of one packed gradient are
// fine); dtemperature: (B, heads) in the accumulation type. Workspaces, every element overwritten:
// dp_partials (B * heads, splits, d, d), coef (B * heads, 3, d, d), diag (B * heads, 2, d). Asynchronous
// on stream; an empty problem launches nothing and writes nothing.
cudaError_t channel_attention_bwd_cuda(ElementType dtype, const ChaShape& shape, const void* dout, const void* q,
                                       const void* k, const void* v, const void* temperature, const void* cosine,
                                       const void* q_norm, const void* k_norm, void* dq, void* dk, void* dv,
                                       const ChaStrides& grads, void* dtemperature, void* dp_partials, void* coef,
                                       void* diag, double eps, cudaStream_t stream) {
  if (is_empty(shape)) return cudaSuccess;
  const ChaShape& s = shape;
  const int64_t pairs = s.batch * s.heads;
  const Split split = split_of(pairs, s.positions);
  const int64_t dd = s.dim * s.dim;
  return with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    using A = Acc<T>;
    if (!fits_kernels<A>(s)) return cudaErrorInvalidConfiguration;
    const Operand<T> g = operand<T>(dout, contiguous_strides(s));
    cudaError_t err = launch_gram<T>(s, g, operand<T>(v, s.inputs), dp_partials, nullptr, nullptr, split, stream);
    if (err != cudaSuccess) return err;
    LLDIF_LAUNCH(static_cast<unsigned>(pairs), kThreads, 0, stream, softmax_bwd_kernel<A>)(
        static_cast<const A*>(dp_partials), static_cast<const A*>(cosine), static_cast<const A*>(q_norm),
        static_cast<const A*>(k_norm), static_cast<const A*>(temperature), static_cast<A*>(coef),
        static_cast<A*>(diag), static_cast<A*>(dtemperature), static_cast<int>(s.dim), s.heads, split.splits,
        static_cast<A>(eps));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const A* w = static_cast<const A*>(coef);
    const A* c = static_cast<const A*>(diag);
    const Operand<T> q_rows = operand<T>(q, s.inputs), k_rows = operand<T>(k, s.inputs);
    // dq = M k + diag(-ρ/nq²) q, dk = Mᵀ q + diag(-κ/nk²) k, dv = Pᵀ dO.
    ApplyJobs<T> jobs{};
    jobs.job[0] = {w, 3 * dd, k_rows, c, 2 * s.dim, q_rows, target<T>(dq, grads)};
    jobs.job[1] = {w + dd, 3 * dd, q_rows, c + s.dim, 2 * s.dim, k_rows, target<T>(dk, grads)};
    jobs.job[2] = {w + 2 * dd, 3 * dd, g, nullptr, 0, {}, target<T>(dv, grads)};
    return launch_apply<T>(s, jobs, 3, stream);
  });
}

}  // namespace lldif_kernels

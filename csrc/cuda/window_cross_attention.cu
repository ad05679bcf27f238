// Window cross-attention of DLNet with a relative-position bias, forward and backward, per (window, head):
//   s_ij = scale q_i·k_j + table[idx(i,j), h], out = softmax_j(s) v, lse_i = log Σ_j exp(s_ij).
//
// Flash-style: the M x M logits and the bias are never materialised; the bias is gathered from the head's
// table column (staged in shared memory when it fits) at idx = base(i) - code(j), two per-token integers.
// Kernels (SIMT, fp32 math; fp64 for double inputs):
//   fwd:   grid (window·head, query tile); online softmax over key tiles. Saves out and lse.
//          Logits stay in natural units and only their difference to the running max (backward: to lse)
//          is scaled by log2 e for exp2: scaling a logit of -1e4 first would round it at 1.4e4, and the
//          backward's P = exp(s - lse) would lose three digits (the emulator's very-negative-logits test).
//   delta: D_i = Σ_c dout_ic out_ic, one warp per row.
//   dkdv:  grid (window·head, key tile); loops over all queries, recomputing P = exp(s - lse). A thread owns
//          one key row, so per query it needs two inner products and no cross-thread softmax. dtable: each
//          warp adds dS into its own copy of the table; all lanes of a warp work on the same query at the
//          same time, and for a fixed query idx(i, ·) is injective over keys, so no two lanes touch one bin
//          at once and plain read-modify-writes suffice (__syncwarp between queries). The CTA sums its warps'
//          copies in warp order into its own partial table (global workspace).
//   dq:    grid (query window·head, query tile), only when dq is wanted; loops over the windows that share the
//          query, in window order, and over all key tiles.
//   dtable: sums the partial tables in a fixed order over (window, key tile).
// No floating-point atomics anywhere, so every result is bitwise repeatable.
//
// Thread layout shared by the kernels: a row (a query, or a key in dkdv) is held by kGroup adjacent lanes,
// each owning kSlice of its channels in 16-byte chunks interleaved across the group (lanes of a group read
// adjacent chunks of a shared-memory row: no bank conflicts; the rest of the warp reads the same addresses:
// broadcasts). kSlice caps the per-thread row registers: 32 floats or 16 doubles. When the CTA's 4 warps
// hold more lanes than its rows need, the spare warps split the other loop (keys in fwd and dq, queries in
// dkdv) and their partial results are combined in split order at the end.
//
// This file includes no torch header; the ATen glue is window_cross_attention_glue.cpp, and both include
// window_cross_attention_launch.h.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "element_types.cuh"
#include "portability.cuh"
#include "window_cross_attention_launch.h"

namespace lldif_kernels {

namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
// The main kernels keep rows of up to 4 x 32 floats per thread; their __launch_bounds__(kThreads, 1) lets
// ptxas use up to 255 registers (left to its own occupancy heuristic, sm_80 capped some at 168 and spilled).
constexpr int kThreads = kWarps * kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxDim = 128;
// Static plus dynamic shared memory a kernel may use without an opt-in.
constexpr size_t kDefaultSharedLimit = 48 * 1024;
// The delta and dtable kernels: rows (or partial-table slices) per block.
constexpr int kReduceWarps = 8;
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.6931471805599453094;

using device::Acc;
using device::with_element_type;
using device::store;
using device::widen;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename A, int kCover>
struct Layout {
  static constexpr int kVec = 16 / sizeof(A);                       // elements per 16-byte chunk
  static constexpr int kMaxSlice = 128 / sizeof(A);                 // 32 float, 16 double
  static constexpr int kSlice = kCover < kMaxSlice ? kCover : kMaxSlice;
  static constexpr int kGroup = kCover / kSlice;                    // lanes per row
  static constexpr int kChunks = kSlice / kVec;
  static constexpr int kRowWarps = kGroup < kWarps ? kGroup : kWarps;
  static constexpr int kSplits = kWarps / kRowWarps;
  static constexpr int kRows = kRowWarps * (kWarpSize / kGroup);   // rows per CTA
  // Keys per split and step in fwd: the thread keeps this many logits in registers for one max update
  // (more makes ptxas hoist enough shared-memory loads to spill).
  static constexpr int kFwdStep = 16;
  static constexpr int kFwdKeys = kSplits * kFwdStep;
  // Rows per split and step of the streamed operand in dkdv and dq (no logits kept across a step).
  static constexpr int kBwdStep = 16;
  static constexpr int kBwdRows = kSplits * kBwdStep;
};

template <typename A>
__device__ __forceinline__ void load_chunk(const A* p, A* x);
template <>
__device__ __forceinline__ void load_chunk(const float* p, float* x) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
}
template <>
__device__ __forceinline__ void load_chunk(const double* p, double* x) {
  const double2 v = *reinterpret_cast<const double2*>(p);
  x[0] = v.x, x[1] = v.y;
}

__device__ __forceinline__ float exp2_of(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_of(double x) { return exp2(x); }
__device__ __forceinline__ float log2_of(float x) { return log2f(x); }
__device__ __forceinline__ double log2_of(double x) { return log2(x); }

// xor butterflies: every lane of the group ends with identical bits.
template <int kLanes, typename A>
__device__ __forceinline__ A lanes_sum(A v) {
#pragma unroll
  for (int mask = kLanes / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(kFullMask, v, mask);
  return v;
}

// This thread's place in the CTA.
template <class L>
struct Lane {
  int group;  // owns channels (group + kGroup m) kVec + e
  int row;    // row within the CTA's tile
  int split;
  int warp;
  __device__ Lane() {
    const int lane = threadIdx.x % kWarpSize;
    warp = threadIdx.x / kWarpSize;
    group = lane % L::kGroup;
    split = warp / L::kRowWarps;
    row = warp % L::kRowWarps * (kWarpSize / L::kGroup) + lane / L::kGroup;
  }
  __device__ int channel(int m, int e) const { return (group + L::kGroup * m) * L::kVec + e; }
};

// The row's inner product with this thread's slice x, summed over the group. Two chains for latency.
template <class L, typename A>
__device__ __forceinline__ A dot(const A* row, const A (&x)[L::kSlice], const Lane<L>& lane) {
  A s[2] = {A(0), A(0)};
#pragma unroll
  for (int m = 0; m < L::kChunks; ++m) {
    A y[L::kVec];
    load_chunk(row + lane.channel(m, 0), y);
#pragma unroll
    for (int e = 0; e < L::kVec; ++e) s[m % 2] += x[m * L::kVec + e] * y[e];
  }
  return lanes_sum<L::kGroup>(s[0] + s[1]);
}

// y += a · (this thread's slice of row).
template <class L, typename A>
__device__ __forceinline__ void axpy(A a, const A* row, A (&y)[L::kSlice], const Lane<L>& lane) {
#pragma unroll
  for (int m = 0; m < L::kChunks; ++m) {
    A x[L::kVec];
    load_chunk(row + lane.channel(m, 0), x);
#pragma unroll
    for (int e = 0; e < L::kVec; ++e) y[m * L::kVec + e] += a * x[e];
  }
}

template <class L, typename T, typename A>
__device__ __forceinline__ void load_slice(const T* row, bool valid, int d, const Lane<L>& lane,
                                           A (&x)[L::kSlice]) {
#pragma unroll
  for (int m = 0; m < L::kChunks; ++m) {
#pragma unroll
    for (int e = 0; e < L::kVec; ++e) {
      const int c = lane.channel(m, e);
      x[m * L::kVec + e] = valid && c < d ? widen(row[c]) : A(0);
    }
  }
}

template <class L, typename T, typename A>
__device__ __forceinline__ void store_slice(T* row, int d, A scale, const A (&x)[L::kSlice],
                                            const Lane<L>& lane) {
#pragma unroll
  for (int m = 0; m < L::kChunks; ++m) {
#pragma unroll
    for (int e = 0; e < L::kVec; ++e) {
      const int c = lane.channel(m, e);
      if (c < d) store(row + c, scale * x[m * L::kVec + e]);
    }
  }
}

// Rows first .. first + kTileRows - 1 of a token-strided operand into a zero-padded (kTileRows, kCover) tile.
template <int kCover, int kTileRows, typename T, typename A>
__device__ __forceinline__ void load_tile(A* tile, const T* base, int64_t token_stride, int first, int tokens,
                                          int d) {
  static_assert(kTileRows * kCover % kThreads == 0, "tile must split evenly over the threads");
#pragma unroll 2
  for (int n = threadIdx.x; n < kTileRows * kCover; n += kThreads) {
    const int r = n / kCover, c = n % kCover;
    const int t = first + r;
    tile[n] = t < tokens && c < d ? widen(base[t * token_stride + c]) : A(0);
  }
}

// idx(i, j) = base(i) - code(j): base(i) = (r_i + ws-1)(2ws-1) + c_i + ws-1, code(j) = r_j (2ws-1) + c_j.
// Out-of-range tokens take token M-1 (base) or 0 (code) so that every index stays inside the table.
__device__ __forceinline__ int query_base(int i, int tokens, int ws) {
  const int t = i < tokens ? i : tokens - 1;
  return (t / ws + ws - 1) * (2 * ws - 1) + t % ws + ws - 1;
}
__device__ __forceinline__ int key_code(int j, int tokens, int ws) {
  return j < tokens ? j / ws * (2 * ws - 1) + j % ws : 0;
}

// The head's bias column: staged in shared memory (stride 1) or read from the (rows, heads) table in place.
template <typename A>
struct Bias {
  const A* column;
  int64_t stride;
  __device__ A operator()(int index) const { return column[index * stride]; }
};

template <typename A>
__device__ __forceinline__ Bias<A> head_bias(A* staged, const A* table, int rows, int64_t heads, int64_t h) {
  if (staged == nullptr) return {table + h, heads};
  for (int r = threadIdx.x; r < rows; r += kThreads) staged[r] = table[r * heads + h];
  return {staged, 1};  // the caller's next __syncthreads publishes the staged column
}

LLDIF_DYNAMIC_SHARED(wca_dynamic_smem);

template <typename T>
struct Params {
  const T* q;
  const T* k;
  const T* v;
  const Acc<T>* table;
  WcaStrides qs, ks, vs;
  int64_t heads, windows_per_query;
  int tokens, dim, window_size, table_rows;
  Acc<T> scale;
  bool table_staged;
  // Forward outputs.
  T* out;
  Acc<T>* lse;
  // Backward inputs and outputs. out, dout, dq, dk, dv are contiguous (.., heads, M, d).
  const T* dout;
  const Acc<T>* saved_lse;
  Acc<T>* delta;
  T* dq;
  T* dk;
  T* dv;
  Acc<T>* partials;     // (windows, heads, key tiles, table rows)
  Acc<T>* bin_scratch;  // (windows, heads, key tiles, kWarps, table rows) when the bins live in global memory
  int64_t key_tiles;
};

// ---------------------------------------------------------------------------------------------------------
// Forward.

// Keys [key0, key0 + kKeys) of k and v, and their bias codes, into shared memory. The barrier before keeps the
// previous tile until every thread is done with it; the one after publishes the new one.
template <int kCover, int kKeys, typename T, typename A>
__device__ __forceinline__ void stage_key_tile(const Params<T>& p, const T* k_head, const T* v_head, int key0,
                                               A* k_tile, A* v_tile, int* codes) {
  const int M = p.tokens, d = p.dim, ws = p.window_size;
  __syncthreads();
  load_tile<kCover, kKeys>(k_tile, k_head, p.ks.token, key0, M, d);
  load_tile<kCover, kKeys>(v_tile, v_head, p.vs.token, key0, M, d);
  if (threadIdx.x < kKeys) codes[threadIdx.x] = key_code(key0 + threadIdx.x, M, ws);
  __syncthreads();
}

template <typename T, int kCover>
__global__ void __launch_bounds__(kThreads, 1) wca_fwd_kernel(const __grid_constant__ Params<T> p) {
  using A = Acc<T>;
  using L = Layout<A, kCover>;
  constexpr int kKeys = L::kFwdKeys, kStep = L::kFwdStep;
  static_assert(L::kSplits == 1 || L::kRows * (kCover + 2) <= 2 * kKeys * kCover, "split merge must fit in the K/V tiles");
  __shared__ __align__(16) A kv[2 * kKeys * kCover];
  __shared__ int codes[kKeys];
  A* k_tile = kv;
  A* v_tile = kv + kKeys * kCover;

  const int64_t wh = blockIdx.x, w = wh / p.heads, h = wh % p.heads;
  const int M = p.tokens, d = p.dim, ws = p.window_size;
  const T* q_head = p.q + w / p.windows_per_query * p.qs.window + h * p.qs.head;
  const T* k_head = p.k + w * p.ks.window + h * p.ks.head;
  const T* v_head = p.v + w * p.vs.window + h * p.vs.head;
  const Bias<A> bias = head_bias(p.table_staged ? reinterpret_cast<A*>(wca_dynamic_smem) : nullptr, p.table,
                                 p.table_rows, p.heads, h);
  const Lane<L> lane;
  const int i = blockIdx.y * L::kRows + lane.row;
  const bool valid = i < M;
  A x[L::kSlice];
  load_slice(q_head + i * p.qs.token, valid, d, lane, x);
  const int base = query_base(i, M, ws);

  A acc[L::kSlice] = {};
  A row_max = A(-INFINITY), row_sum = A(0);
  for (int key0 = 0; key0 < M; key0 += kKeys) {
    stage_key_tile<kCover, kKeys>(p, k_head, v_head, key0, k_tile, v_tile, codes);
    const int first = key0 + lane.split * kStep;
    if (first >= M) continue;  // warp-uniform
    const A* k_rows = k_tile + lane.split * kStep * kCover;
    const A* v_rows = v_tile + lane.split * kStep * kCover;
    const int* split_codes = codes + lane.split * kStep;
    A s[kStep];
    A step_max = A(-INFINITY);
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      const A logit = dot(k_rows + j * kCover, x, lane) * p.scale + bias(base - split_codes[j]);
      s[j] = first + j < M ? logit : A(-INFINITY);
      step_max = fmax(step_max, s[j]);
    }
    // A row with no finite logit yet keeps row_max = -inf; shifting by 0 then gives p = 0, not NaN.
    const A new_max = fmax(row_max, step_max);
    const A shift = new_max == A(-INFINITY) ? A(0) : new_max;
    const A rescale = exp2_of((row_max - shift) * A(kLog2e));
    row_max = new_max;
    row_sum *= rescale;
#pragma unroll
    for (int c = 0; c < L::kSlice; ++c) acc[c] *= rescale;
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      const A pj = exp2_of((s[j] - shift) * A(kLog2e));
      row_sum += pj;
      axpy(pj, v_rows + j * kCover, acc, lane);
    }
  }

  if constexpr (L::kSplits > 1) {
    // Split s is folded into split 0 after splits 1 .. s-1.
    A* merge_acc = kv;
    A* merge_max = kv + L::kRows * kCover;
    A* merge_sum = merge_max + L::kRows;
    for (int s = 1; s < L::kSplits; ++s) {
      __syncthreads();
      if (lane.split == s) {
#pragma unroll
        for (int m = 0; m < L::kChunks; ++m) {
#pragma unroll
          for (int e = 0; e < L::kVec; ++e) merge_acc[lane.row * kCover + lane.channel(m, e)] = acc[m * L::kVec + e];
        }
        merge_max[lane.row] = row_max;
        merge_sum[lane.row] = row_sum;
      }
      __syncthreads();
      if (lane.split == 0) {
        const A other_max = merge_max[lane.row];
        const A new_max = fmax(row_max, other_max);
        const A shift = new_max == A(-INFINITY) ? A(0) : new_max;
        const A mine = exp2_of((row_max - shift) * A(kLog2e)), other = exp2_of((other_max - shift) * A(kLog2e));
        row_max = new_max;
        row_sum = row_sum * mine + merge_sum[lane.row] * other;
#pragma unroll
        for (int m = 0; m < L::kChunks; ++m) {
#pragma unroll
          for (int e = 0; e < L::kVec; ++e) {
            const int c = m * L::kVec + e;
            acc[c] = acc[c] * mine + merge_acc[lane.row * kCover + lane.channel(m, e)] * other;
          }
        }
      }
    }
  }

  if (lane.split != 0 || !valid) return;
  const int64_t row = wh * M + i;
  // row_sum = 0 exactly when every logit is -inf: out 0, lse +inf.
  store_slice(p.out + row * d, d, row_sum > A(0) ? A(1) / row_sum : A(0), acc, lane);
  if (lane.group == 0) {
    p.lse[row] = row_sum > A(0) ? row_max + log2_of(row_sum) * A(kLn2) : A(INFINITY);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

// D = rowsum(dout ⊙ out), one warp per (window, head, token) row.
template <typename T>
__global__ void __launch_bounds__(kReduceWarps * kWarpSize)
    wca_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, Acc<T>* __restrict__ delta,
                     int64_t rows, int d) {
  using A = Acc<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kReduceWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarpSize;
  A sum = A(0);
  for (int c = lane; c < d; c += kWarpSize) sum += widen(dout[row * d + c]) * widen(out[row * d + c]);
  sum = lanes_sum<kWarpSize>(sum);
  if (lane == 0) delta[row] = sum;
}

// dk, dv and the CTA's partial dtable for one key tile of one (window, head).
template <typename T, int kCover>
__global__ void __launch_bounds__(kThreads, 1) wca_dkdv_kernel(const __grid_constant__ Params<T> p) {
  using A = Acc<T>;
  using L = Layout<A, kCover>;
  constexpr int kQueries = L::kBwdRows, kStep = L::kBwdStep;
  static_assert(L::kSplits == 1 || 2 * L::kRows <= 2 * kQueries, "split merge must fit in the Q/dO tiles");
  __shared__ __align__(16) A qo[2 * kQueries * kCover];
  __shared__ A query_lse[kQueries], query_delta[kQueries];
  __shared__ int query_bases[kQueries];
  A* q_tile = qo;
  A* o_tile = qo + kQueries * kCover;

  const int64_t wh = blockIdx.x, w = wh / p.heads, h = wh % p.heads;
  const int M = p.tokens, d = p.dim, ws = p.window_size, rows = p.table_rows;
  const T* q_head = p.q + w / p.windows_per_query * p.qs.window + h * p.qs.head;
  const T* o_head = p.dout + wh * M * d;
  const Lane<L> lane;
  const int j = blockIdx.y * L::kRows + lane.row;
  const bool valid = j < M;
  const int code = key_code(j, M, ws);
  A key[L::kSlice], value[L::kSlice];
  load_slice(p.k + w * p.ks.window + h * p.ks.head + j * p.ks.token, valid, d, lane, key);
  load_slice(p.v + w * p.vs.window + h * p.vs.head + j * p.vs.token, valid, d, lane, value);

  // Dynamic shared memory: [kWarps bin copies, unless in global scratch][staged table column].
  A* dynamic = reinterpret_cast<A*>(wca_dynamic_smem);
  const int64_t tile_slot = wh * p.key_tiles + blockIdx.y;
  A* bins_base = p.bin_scratch != nullptr ? p.bin_scratch + tile_slot * kWarps * rows : dynamic;
  A* bins = bins_base + lane.warp * rows;
  const Bias<A> bias = head_bias(p.table_staged ? dynamic + (p.bin_scratch != nullptr ? 0 : kWarps * rows) : nullptr,
                                 p.table, rows, p.heads, h);
  for (int r = threadIdx.x % kWarpSize; r < rows; r += kWarpSize) bins[r] = A(0);
  __syncwarp();

  A dk[L::kSlice] = {}, dv[L::kSlice] = {};
  for (int query0 = 0; query0 < M; query0 += kQueries) {
    __syncthreads();
    load_tile<kCover, kQueries>(q_tile, q_head, p.qs.token, query0, M, d);
    load_tile<kCover, kQueries>(o_tile, o_head, d, query0, M, d);
    if (threadIdx.x < kQueries) {
      const int i = query0 + threadIdx.x;
      // lse +inf makes P = 0 for padding queries (and for rows whose logits were all -inf).
      query_lse[threadIdx.x] = i < M ? p.saved_lse[wh * M + i] : A(INFINITY);
      query_delta[threadIdx.x] = i < M ? p.delta[wh * M + i] : A(0);
      query_bases[threadIdx.x] = query_base(i, M, ws);
    }
    __syncthreads();
    const int first = query0 + lane.split * kStep;
    if (first >= M) continue;  // warp-uniform
#pragma unroll 1
    for (int ii = lane.split * kStep; ii < (lane.split + 1) * kStep; ++ii) {
      const A* q_row = q_tile + ii * kCover;
      const A* o_row = o_tile + ii * kCover;
      const A s = dot(q_row, key, lane);
      const A dp = dot(o_row, value, lane);
      const int index = query_bases[ii] - code;
      const A prob = exp2_of((s * p.scale + bias(index) - query_lse[ii]) * A(kLog2e));
      const A ds = prob * (dp - query_delta[ii]);
      axpy(prob, o_row, dv, lane);
      axpy(ds, q_row, dk, lane);
      if (lane.group == 0 && valid) bins[index] += ds;
      __syncwarp();
    }
  }

  if constexpr (L::kSplits > 1) {
    A* merge_dk = qo;
    A* merge_dv = qo + L::kRows * kCover;
    for (int s = 1; s < L::kSplits; ++s) {
      __syncthreads();
      if (lane.split == s) {
#pragma unroll
        for (int m = 0; m < L::kChunks; ++m) {
#pragma unroll
          for (int e = 0; e < L::kVec; ++e) {
            merge_dk[lane.row * kCover + lane.channel(m, e)] = dk[m * L::kVec + e];
            merge_dv[lane.row * kCover + lane.channel(m, e)] = dv[m * L::kVec + e];
          }
        }
      }
      __syncthreads();
      if (lane.split == 0) {
#pragma unroll
        for (int m = 0; m < L::kChunks; ++m) {
#pragma unroll
          for (int e = 0; e < L::kVec; ++e) {
            dk[m * L::kVec + e] += merge_dk[lane.row * kCover + lane.channel(m, e)];
            dv[m * L::kVec + e] += merge_dv[lane.row * kCover + lane.channel(m, e)];
          }
        }
      }
    }
  }
  if (lane.split == 0 && valid) {
    const int64_t row = wh * M + j;
    store_slice(p.dk + row * d, d, p.scale, dk, lane);
    store_slice(p.dv + row * d, d, A(1), dv, lane);
  }

  __syncthreads();
  A* partial = p.partials + tile_slot * rows;
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    A sum = bins_base[r];
#pragma unroll
    for (int warp = 1; warp < kWarps; ++warp) sum += bins_base[warp * rows + r];
    partial[r] = sum;
  }
}

// dq for one query tile of one (query window, head), summed over the windows sharing the query.
template <typename T, int kCover>
__global__ void __launch_bounds__(kThreads, 1) wca_dq_kernel(const __grid_constant__ Params<T> p) {
  using A = Acc<T>;
  using L = Layout<A, kCover>;
  constexpr int kKeys = L::kBwdRows, kStep = L::kBwdStep;
  static_assert(L::kSplits == 1 || L::kRows <= 2 * kKeys, "split merge must fit in the K/V tiles");
  __shared__ __align__(16) A kv[2 * kKeys * kCover];
  __shared__ int codes[kKeys];
  A* k_tile = kv;
  A* v_tile = kv + kKeys * kCover;

  const int64_t qwh = blockIdx.x, qw = qwh / p.heads, h = qwh % p.heads;
  const int M = p.tokens, d = p.dim, ws = p.window_size;
  const Bias<A> bias = head_bias(p.table_staged ? reinterpret_cast<A*>(wca_dynamic_smem) : nullptr, p.table,
                                 p.table_rows, p.heads, h);
  const Lane<L> lane;
  const int i = blockIdx.y * L::kRows + lane.row;
  const bool valid = i < M;
  const int base = query_base(i, M, ws);
  A query[L::kSlice], grad_out[L::kSlice];
  load_slice(p.q + qw * p.qs.window + h * p.qs.head + i * p.qs.token, valid, d, lane, query);

  A dq[L::kSlice] = {};
  for (int64_t w = qw * p.windows_per_query; w < (qw + 1) * p.windows_per_query; ++w) {
    const int64_t row = (w * p.heads + h) * M + i;
    load_slice(p.dout + row * d, valid, d, lane, grad_out);
    const A row_lse = valid ? p.saved_lse[row] : A(INFINITY);
    const A row_delta = valid ? p.delta[row] : A(0);
    const T* k_head = p.k + w * p.ks.window + h * p.ks.head;
    const T* v_head = p.v + w * p.vs.window + h * p.vs.head;
    for (int key0 = 0; key0 < M; key0 += kKeys) {
      stage_key_tile<kCover, kKeys>(p, k_head, v_head, key0, k_tile, v_tile, codes);
      const int first = key0 + lane.split * kStep;
      if (first >= M) continue;  // warp-uniform
#pragma unroll 1
      for (int jj = lane.split * kStep; jj < (lane.split + 1) * kStep; ++jj) {
        const A* k_row = k_tile + jj * kCover;
        const A s = dot(k_row, query, lane);
        const A dp = dot(v_tile + jj * kCover, grad_out, lane);
        const A logit = s * p.scale + bias(base - codes[jj]);
        const A prob = key0 + jj < M ? exp2_of((logit - row_lse) * A(kLog2e)) : A(0);
        axpy(prob * (dp - row_delta), k_row, dq, lane);
      }
    }
  }

  if constexpr (L::kSplits > 1) {
    for (int s = 1; s < L::kSplits; ++s) {
      __syncthreads();
      if (lane.split == s) {
#pragma unroll
        for (int m = 0; m < L::kChunks; ++m) {
#pragma unroll
          for (int e = 0; e < L::kVec; ++e) kv[lane.row * kCover + lane.channel(m, e)] = dq[m * L::kVec + e];
        }
      }
      __syncthreads();
      if (lane.split == 0) {
#pragma unroll
        for (int m = 0; m < L::kChunks; ++m) {
#pragma unroll
          for (int e = 0; e < L::kVec; ++e) dq[m * L::kVec + e] += kv[lane.row * kCover + lane.channel(m, e)];
        }
      }
    }
  }
  if (lane.split == 0 && valid) store_slice(p.dq + (qwh * M + i) * d, d, p.scale, dq, lane);
}

// dtable[r, h] = Σ over (window, key tile), in that order, of the partial tables. A block takes 32 rows of
// one head; its warps take consecutive ranges of (window, key tile) and are added in warp order.
template <typename A>
__global__ void __launch_bounds__(kReduceWarps * kWarpSize)
    wca_dtable_kernel(const A* __restrict__ partials, A* __restrict__ dtable, int64_t windows, int64_t heads,
                      int64_t key_tiles, int rows) {
  __shared__ A sums[kReduceWarps][kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int r = blockIdx.x * kWarpSize + lane;
  const int64_t h = blockIdx.y;
  const int64_t count = windows * key_tiles;
  const int64_t chunk = ceil_div(count, kReduceWarps);
  const int64_t begin = warp * chunk < count ? warp * chunk : count;
  const int64_t end = begin + chunk < count ? begin + chunk : count;
  A sum = A(0);
  if (r < rows && begin < end) {
    int64_t w = begin / key_tiles, t = begin % key_tiles;
    for (int64_t n = begin; n < end; ++n) {
      sum += partials[((w * heads + h) * key_tiles + t) * rows + r];
      if (++t == key_tiles) t = 0, ++w;
    }
  }
  sums[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && r < rows) {
    A total = sums[0][lane];
#pragma unroll
    for (int s = 1; s < kReduceWarps; ++s) total += sums[s][lane];
    dtable[r * heads + h] = total;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launch plumbing.

// Calls f with the channel cover (32, 64 or 128, the smallest >= d) as a std::integral_constant.
template <int kCover>
using Cover = std::integral_constant<int, kCover>;
template <typename F>
cudaError_t with_cover(int64_t d, F&& f) {
  if (d <= 32) return f(Cover<32>{});
  if (d <= 64) return f(Cover<64>{});
  if (d <= kMaxDim) return f(Cover<kMaxDim>{});
  return cudaErrorInvalidValue;
}

bool is_empty(const WcaShape& s) { return s.windows == 0 || s.heads == 0 || s.tokens == 0; }

int table_rows_of(const WcaShape& s) {
  return static_cast<int>((2 * s.window_size - 1) * (2 * s.window_size - 1));
}

// Shared-memory placement of the backward: dkdv's warp bins go to shared memory when they fit in the
// device's opt-in limit (else into a global scratch), then the table column when it still fits; dq stages
// the table within the default 48 KB. Depends on the device (current) and the shape only.
struct BwdPlan {
  int64_t key_tiles;
  bool bins_shared, dkdv_table_staged, dq_table_staged;
  size_t dkdv_dynamic, dq_dynamic;
  int64_t delta_offset, partials_offset, scratch_offset, workspace_elems;  // in accumulation elements
};

template <typename T, int kCover>
cudaError_t plan_bwd(const WcaShape& s, BwdPlan& plan) {
  using A = Acc<T>;
  using L = Layout<A, kCover>;
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes dkdv{}, dq{};
  if ((err = cudaFuncGetAttributes(&dkdv, wca_dkdv_kernel<T, kCover>)) != cudaSuccess) return err;
  if ((err = cudaFuncGetAttributes(&dq, wca_dq_kernel<T, kCover>)) != cudaSuccess) return err;
  const size_t table_bytes = static_cast<size_t>(table_rows_of(s)) * sizeof(A);
  const size_t bins_bytes = kWarps * table_bytes;
  plan.key_tiles = ceil_div(s.tokens, L::kRows);
  plan.bins_shared = dkdv.sharedSizeBytes + bins_bytes <= static_cast<size_t>(optin);
  const size_t bins_dynamic = plan.bins_shared ? bins_bytes : 0;
  plan.dkdv_table_staged = dkdv.sharedSizeBytes + bins_dynamic + table_bytes <= static_cast<size_t>(optin);
  plan.dkdv_dynamic = bins_dynamic + (plan.dkdv_table_staged ? table_bytes : 0);
  plan.dq_table_staged = dq.sharedSizeBytes + table_bytes <= kDefaultSharedLimit;
  plan.dq_dynamic = plan.dq_table_staged ? table_bytes : 0;
  // Each region starts on a 256-byte boundary.
  constexpr int64_t kAlign = 256 / sizeof(A);
  const int64_t slots = s.windows * s.heads * plan.key_tiles;
  plan.delta_offset = 0;
  plan.partials_offset = ceil_div(s.windows * s.heads * s.tokens, kAlign) * kAlign;
  plan.scratch_offset = plan.partials_offset + ceil_div(slots * table_rows_of(s), kAlign) * kAlign;
  plan.workspace_elems = plan.scratch_offset + (plan.bins_shared ? 0 : slots * kWarps * table_rows_of(s));
  return cudaSuccess;
}

template <typename T>
Params<T> params_of(const WcaShape& s, const void* q, const void* k, const void* v, const void* table,
                    double scale) {
  using A = Acc<T>;
  Params<T> p{};
  p.q = static_cast<const T*>(q), p.k = static_cast<const T*>(k), p.v = static_cast<const T*>(v);
  p.table = static_cast<const A*>(table);
  p.qs = s.q, p.ks = s.k, p.vs = s.v;
  p.heads = s.heads, p.windows_per_query = s.windows / s.query_windows;
  p.tokens = static_cast<int>(s.tokens), p.dim = static_cast<int>(s.dim);
  p.window_size = static_cast<int>(s.window_size), p.table_rows = table_rows_of(s);
  p.scale = static_cast<A>(scale);
  return p;
}

template <typename Kernel>
cudaError_t allow_dynamic_shared(Kernel kernel, size_t dynamic_bytes) {
  cudaFuncAttributes attributes{};
  cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess || attributes.sharedSizeBytes + dynamic_bytes <= kDefaultSharedLimit) return err;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(dynamic_bytes));
}

}  // namespace

// The kernels' limits, checked by the glue: d <= max_dim; windows · heads within INT32_MAX (x dimension of
// the grid); M within int; row_tiles within the grid's y dimension.
int64_t window_cross_attention_max_dim() { return kMaxDim; }

// Tiles of rows (queries in fwd and dq, keys in dkdv) of one (window, head): the y dimension of their grids.
int64_t window_cross_attention_row_tiles(ElementType dtype, int64_t dim, int64_t tokens) {
  int64_t tiles = -1;
  with_element_type(dtype, [&](auto element) {
    return with_cover(dim, [&](auto cover) {
      tiles = ceil_div(tokens, Layout<Acc<decltype(element)>, decltype(cover)::value>::kRows);
      return cudaSuccess;
    });
  });
  return tiles;
}

// Elements (of the accumulation type) of the backward's workspace; 0 for an empty problem. Call on the
// device that will run the backward.
int64_t window_cross_attention_workspace_elems(ElementType dtype, const WcaShape& shape) {
  if (is_empty(shape)) return 0;
  int64_t elems = -1;
  const cudaError_t err = with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    return with_cover(shape.dim, [&](auto cover) {
      BwdPlan plan{};
      const cudaError_t e = plan_bwd<T, decltype(cover)::value>(shape, plan);
      elems = plan.workspace_elems;
      return e;
    });
  });
  return err == cudaSuccess ? elems : -1;
}

// q, k, v: the element type of dtype, strided as shape.q, shape.k, shape.v (channel stride 1). table:
// ((2ws-1)², heads) contiguous in the accumulation type (float; double for kFloat64). out: (W, heads, M, d)
// contiguous, q's type; lse: (W, heads, M), accumulation type. Asynchronous on stream; an empty problem
// launches nothing.
cudaError_t window_cross_attention_fwd_cuda(ElementType dtype, const WcaShape& shape, const void* q, const void* k,
                                            const void* v, const void* table, void* out, void* lse, double scale,
                                            cudaStream_t stream) {
  if (is_empty(shape)) return cudaSuccess;
  return with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    using A = Acc<T>;
    return with_cover(shape.dim, [&](auto cover) {
      constexpr int kCover = decltype(cover)::value;
      using L = Layout<A, kCover>;
      Params<T> p = params_of<T>(shape, q, k, v, table, scale);
      p.out = static_cast<T*>(out), p.lse = static_cast<A*>(lse);
      cudaFuncAttributes attributes{};
      cudaError_t err = cudaFuncGetAttributes(&attributes, wca_fwd_kernel<T, kCover>);
      if (err != cudaSuccess) return err;
      const size_t table_bytes = static_cast<size_t>(p.table_rows) * sizeof(A);
      p.table_staged = attributes.sharedSizeBytes + table_bytes <= kDefaultSharedLimit;
      const dim3 grid(static_cast<unsigned>(shape.windows * shape.heads),
                      static_cast<unsigned>(ceil_div(shape.tokens, L::kRows)));
      LLDIF_LAUNCH(grid, kThreads, p.table_staged ? table_bytes : 0, stream, wca_fwd_kernel<T, kCover>)(p);
      return cudaGetLastError();
    });
  });
}

// dout, out: (W, heads, M, d) contiguous, q's type; lse: the forward's. dq: q's shape (Wq, heads, M, d)
// contiguous, or nullptr to skip it; dk, dv: (W, heads, M, d) contiguous; dtable: table's shape, every
// element overwritten. workspace: window_cross_attention_workspace_elems(dtype, shape) elements of the
// accumulation type, no initialisation needed. Asynchronous on stream; an empty problem launches nothing
// (the caller zeroes dtable).
cudaError_t window_cross_attention_bwd_cuda(ElementType dtype, const WcaShape& shape, const void* dout, const void* q,
                                            const void* k, const void* v, const void* table, const void* out,
                                            const void* lse, void* dq, void* dk, void* dv, void* dtable,
                                            void* workspace, double scale, cudaStream_t stream) {
  if (is_empty(shape)) return cudaSuccess;
  return with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    using A = Acc<T>;
    return with_cover(shape.dim, [&](auto cover) {
      constexpr int kCover = decltype(cover)::value;
      using L = Layout<A, kCover>;
      BwdPlan plan{};
      cudaError_t err = plan_bwd<T, kCover>(shape, plan);
      if (err != cudaSuccess) return err;
      A* work = static_cast<A*>(workspace);
      Params<T> p = params_of<T>(shape, q, k, v, table, scale);
      p.dout = static_cast<const T*>(dout), p.saved_lse = static_cast<const A*>(lse);
      p.delta = work + plan.delta_offset;
      p.dq = static_cast<T*>(dq), p.dk = static_cast<T*>(dk), p.dv = static_cast<T*>(dv);
      p.partials = work + plan.partials_offset;
      p.bin_scratch = plan.bins_shared ? nullptr : work + plan.scratch_offset;
      p.key_tiles = plan.key_tiles;

      const int64_t rows = shape.windows * shape.heads * shape.tokens;
      LLDIF_LAUNCH(static_cast<unsigned>(ceil_div(rows, kReduceWarps)), kReduceWarps * kWarpSize, 0, stream,
                   wca_delta_kernel<T>)(p.dout, static_cast<const T*>(out), p.delta, rows, p.dim);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;

      p.table_staged = plan.dkdv_table_staged;
      if ((err = allow_dynamic_shared(wca_dkdv_kernel<T, kCover>, plan.dkdv_dynamic)) != cudaSuccess) return err;
      LLDIF_LAUNCH(dim3(static_cast<unsigned>(shape.windows * shape.heads), static_cast<unsigned>(plan.key_tiles)),
                   kThreads, plan.dkdv_dynamic, stream, wca_dkdv_kernel<T, kCover>)(p);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;

      if (dq != nullptr) {
        p.table_staged = plan.dq_table_staged;
        LLDIF_LAUNCH(dim3(static_cast<unsigned>(shape.query_windows * shape.heads),
                          static_cast<unsigned>(ceil_div(shape.tokens, L::kRows))),
                     kThreads, plan.dq_dynamic, stream, wca_dq_kernel<T, kCover>)(p);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }

      LLDIF_LAUNCH(dim3(static_cast<unsigned>(ceil_div(p.table_rows, kWarpSize)), static_cast<unsigned>(shape.heads)),
                   kReduceWarps * kWarpSize, 0, stream, wca_dtable_kernel<A>)(
          p.partials, static_cast<A*>(dtable), shape.windows, shape.heads, plan.key_tiles, p.table_rows);
      return cudaGetLastError();
    });
  });
}

}  // namespace lldif_kernels

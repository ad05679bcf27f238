// The register-blocked small GEMM and the operand packing that the CPU attention kernels share.
//
// Attention products here are small (tens to hundreds of rows, short depths), far below where a BLAS call
// pays for itself, so each kernel calls this one 6 x 16 register-blocked block directly on data already in
// cache. GCC vector extensions instead of intrinsics, so float64 (tests, gradcheck) runs the same code.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace lldif_kernels::cpu {

// One AVX register of the accumulation type; GCC lowers these to whatever -march offers.
template <typename acc_t>
struct Register {
  using type __attribute__((vector_size(32))) = acc_t;
};
template <typename acc_t>
using vec_t = typename Register<acc_t>::type;
template <typename acc_t>
constexpr int64_t kLanes = 32 / sizeof(acc_t);
// Output columns per kernel call: two registers, so 6 rows x 2 accumulators + 2 loads + 1 broadcast fit
// in the 16 AVX registers.
template <typename acc_t>
constexpr int64_t kCols = 2 * kLanes<acc_t>;
constexpr int kRows = 6;

template <typename acc_t>
inline vec_t<acc_t> load(const acc_t* p) {
  vec_t<acc_t> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
inline void store(acc_t* p, vec_t<acc_t> v) {
  std::memcpy(p, &v, sizeof(v));
}

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// The right-hand operand B (depth x cols) of gemm(), read kCols columns at a time: column panel p starts at
// data + p·panel and its row k at + k·row. Packed panels (pack_panels) have row = kCols, panel = kCols·depth;
// a row-major matrix whose row length is padded to kCols (zeros past cols) has row = its stride, panel = kCols.
template <typename acc_t>
struct Right {
  const acc_t* data;
  int64_t row, panel;

  static Right packed(const acc_t* panels, int64_t depth) { return {panels, kCols<acc_t>, kCols<acc_t> * depth}; }
  static Right row_major(const acc_t* b, int64_t stride) { return {b, stride, kCols<acc_t>}; }
};

// c[r][0:kCols] (+)= sum_k a[r*a_row + k] * b[k*b_row + 0:kCols] for r < R.
template <typename acc_t, int R>
void gemm_block(const acc_t* a, int64_t a_row, const acc_t* b, int64_t b_row, int64_t depth, acc_t* c, int64_t ldc,
                bool accumulate) {
  constexpr int64_t L = kLanes<acc_t>;
  vec_t<acc_t> acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = accumulate ? load(c + r * ldc) : vec_t<acc_t>{};
    acc[r][1] = accumulate ? load(c + r * ldc + L) : vec_t<acc_t>{};
  }
  for (int64_t k = 0; k < depth; ++k) {
    const vec_t<acc_t> b0 = load(b + k * b_row), b1 = load(b + k * b_row + L);
    for (int r = 0; r < R; ++r) {
      const acc_t ar = a[r * a_row + k];
      acc[r][0] += ar * b0;
      acc[r][1] += ar * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    store(c + r * ldc, acc[r][0]);
    store(c + r * ldc + L, acc[r][1]);
  }
}

// C (rows x cols, cols a multiple of kCols) (+)= A (rows x depth, row stride a_row) · B (depth x cols).
template <typename acc_t>
void gemm(int64_t rows, int64_t cols, int64_t depth, const acc_t* a, int64_t a_row, Right<acc_t> b, acc_t* c,
          int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < cols; j += kCols<acc_t>) {
    const acc_t* panel = b.data + j / kCols<acc_t> * b.panel;
    for (int64_t i = 0; i < rows; i += kRows) {
      const acc_t* ai = a + i * a_row;
      acc_t* cij = c + i * ldc + j;
      switch (std::min<int64_t>(kRows, rows - i)) {
        case 6: gemm_block<acc_t, 6>(ai, a_row, panel, b.row, depth, cij, ldc, accumulate); break;
        case 5: gemm_block<acc_t, 5>(ai, a_row, panel, b.row, depth, cij, ldc, accumulate); break;
        case 4: gemm_block<acc_t, 4>(ai, a_row, panel, b.row, depth, cij, ldc, accumulate); break;
        case 3: gemm_block<acc_t, 3>(ai, a_row, panel, b.row, depth, cij, ldc, accumulate); break;
        case 2: gemm_block<acc_t, 2>(ai, a_row, panel, b.row, depth, cij, ldc, accumulate); break;
        default: gemm_block<acc_t, 1>(ai, a_row, panel, b.row, depth, cij, ldc, accumulate); break;
      }
    }
  }
}

// A (rows x n) block of a (rows x N) matrix as GEMM right-hand panels: panel p holds columns
// [p·kCols, (p+1)·kCols) of every row, contiguous, zero past n.
template <typename scalar_t, typename acc_t>
void pack_panels(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t n, acc_t* dst) {
  constexpr int64_t W = kCols<acc_t>;
  const int64_t panels = (n + W - 1) / W, full = n / W;
  // Row by row, so that each source row is one sequential read the prefetcher follows; panel by panel
  // would read 64 bytes from each of d rows N·4 bytes apart, and wait on memory for most of them.
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * src_stride;
    for (int64_t p = 0; p < full; ++p) {
      acc_t* out = dst + (p * rows + r) * W;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        std::memcpy(out, in + p * W, W * sizeof(acc_t));  // GCC leaves the element loop scalar
      } else {
        for (int64_t c = 0; c < W; ++c) out[c] = static_cast<acc_t>(in[p * W + c]);
      }
    }
    if (full < panels) {
      acc_t* out = dst + (full * rows + r) * W;
      const int64_t width = n - full * W;
      for (int64_t c = 0; c < width; ++c) out[c] = static_cast<acc_t>(in[full * W + c]);
      std::fill(out + width, out + W, acc_t(0));
    }
  }
}

#if defined(__AVX__)
// out[i][c] = in[c][i] for an 8 x 8 float block: the standard unpack / shuffle / lane-permute network.
inline void transpose_8x8(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * in_stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * out_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * out_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// The transpose of a (rows x n) block as right-hand panels for a Gram product over positions: depth n,
// padded_rows columns, zero past rows.
template <typename scalar_t, typename acc_t>
void pack_transposed_panels(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t padded_rows, int64_t n,
                            acc_t* dst) {
  constexpr int64_t W = kCols<acc_t>;
  auto at = [&](int64_t r, int64_t i) -> acc_t& { return dst[(r / W * n + i) * W + r % W]; };
  int64_t r = 0;
#if defined(__AVX__)
  // Scalar stores, one per element at a 64-byte stride, would cost a third of the Gram's time.
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    for (; r + 8 <= rows; r += 8) {
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) transpose_8x8(src + r * src_stride + i, src_stride, &at(r, i), W);
      for (; i < n; ++i)
        for (int64_t c = r; c < r + 8; ++c) at(c, i) = src[c * src_stride + i];
    }
  }
#endif
  for (; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) at(r, i) = static_cast<acc_t>(src[r * src_stride + i]);
  for (; r < padded_rows; ++r)
    for (int64_t i = 0; i < n; ++i) at(r, i) = acc_t(0);
}

}  // namespace lldif_kernels::cpu

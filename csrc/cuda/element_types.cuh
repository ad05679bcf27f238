// Element types of the CUDA kernels: the accumulation type of each storage type, the conversions
// between them, and the dispatch from the glue's ElementType. Device code only, no torch headers, so every .cu file can include it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "element_type.h"

namespace lldif_kernels::device {

// Half and bfloat16 compute in float; only float64 inputs need float64 accumulation.
template <typename T> struct AccumulatorOf { using type = float; };
template <> struct AccumulatorOf<double> { using type = double; };
template <typename T> using Acc = typename AccumulatorOf<T>::type;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double widen(double v) { return v; }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

// Calls f with a value of the element type that dtype names; every launcher dispatches through it.
template <typename F>
cudaError_t with_element_type(ElementType dtype, F&& f) {
  switch (dtype) {
    case ElementType::kFloat32: return f(float{});
    case ElementType::kFloat16: return f(__half{});
    case ElementType::kBFloat16: return f(__nv_bfloat16{});
    case ElementType::kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace lldif_kernels::device

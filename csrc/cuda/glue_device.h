// Where the ATen glue's tensors live and how it registers: CUDA tensors on the GPU (the product), or, in the
// test-only host build of tests/cuda_host (LLDIF_CUDA_HOST), CPU tensors handed to the same kernels running
// under the host emulation, registered as the lldif_cuda_emulated ops.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "element_type.h"

#ifdef LLDIF_CUDA_HOST
#include <cuda_host.h>
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace lldif_kernels::glue {

#ifdef LLDIF_CUDA_HOST
constexpr const char* kDeviceName = "CPU (the host emulation of the CUDA kernels)";
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#define LLDIF_CUDA_KERNELS_IMPL(m) TORCH_LIBRARY_IMPL(lldif_cuda_emulated, CPU, m)
#else
constexpr const char* kDeviceName = "CUDA";
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#define LLDIF_CUDA_KERNELS_IMPL(m) TORCH_LIBRARY_IMPL(lldif_native, CUDA, m)
#endif

// The element type of `tensor`, the argument `name` of `op` that decides the kernels' dtype, checked to be one the
// kernels take and on their device. Runs before the device guard, which needs a tensor on that device.
inline ElementType checked_element_type(const at::Tensor& tensor, const char* op, const char* name) {
  TORCH_CHECK_VALUE(on_kernel_device(tensor), op, ": ", name, " must be a ", kDeviceName, " tensor, got device ",
                    tensor.device());
  const at::ScalarType t = tensor.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, op,
                   ": the CUDA kernels take float32, float16, bfloat16 or float64 ", name, ", got ", t);
  return t == at::kFloat      ? ElementType::kFloat32
         : t == at::kHalf     ? ElementType::kFloat16
         : t == at::kBFloat16 ? ElementType::kBFloat16
                              : ElementType::kFloat64;
}

}  // namespace lldif_kernels::glue

// Where the ATen glue's tensors live and how it registers: CUDA tensors on the GPU (the product), or, in the
// test-only host build of tests/cuda_host (LLDIF_CUDA_HOST), CPU tensors handed to the same kernels running
// under the host emulation, registered as the lldif_cuda_emulated ops.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

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

}  // namespace lldif_kernels::glue

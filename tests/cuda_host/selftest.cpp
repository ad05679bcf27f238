// Kernels with a known answer or a known fault, written as CUDA device code, that test the emulator itself
// (tests/test_cuda_emulator.py): warp shuffles and ballots, barriers, shared memory, a race, and the launch
// and misuse checks.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_host.h>

#include <string>
#include <vector>

#include "../../csrc/cuda/portability.cuh"

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kPerThread = 5;  // ints each thread may write

LLDIF_DYNAMIC_SHARED(selftest_dynamic_shared);

__global__ void shuffles_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int* mine = out + threadIdx.x * kPerThread;
  mine[0] = __shfl_xor_sync(kFull, lane * 10, 3);
  mine[1] = __shfl_down_sync(kFull, lane, 5);      // lanes 27..31 keep their own value
  mine[2] = __shfl_sync(kFull, lane, 7, 8);        // lane 7 of each group of 8
  mine[3] = __shfl_up_sync(kFull, lane, 2, 16);    // lanes 0, 1, 16, 17 keep their own value
  mine[4] = __shfl_xor_sync(kFull, lane, 8, 8);    // a later segment gives the lane's own value
}

__global__ void ballot_kernel(unsigned* out) { out[threadIdx.x] = __ballot_sync(kFull, threadIdx.x % 3 == 0); }

// Tree sum in shared memory: wrong unless every barrier holds.
__global__ void block_sum_kernel(const float* x, float* out) {
  __shared__ float partial[1024];
  partial[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Reads a value another thread writes, without a barrier between: the result depends on the order threads
// run in (dynamic_shared_kernel is the same with the barrier).
__global__ void racy_kernel(int* out) {
  __shared__ int values[64];
  values[threadIdx.x] = static_cast<int>(threadIdx.x) + 1000 * static_cast<int>(cuda_host::launch_count());
  out[threadIdx.x] = values[(threadIdx.x + 1) % blockDim.x];
}

// Each thread writes its index into dynamic shared memory, then reads its neighbour's after a barrier.
__global__ void dynamic_shared_kernel(int* out) {
  int* values = reinterpret_cast<int*>(selftest_dynamic_shared);
  values[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = values[(threadIdx.x + 1) % blockDim.x];
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void exited_barrier_kernel(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void outside_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 20);
}

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x % 32 == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1);
}

__global__ void noop_kernel(int*) {}

// Out-of-bounds accesses that only AddressSanitizer reports (the last thread reads one element too far).
__global__ void shared_overflow_kernel(int* out) {
  __shared__ int values[32];
  values[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = values[threadIdx.x + 1];
}

__global__ void dynamic_shared_overflow_kernel(int* out) {
  int* values = reinterpret_cast<int*>(selftest_dynamic_shared);
  values[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = values[threadIdx.x + 1];
}

__global__ void global_overflow_kernel(int* out) { out[threadIdx.x + 1] = 1; }

std::string last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? "" : cudaGetErrorString(error);
}

// Runs kernel on `threads` x `blocks` with an int per thread; returns (the ints, the launch's error message).
template <typename Kernel>
std::pair<std::vector<int>, std::string> run(Kernel kernel, dim3 grid, dim3 block, size_t dynamic_bytes = 0) {
  std::vector<int> out(static_cast<size_t>(block.x) * grid.x * kPerThread, -1);
  LLDIF_LAUNCH(grid, block, dynamic_bytes, nullptr, kernel)(out.data());
  return {out, last_error()};
}

}  // namespace

void add_selftests(pybind11::module& module) {
  module.def("shuffles", [] { return run(shuffles_kernel, 1, 64).first; });
  module.def("ballot", [] {
    std::vector<unsigned> out(64);
    LLDIF_LAUNCH(1, 64, 0, nullptr, ballot_kernel)(out.data());
    return out;
  });
  module.def("block_sums", [](const std::vector<float>& x, unsigned block) {
    std::vector<float> out(x.size() / block);
    LLDIF_LAUNCH(static_cast<unsigned>(out.size()), block, 0, nullptr, block_sum_kernel)(x.data(), out.data());
    return std::make_pair(out, last_error());
  });
  module.def("racy", [] { return run(racy_kernel, 1, 64).first; });
  module.def("dynamic_shared", [](unsigned threads) {
    return run(dynamic_shared_kernel, 1, threads, threads * sizeof(int));
  });
  // The launch's error message for a misuse or an invalid configuration.
  module.def("launch_error", [](const std::string& what) -> std::string {
    if (what == "divergent_barrier") return run(divergent_barrier_kernel, 1, 64).second;
    if (what == "exited_barrier") return run(exited_barrier_kernel, 1, 64).second;
    if (what == "outside_mask") return run(outside_mask_kernel, 1, 32).second;
    if (what == "exited_lane") return run(exited_lane_kernel, 1, 32).second;
    if (what == "block_1025") return run(noop_kernel, 1, 1025).second;
    if (what == "grid_y_65536") return run(noop_kernel, dim3(1, 65536), 32).second;
    if (what == "dynamic_49k") return run(noop_kernel, 1, 32, 49 * 1024).second;
    if (what == "optin_exceeded") {
      cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024);
      return last_error();
    }
    if (what == "optin_granted") {
      cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
      const std::string error = run(noop_kernel, 1, 32, 100 * 1024).second;
      cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024);
      return error;
    }
    throw std::invalid_argument("unknown case " + what);
  });
  // An out-of-bounds access by 32 threads: of a __shared__ array, of the dynamic shared memory, or of a heap
  // buffer (as a tensor is). Undefined without ASan; tests call it only in the ASan build.
  module.def("overflow", [](const std::string& where) {
    std::vector<int> out(32);
    if (where == "shared") {
      LLDIF_LAUNCH(1, 32, 0, nullptr, shared_overflow_kernel)(out.data());
    } else if (where == "dynamic_shared") {
      LLDIF_LAUNCH(1, 32, 32 * sizeof(int), nullptr, dynamic_shared_overflow_kernel)(out.data());
    } else if (where == "global") {
      LLDIF_LAUNCH(1, 32, 0, nullptr, global_overflow_kernel)(out.data());
    } else {
      throw std::invalid_argument("unknown case " + where);
    }
  });
}

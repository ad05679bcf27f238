// Host emulation of the CUDA execution model, so that csrc/cuda/*.cu runs unchanged on the CPU in the tests
// (README.md next to this folder). A launch runs its blocks one after another; a block's threads are fibers
// on one OS thread that switch only at __syncthreads, __syncwarp and the warp shuffles, so those are real
// barriers, and `__shared__` (a static local) is one array for the whole block. The scheduler runs the
// threads that are ready in ascending order, or in a seeded random order (set_schedule), which is how the
// tests find races: results that depend on that order.
//
// The device is an H100 (SXM): 132 SMs, 48 KB of shared memory per block by default and 227 KB opt-in.
// Launch limits are checked as the driver checks them and reported through cudaGetLastError with a message
// (cudaGetErrorString) that names the kernel; so are misuses the hardware would leave undefined (a barrier
// that not every thread reaches, a shuffle that reads a lane outside its mask, a deadlock).
#pragma once

#include <math.h>  // the float overloads (exp(float), fmax(float, float), ...) that device code sees

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// Qualifiers: the host compiler sees ordinary functions and, for __shared__, one static array per kernel
// instantiation (blocks run one after another, so it is per block).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

// The built-in variables, set by the scheduler before it switches to a thread.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

// Runtime API: the subset the kernels and their glue call.
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;  // static shared memory: invisible to the emulator, always 0 (README)
  size_t constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion, cacheModeCA;
  int maxDynamicSharedSizeBytes;
};

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);

namespace cuda_host {

// Dynamic shared memory of the running block: a fresh allocation of exactly the launch's size, filled with
// 0xff bytes (NaN) so that a read before any write shows in the results and ASan sees reads past its end.
extern unsigned char* dynamic_shared;

// Run the ready threads in ascending order (seed 0) or in an order drawn from seed.
void set_schedule(uint64_t seed);
// The device's opt-in shared-memory limit per block (default 227 KB), so tests can reach the kernels'
// fall-backs for large tables.
void set_shared_memory_optin(int bytes);
int shared_memory_optin();
// Launches run since the process started, and the kernels they ran (addresses in this library, whose load
// address is library_base()).
uint64_t launch_count();
std::vector<uintptr_t> launched_kernels();
uintptr_t library_base();

namespace detail {

cudaError_t function_attributes(const void* kernel, cudaFuncAttributes* attributes);
cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attribute, int value);
// Records a launch that did not run; cudaGetLastError returns `error`, cudaGetErrorString the message.
void fail_launch(cudaError_t error, const char* kernel, const char* message);
// Checks the launch configuration against the device's limits and the kernel's attributes; runs body in every
// thread of every block, or records why not.
void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_bytes,
              void (*body)(void*), void* context);

// One warp-wide exchange: deposits this lane's value, waits until every lane of `mask` has deposited, and
// returns the 32 values (valid until exchange_done).
const uint64_t* exchange(unsigned mask, uint64_t value);
void exchange_done(unsigned mask);
// Ends the launch with a kernel misuse (cudaErrorLaunchFailure); does not return to the kernel.
[[noreturn]] void kernel_fault(const char* message);
unsigned lane_id();

// The value of lane `from` (0..31, chosen by the caller as its primitive defines) among the lanes of mask.
template <typename T>
T shuffle(unsigned mask, T value, unsigned from, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) kernel_fault("shuffle width is not a power of 2 <= 32");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const uint64_t* values = exchange(mask, bits);
  if (!((mask >> from) & 1u)) kernel_fault("a shuffle reads a lane outside its mask (undefined on the GPU)");
  T result;
  std::memcpy(&result, &values[from], sizeof(T));
  exchange_done(mask);
  return result;
}

}  // namespace detail

// kernel<<<grid, block, dynamic_bytes, stream>>>(args...): the arguments are converted to the kernel's
// parameter types once, as a launch copies them, and every thread calls the kernel with them.
template <typename... Params>
class Launch {
 public:
  Launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_bytes = 0,
         cudaStream_t = nullptr)
      : name_(name), kernel_(kernel), grid_(grid), block_(block), dynamic_bytes_(dynamic_bytes) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "a kernel launch passes every parameter");
    Call call{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    detail::run_grid(name_, reinterpret_cast<const void*>(kernel_), grid_, block_, dynamic_bytes_, &Call::run,
                     &call);
  }

 private:
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
    static void run(void* self) {
      const Call& call = *static_cast<const Call*>(self);
      std::apply(call.kernel, call.params);
    }
  };

  const char* name_;
  void (*kernel_)(Params...);
  dim3 grid_, block_;
  size_t dynamic_bytes_;
};

}  // namespace cuda_host

template <typename... Params>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, void (*kernel)(Params...)) {
  return cuda_host::detail::function_attributes(reinterpret_cast<const void*>(kernel), attributes);
}
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute, int value) {
  return cuda_host::detail::set_function_attribute(reinterpret_cast<const void*>(kernel), attribute, value);
}

// Block and warp synchronisation.
void __syncthreads();
void __syncwarp(unsigned mask = 0xffffffffu);

// The source lanes as the CUDA programming guide defines them for a warp split into segments of `width` lanes.
template <typename T>
inline T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32) {
  const unsigned segment = cuda_host::detail::lane_id() & ~static_cast<unsigned>(width - 1);
  return cuda_host::detail::shuffle(mask, value, segment + (static_cast<unsigned>(source_lane) & (width - 1)), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  // A source in a later segment leaves the lane's own value; earlier segments can be read.
  const unsigned lane = cuda_host::detail::lane_id();
  const unsigned source = (lane ^ static_cast<unsigned>(lane_mask)) & 31u;
  return cuda_host::detail::shuffle(mask, value, source > (lane | (width - 1)) ? lane : source, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  // A source past the end of the segment leaves the lane's own value.
  const unsigned lane = cuda_host::detail::lane_id();
  const bool inside = (lane & (width - 1)) + delta < static_cast<unsigned>(width);
  return cuda_host::detail::shuffle(mask, value, inside ? lane + delta : lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const unsigned lane = cuda_host::detail::lane_id();
  return cuda_host::detail::shuffle(mask, value, (lane & (width - 1)) >= delta ? lane - delta : lane, width);
}
unsigned __ballot_sync(unsigned mask, int predicate);

// Math intrinsics: their host equivalents. The fast-math forms are computed exactly here, which their
// documented error bounds allow; the tests compare against float64 within those bounds.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Half and bfloat16: storage types; conversions round to nearest even, as the _rn intrinsics do.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, sizeof f);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, sizeof f);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (std::isnan(x)) return {static_cast<uint16_t>((bits >> 16) | 0x40u)};  // stays a (quiet) NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return {static_cast<uint16_t>(bits >> 16)};
}

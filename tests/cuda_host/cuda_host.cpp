// The scheduler behind cuda_host.h: blocks one after another, a block's threads as fibers that switch at
// barriers, launch checks as the driver makes them, and the runtime API's error state.

#include "cuda_host.h"

#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define LLDIF_ASAN 1
#else
#define LLDIF_ASAN 0
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

#if !defined(__x86_64__)
#error "the CUDA host emulation switches fibers with x86-64 code"
#endif

// Saves the callee-saved registers and the floating-point control words of the running fiber on its stack,
// stores its stack pointer in *from and resumes the fiber whose stack pointer is `to`. (swapcontext would
// also save the signal mask with a system call, and under ASan clear the whole new stack's shadow, which made
// the sanitised tests ten times slower.)
extern "C" void cuda_host_switch_stack(void** from, void* to);
asm(R"(
  .text
  .p2align 4
  .globl cuda_host_switch_stack
  .hidden cuda_host_switch_stack
  .type cuda_host_switch_stack, @function
cuda_host_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_host_switch_stack, .-cuda_host_switch_stack
)");

namespace cuda_host {

unsigned char* dynamic_shared = nullptr;

namespace {

// An H100 SXM.
constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockZ = 64;
constexpr unsigned kMaxGridX = 2147483647u;
constexpr unsigned kMaxGridYZ = 65535;
constexpr int kDefaultSharedBytes = 48 * 1024;
constexpr int kOptinSharedBytes = 227 * 1024;
constexpr int kMultiProcessors = 132;
// Fiber stacks: mapped once and reused, committed by the kernel only as far as they are touched.
constexpr size_t kStackBytes = 512 * 1024;

enum class Wait { kRunning, kBlockBarrier, kWarp, kExited };

struct Thread {
  void* stack_pointer = nullptr;  // while switched out
  char* stack = nullptr;
  uint3 index;
  Wait wait = Wait::kExited;
  unsigned mask = 0;  // kWarp: the lanes it waits with
};

struct Runtime {
  uint64_t seed = 0;
  int optin = kOptinSharedBytes;
  uint64_t launches = 0;
  std::unordered_set<const void*> kernels;
  cudaError_t last_error = cudaSuccess;
  std::string message;  // of the most recent error, for cudaGetErrorString
  std::unordered_map<const void*, int> max_dynamic_shared;

  // The running block.
  std::vector<Thread> threads;
  size_t block_threads = 0;
  Thread* current = nullptr;
  void* scheduler_stack_pointer = nullptr;
  void (*body)(void*) = nullptr;
  void* body_context = nullptr;
  std::string fault;  // set when a thread misused the execution model: the launch ends
  uint64_t exchange_slots[kMaxThreadsPerBlock / kWarpSize][kWarpSize];
#if LLDIF_ASAN
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

Runtime& runtime() {
  static Runtime r;
  return r;
}

const char* error_name(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

void record_error(cudaError_t error, const std::string& message) {
  Runtime& r = runtime();
  r.last_error = error;
  r.message = std::string(error_name(error)) + ": " + message;
}

// Switches from the running thread to the scheduler; `exiting` lets ASan drop the thread's fake stack.
void to_scheduler(bool exiting) {
  Runtime& r = runtime();
  Thread* self = r.current;
#if LLDIF_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake_stack, r.scheduler_stack, r.scheduler_stack_size);
  cuda_host_switch_stack(&self->stack_pointer, r.scheduler_stack_pointer);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)exiting;
  cuda_host_switch_stack(&self->stack_pointer, r.scheduler_stack_pointer);
#endif
}

[[noreturn]] void thread_main() {
  Runtime& r = runtime();
#if LLDIF_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack, &r.scheduler_stack_size);
#endif
  r.body(r.body_context);
  r.current->wait = Wait::kExited;
  to_scheduler(true);
  __builtin_unreachable();  // the scheduler never resumes an exited thread
}

// A new fiber's stack, as cuda_host_switch_stack leaves a switched-out one: control words, six callee-saved
// registers, then thread_main as the return address, entered with the stack aligned as after a call.
void* fresh_stack(char* stack) {
  auto* top = reinterpret_cast<uint64_t*>(stack + kStackBytes);  // 16-byte aligned (mmap)
  uint64_t* sp = top - 10;
  sp[0] = 0x037f;                                          // x87 control word: the default
  sp[1] = 0x1f80;                                          // MXCSR: the default (round to nearest, no FTZ)
  std::fill(sp + 2, sp + 8, 0);                            // r15, r14, r13, r12, rbx, rbp
  sp[8] = reinterpret_cast<uint64_t>(&thread_main);        // the return address of the first switch
  sp[9] = 0;                                               // thread_main's own (never used) return address
  return sp;
}

void to_thread(Thread& t) {
  Runtime& r = runtime();
  r.current = &t;
  threadIdx = t.index;
#if LLDIF_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, t.stack, kStackBytes);
  cuda_host_switch_stack(&r.scheduler_stack_pointer, t.stack_pointer);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  cuda_host_switch_stack(&r.scheduler_stack_pointer, t.stack_pointer);
#endif
  r.current = nullptr;
}

void wait_here(Wait kind, unsigned mask = 0) {
  Thread& self = *runtime().current;
  self.wait = kind;
  self.mask = mask;
  to_scheduler(false);
}

std::string describe_thread(const Thread& t) {
  return "thread (" + std::to_string(t.index.x) + ", " + std::to_string(t.index.y) + ", " +
         std::to_string(t.index.z) + ")";
}

// Releases the lanes of every warp-level wait whose whole mask has arrived; returns whether any were.
bool release_warps() {
  Runtime& r = runtime();
  bool released = false;
  for (size_t first = 0; first < r.block_threads; first += kWarpSize) {
    for (size_t lane = 0; lane < kWarpSize && first + lane < r.block_threads; ++lane) {
      const Thread& t = r.threads[first + lane];
      if (t.wait != Wait::kWarp) continue;
      bool ready = true;
      for (unsigned other = 0; other < kWarpSize; ++other) {
        if (!((t.mask >> other) & 1u)) continue;
        if (first + other >= r.block_threads) {
          r.fault = describe_thread(t) + " names lane " + std::to_string(other) + " in its mask, which does not exist";
          return false;
        }
        const Thread& u = r.threads[first + other];
        if (u.wait == Wait::kExited) {
          r.fault = describe_thread(t) + " waits in a warp primitive for lane " + std::to_string(other) +
                    ", which has exited";
          return false;
        }
        ready = ready && u.wait == Wait::kWarp && u.mask == t.mask;
      }
      if (!ready) continue;
      for (unsigned other = 0; other < kWarpSize; ++other) {
        if ((t.mask >> other) & 1u) r.threads[first + other].wait = Wait::kRunning;
      }
      released = true;
    }
  }
  return released;
}

// Releases a __syncthreads that every thread has reached; returns whether it did. Sets a fault when the
// block can make no progress.
bool release_block_barrier() {
  Runtime& r = runtime();
  // Like the hardware, the barrier counts arrivals, not call sites (the host compiler may also duplicate a call
  // into two branches); a barrier in divergent code shows as threads that exit while others wait.
  size_t at_barrier = 0, exited = 0;
  for (size_t i = 0; i < r.block_threads; ++i) {
    at_barrier += r.threads[i].wait == Wait::kBlockBarrier;
    exited += r.threads[i].wait == Wait::kExited;
  }
  if (exited == r.block_threads) return false;
  if (at_barrier + exited < r.block_threads) {
    r.fault = "deadlock: " + std::to_string(r.block_threads - at_barrier - exited) +
              " threads wait in warp primitives whose lanes never all arrive";
    return false;
  }
  if (exited > 0) {
    r.fault = "__syncthreads is reached by " + std::to_string(at_barrier) + " threads while " +
              std::to_string(exited) + " have exited (undefined on the GPU)";
    return false;
  }
  for (size_t i = 0; i < r.block_threads; ++i) r.threads[i].wait = Wait::kRunning;
  return true;
}

void prepare_threads(dim3 block) {
  Runtime& r = runtime();
  r.block_threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (r.threads.size() < r.block_threads) r.threads.resize(r.block_threads);
  for (size_t i = 0; i < r.block_threads; ++i) {
    Thread& t = r.threads[i];
    if (t.stack == nullptr) {
      void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                         -1, 0);
      if (stack == MAP_FAILED) throw std::bad_alloc();
      t.stack = static_cast<char*>(stack);
    }
    t.index = {static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
               static_cast<unsigned>(i / (static_cast<size_t>(block.x) * block.y))};
  }
}

// Runs one block to completion; false (with r.fault set) when a thread misused the execution model.
bool run_block(std::mt19937_64* shuffle) {
  Runtime& r = runtime();
  for (size_t i = 0; i < r.block_threads; ++i) {
    Thread& t = r.threads[i];
    t.stack_pointer = fresh_stack(t.stack);
    t.wait = Wait::kRunning;
  }
  std::vector<size_t> order;
  for (;;) {
    order.clear();
    for (size_t i = 0; i < r.block_threads; ++i) {
      if (r.threads[i].wait == Wait::kRunning) order.push_back(i);
    }
    if (shuffle != nullptr) std::shuffle(order.begin(), order.end(), *shuffle);
    for (size_t i : order) {
      to_thread(r.threads[i]);
      if (!r.fault.empty()) return false;
    }
    if (release_warps()) continue;
    if (!r.fault.empty()) return false;
    if (release_block_barrier()) continue;
    return r.fault.empty();
  }
}

// The driver's verdict on a launch configuration: cudaSuccess, or the error and why.
std::pair<cudaError_t, std::string> check_configuration(dim3 grid, dim3 block, size_t dynamic_bytes,
                                                        int max_dynamic) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const auto invalid = [](std::string why) { return std::make_pair(cudaErrorInvalidConfiguration, why); };
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > kMaxBlockZ) {
    return invalid("block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                   std::to_string(block.z) + ") has " + std::to_string(threads) +
                   " threads; a block takes 1 to 1024 (z <= 64)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return invalid("the grid is empty");
  if (grid.x > kMaxGridX) return invalid("grid.x = " + std::to_string(grid.x) + " exceeds 2^31 - 1");
  if (grid.y > kMaxGridYZ) return invalid("grid.y = " + std::to_string(grid.y) + " exceeds 65535");
  if (grid.z > kMaxGridYZ) return invalid("grid.z = " + std::to_string(grid.z) + " exceeds 65535");
  if (dynamic_bytes > static_cast<size_t>(max_dynamic)) {
    return {cudaErrorInvalidValue, std::to_string(dynamic_bytes) +
                                       " bytes of dynamic shared memory exceed the kernel's limit of " +
                                       std::to_string(max_dynamic) + " (cudaFuncAttributeMaxDynamicSharedMemorySize)"};
  }
  return {cudaSuccess, ""};
}

int max_dynamic_shared_of(const void* kernel) {
  const auto& limits = runtime().max_dynamic_shared;
  const auto found = limits.find(kernel);
  return found == limits.end() ? kDefaultSharedBytes : found->second;
}

}  // namespace

void set_schedule(uint64_t seed) { runtime().seed = seed; }
void set_shared_memory_optin(int bytes) { runtime().optin = bytes; }
int shared_memory_optin() { return runtime().optin; }
uint64_t launch_count() { return runtime().launches; }

std::vector<uintptr_t> launched_kernels() {
  std::vector<uintptr_t> addresses;
  for (const void* kernel : runtime().kernels) addresses.push_back(reinterpret_cast<uintptr_t>(kernel));
  return addresses;
}

uintptr_t library_base() {
  Dl_info info{};
  return dladdr(reinterpret_cast<const void*>(&launch_count), &info) != 0
             ? reinterpret_cast<uintptr_t>(info.dli_fbase)
             : 0;
}

namespace detail {

cudaError_t function_attributes(const void* kernel, cudaFuncAttributes* attributes) {
  if (attributes == nullptr || kernel == nullptr) return cudaErrorInvalidValue;
  *attributes = {};
  attributes->maxThreadsPerBlock = static_cast<int>(kMaxThreadsPerBlock);
  attributes->maxDynamicSharedSizeBytes = max_dynamic_shared_of(kernel);
  return cudaSuccess;
}

cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attribute, int value) {
  Runtime& r = runtime();
  if (kernel == nullptr || attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > r.optin) {
    record_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                            " bytes of dynamic shared memory exceed the device's opt-in limit of " +
                                            std::to_string(r.optin));
    return cudaErrorInvalidValue;
  }
  r.max_dynamic_shared[kernel] = value;
  return cudaSuccess;
}

void fail_launch(cudaError_t error, const char* kernel, const char* message) {
  record_error(error, std::string("kernel ") + kernel + ": " + message);
}

void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_bytes,
              void (*body)(void*), void* context) {
  Runtime& r = runtime();
  const auto [error, invalid] = check_configuration(grid, block, dynamic_bytes, max_dynamic_shared_of(kernel));
  if (error != cudaSuccess) {
    fail_launch(error, name, invalid.c_str());
    return;
  }
  ++r.launches;
  r.kernels.insert(kernel);
  std::mt19937_64 generator(r.seed ^ (r.launches * 0x9e3779b97f4a7c15ull));
  gridDim = grid;
  blockDim = block;
  r.body = body;
  r.body_context = context;
  r.fault.clear();
  prepare_threads(block);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        // A fresh allocation per block: stale values from the previous block cannot hide a missing write.
        // (One byte when none was asked for: a valid pointer, whose misuse ASan reports.)
        std::vector<unsigned char> block_shared(std::max<size_t>(dynamic_bytes, 1), 0xff);
        dynamic_shared = block_shared.data();
        if (!run_block(r.seed != 0 ? &generator : nullptr)) {
          const std::string where = "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                                    std::to_string(z) + "): " + r.fault;
          fail_launch(cudaErrorLaunchFailure, name, where.c_str());
#if LLDIF_ASAN
          // Abandoned threads leave their frames' poison behind; the stacks are reused.
          for (Thread& t : r.threads) {
            if (t.stack != nullptr) ASAN_UNPOISON_MEMORY_REGION(t.stack, kStackBytes);
          }
#endif
          dynamic_shared = nullptr;
          return;
        }
      }
    }
  }
  dynamic_shared = nullptr;
}

const uint64_t* exchange(unsigned mask, uint64_t value) {
  Runtime& r = runtime();
  const unsigned lane = lane_id();
  if (!((mask >> lane) & 1u)) kernel_fault("a warp primitive is called by a lane outside its mask");
  const size_t warp = (r.current - r.threads.data()) / kWarpSize;
  r.exchange_slots[warp][lane] = value;
  wait_here(Wait::kWarp, mask);
  return r.exchange_slots[warp];
}

void exchange_done(unsigned mask) {
  // A second meeting, so that no lane overwrites its slot before every lane has read.
  wait_here(Wait::kWarp, mask);
}

void kernel_fault(const char* message) {
  Runtime& r = runtime();
  r.fault = describe_thread(*r.current) + ": " + message;
  r.current->wait = Wait::kExited;
  to_scheduler(true);
  __builtin_unreachable();  // the scheduler never resumes a faulted thread
}

unsigned lane_id() {
  const Runtime& r = runtime();
  return static_cast<unsigned>((r.current - r.threads.data()) % kWarpSize);
}

}  // namespace detail
}  // namespace cuda_host

cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return cudaErrorInvalidValue;
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (value == nullptr || device != 0) return cudaErrorInvalidValue;
  switch (attribute) {
    case cudaDevAttrMaxThreadsPerBlock: *value = static_cast<int>(cuda_host::kMaxThreadsPerBlock); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = cuda_host::kDefaultSharedBytes; break;
    case cudaDevAttrMultiProcessorCount: *value = cuda_host::kMultiProcessors; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = cuda_host::shared_memory_optin(); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  cuda_host::Runtime& r = cuda_host::runtime();
  const cudaError_t error = r.last_error;
  r.last_error = cudaSuccess;
  return error;
}

cudaError_t cudaPeekAtLastError() { return cuda_host::runtime().last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  const cuda_host::Runtime& r = cuda_host::runtime();
  // The message of the most recent error of this kind names the kernel and what failed.
  if (error != cudaSuccess && r.message.rfind(cuda_host::error_name(error), 0) == 0) return r.message.c_str();
  return cuda_host::error_name(error);
}

void __syncthreads() { cuda_host::wait_here(cuda_host::Wait::kBlockBarrier); }

void __syncwarp(unsigned mask) {
  if (!((mask >> cuda_host::detail::lane_id()) & 1u)) {
    cuda_host::detail::kernel_fault("__syncwarp is called by a lane outside its mask");
  }
  cuda_host::wait_here(cuda_host::Wait::kWarp, mask);
}

unsigned __ballot_sync(unsigned mask, int predicate) {
  const uint64_t* votes = cuda_host::detail::exchange(mask, predicate != 0);
  unsigned ballot = 0;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (((mask >> lane) & 1u) && votes[lane] != 0) ballot |= 1u << lane;
  }
  cuda_host::detail::exchange_done(mask);
  return ballot;
}

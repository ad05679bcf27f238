// The two things the kernels write differently for the GPU (nvcc) and for the host emulation that runs this
// same source on the CPU in the tests (tests/cuda_host, compiled with LLDIF_CUDA_HOST): a kernel launch and
// the declaration of dynamic shared memory. nvcc sees exactly the CUDA syntax.
#pragma once

#ifdef LLDIF_CUDA_HOST
#include <cuda_host.h>
// LLDIF_LAUNCH(grid, block, dynamic_bytes, stream, kernel)(args...)
#define LLDIF_LAUNCH(grid, block, dynamic_bytes, stream, ...) \
  ::cuda_host::Launch(#__VA_ARGS__, __VA_ARGS__, grid, block, dynamic_bytes, stream)
#define LLDIF_DYNAMIC_SHARED(name) unsigned char* const& name = ::cuda_host::dynamic_shared
#else
#define LLDIF_LAUNCH(grid, block, dynamic_bytes, stream, ...) __VA_ARGS__<<<grid, block, dynamic_bytes, stream>>>
#define LLDIF_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// The launchers of modulated_layer_norm (EPD-modulated LayerNorm), declared once for the ATen glue that calls
// them and the torch-free .cu file that defines them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "element_type.h"

namespace lldif_kernels {

int64_t modulated_layer_norm_position_tiles(int64_t positions);
cudaError_t modulated_layer_norm_fwd_cuda(ElementType dtype, const void* x, const void* a, const void* e,
                                          void* y, int64_t batch, int64_t channels, int64_t positions,
                                          bool channels_inner, double eps, bool bias_free,
                                          cudaStream_t stream);
cudaError_t modulated_layer_norm_bwd_cuda(ElementType dtype, const void* dy, const void* x, const void* a,
                                          void* dx, void* da_partials, void* de_partials, int64_t batch,
                                          int64_t channels, int64_t positions, bool channels_inner,
                                          double eps, bool bias_free, cudaStream_t stream);

}  // namespace lldif_kernels

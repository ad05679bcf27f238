// The launchers of channel_attention (DMNet transposed attention), declared once for the ATen glue that calls
// them and the torch-free .cu file that defines them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "element_type.h"

namespace lldif_kernels {

// Element strides of a (B, heads, d, N) tensor whose position stride is 1.
struct ChaStrides {
  int64_t batch, head, dim;
};

struct ChaShape {
  int64_t batch, heads, dim, positions;
  ChaStrides inputs;  // shared by q, k and v
};

int64_t channel_attention_splits(int64_t batch, int64_t heads, int64_t positions);
int64_t channel_attention_max_dim();
int64_t channel_attention_position_tiles(ElementType dtype, int64_t positions);
cudaError_t channel_attention_fwd_cuda(ElementType dtype, const ChaShape& shape, const void* q, const void* k,
                                       const void* v, const void* temperature, void* out, void* cosine,
                                       void* q_norm, void* k_norm, void* gram_partials, void* sq_partials,
                                       void* sk_partials, void* probs, double eps, cudaStream_t stream);
cudaError_t channel_attention_bwd_cuda(ElementType dtype, const ChaShape& shape, const void* dout, const void* q,
                                       const void* k, const void* v, const void* temperature, const void* cosine,
                                       const void* q_norm, const void* k_norm, void* dq, void* dk, void* dv,
                                       const ChaStrides& grads, void* dtemperature, void* dp_partials, void* coef,
                                       void* diag, double eps, cudaStream_t stream);

}  // namespace lldif_kernels

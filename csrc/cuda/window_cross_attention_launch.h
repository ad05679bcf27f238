// The launchers of window_cross_attention (DLNet window cross-attention), declared once for the ATen glue that calls
// them and the torch-free .cu file that defines them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "element_type.h"

namespace lldif_kernels {

// Element strides of a (windows, heads, M, d) tensor whose channel stride is 1.
struct WcaStrides {
  int64_t window, head, token;
};

struct WcaShape {
  int64_t windows, query_windows, heads, tokens, dim, window_size;
  WcaStrides q, k, v;
};

int64_t window_cross_attention_max_dim();
int64_t window_cross_attention_row_tiles(ElementType dtype, int64_t dim, int64_t tokens);
int64_t window_cross_attention_workspace_elems(ElementType dtype, const WcaShape& shape);
cudaError_t window_cross_attention_fwd_cuda(ElementType dtype, const WcaShape& shape, const void* q, const void* k,
                                            const void* v, const void* table, void* out, void* lse, double scale,
                                            cudaStream_t stream);
cudaError_t window_cross_attention_bwd_cuda(ElementType dtype, const WcaShape& shape, const void* dout, const void* q,
                                            const void* k, const void* v, const void* table, const void* out,
                                            const void* lse, void* dq, void* dk, void* dv, void* dtable,
                                            void* workspace, double scale, cudaStream_t stream);

}  // namespace lldif_kernels

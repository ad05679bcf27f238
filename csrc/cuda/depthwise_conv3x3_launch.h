// The launchers of depthwise_conv3x3 (3x3 depth-wise convolution with an optional GELU gate), declared once
// for the ATen glue that calls them and the torch-free .cu file that defines them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "element_type.h"

namespace lldif_kernels {

// x is (batch, channels, height, width), planar or channels-inner; gate halves the output's channels.
struct DwcShape {
  int64_t batch, channels, height, width;
  bool channels_inner, gate;
};

// The largest C, H and W the kernels take (they index channels, rows and columns with int).
int64_t depthwise_conv3x3_max_extent();
// Blocks of the (one-dimensional) grid of the forward or backward launch; the kernels need at most INT32_MAX.
int64_t depthwise_conv3x3_blocks(ElementType dtype, const DwcShape& shape, bool backward);
// Spatial tiles of the backward: the second dimension of its (B, tiles, 10, C) partial buffer.
int64_t depthwise_conv3x3_bwd_tiles(ElementType dtype, const DwcShape& shape);
cudaError_t depthwise_conv3x3_fwd_cuda(ElementType dtype, const DwcShape& shape, const void* x, const void* weight,
                                       const void* bias, void* out, cudaStream_t stream);
cudaError_t depthwise_conv3x3_bwd_cuda(ElementType dtype, const DwcShape& shape, const void* dy, const void* x,
                                       const void* weight, const void* bias, void* dx, void* partials,
                                       cudaStream_t stream);

}  // namespace lldif_kernels

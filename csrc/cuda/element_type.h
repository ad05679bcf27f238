// The element type of an op's tensors as it crosses from the ATen glue (.cpp) into the torch-free .cu files.
#pragma once

namespace lldif_kernels {

enum class ElementType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace lldif_kernels

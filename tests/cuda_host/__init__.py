"""Host emulation of the CUDA execution model: csrc/cuda's kernels, unchanged, on CPU tensors (README.md)."""

// The test-only extension's own parts: the lldif_cuda_emulated ops, with the schemas of lldif_native (their
// kernels are csrc/cuda's glue, compiled with LLDIF_CUDA_HOST), and the emulator's settings for Python.

#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cuda_host.h>

#include "../../csrc/common/channel_attention.h"
#include "../../csrc/common/depthwise_conv3x3.h"
#include "../../csrc/common/modulated_layer_norm.h"
#include "../../csrc/common/window_cross_attention.h"

TORCH_LIBRARY(lldif_cuda_emulated, m) {
  m.def(lldif_kernels::cha::kForwardSchema);
  m.def(lldif_kernels::cha::kBackwardSchema);
  m.def(lldif_kernels::dwc::kForwardSchema);
  m.def(lldif_kernels::dwc::kBackwardSchema);
  m.def(lldif_kernels::mln::kForwardSchema);
  m.def(lldif_kernels::mln::kBackwardSchema);
  m.def(lldif_kernels::wca::kForwardSchema);
  m.def(lldif_kernels::wca::kBackwardSchema);
}

void add_selftests(pybind11::module& module);  // selftest.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "csrc/cuda's kernels on CPU tensors under the host emulation of the CUDA execution model";
  module.def("set_schedule", &cuda_host::set_schedule, pybind11::arg("seed"),
             "0: ready threads run in ascending order; else in an order drawn from the seed");
  module.def("set_shared_memory_optin", &cuda_host::set_shared_memory_optin, pybind11::arg("bytes"),
             "the emulated device's opt-in shared memory per block (an H100's 227 KB by default)");
  module.def("shared_memory_optin", &cuda_host::shared_memory_optin);
  module.def("launch_count", &cuda_host::launch_count, "kernel launches run since the process started");
  module.def("launched_kernels", &cuda_host::launched_kernels, "addresses of the kernels launched so far");
  module.def("library_base", &cuda_host::library_base, "the load address of this library");
  add_selftests(module);
}

// The Python module `lldif_kernels._C_cuda`: importing it (after `_C`, which defines the schemas) loads
// this library, whose static initialisers register the CUDA implementations (TORCH_LIBRARY_IMPL).
#include <Python.h>

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "lldif CUDA kernels", -1, nullptr};
  return PyModule_Create(&module);
}

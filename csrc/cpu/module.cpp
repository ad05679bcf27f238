// The Python module `lldif_kernels._C`: importing it loads this library, whose static initialisers
// register the CPU ops (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the op files).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lldif CPU kernels", -1, nullptr};
  return PyModule_Create(&module);
}

// The Python module fasterrcnn_ext._C. It has no functions: importing it loads the shared library, whose static
// initializers register every op under torch.ops.fasterrcnn_ext. Built against the stable (limited) Python API.
//
// The same file is the op library of C++ programs (LibTorch, AOTInductor runners, Triton's libtorch backend), which
// load it with dlopen or torch::jit's load of a library and have no Python: its one Python symbol, the
// PyModule_Create2 that PyInit__C calls, is a weak reference, so the loader resolves it to the interpreter's in a
// Python process and to null elsewhere instead of refusing the library. Nothing else here may reference Python
// (tests/test_library.py checks the library's undefined symbols).
#include <Python.h>

#pragma weak PyModule_Create2

// PyMODINIT_FUNC exports the symbol even though the library is built with -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "fasterrcnn_ext kernels; the ops are under torch.ops.fasterrcnn_ext",
      -1,    // size
      nullptr,
  };
  return PyModule_Create(&module_def);
}

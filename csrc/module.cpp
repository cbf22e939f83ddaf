// The Python module fasterrcnn_ext._C. It has no functions: importing it loads the shared library, whose static
// initializers register every op under torch.ops.fasterrcnn_ext. Built against the stable (limited) Python API.
#include <Python.h>

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

// Python module stub: `import ntksap_fast._C` loads this shared library, whose static
// initialisers register the ntksap_fast ops (TORCH_LIBRARY in masked_topk.cpp, the fragment in
// philox.cpp, and the CUDA kernels when built with CUDA). The module itself defines nothing; the
// ops live under torch.ops.ntksap_fast. Only setup.py compiles this file: the just-in-time build
// and CMake make a plain shared library (torch.ops.load_library) without it.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                         // m_name
      "ntksap_fast compiled ops (torch.ops.ntksap_fast)",  // m_doc
      -1,                                           // m_size
      nullptr,                                      // m_methods
  };
  return PyModule_Create(&module_def);
}
}

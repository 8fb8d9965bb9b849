// Python bindings of fmcomm._C. Thin by design: argument checks live in Python
// (fmcomm/kernels.py), which passes raw addresses of buffers it has already checked.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/reduce.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fmcomm native kernels";
  m.def(
      "reduce",
      [](std::uintptr_t dst, std::uintptr_t a, std::uintptr_t b, std::size_t count, int dtype, int op) {
        if (dtype < 0 || dtype > 5) throw py::value_error("fmcomm._C.reduce: unknown dtype code");
        if (op < 0 || op > 4) throw py::value_error("fmcomm._C.reduce: unknown op code");
        bool ok;
        {
          py::gil_scoped_release release;
          ok = fmcomm::reduce(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(a),
                              reinterpret_cast<const void*>(b), count, static_cast<fmcomm::DType>(dtype),
                              static_cast<fmcomm::RedOp>(op));
        }
        return ok;
      },
      "dst[i] = a[i] op b[i] over count elements at raw addresses; False if this build lacks the dtype",
      py::arg("dst"), py::arg("a"), py::arg("b"), py::arg("count"), py::arg("dtype"), py::arg("op"));
  m.def("has_float16", &fmcomm::has_float16);
}

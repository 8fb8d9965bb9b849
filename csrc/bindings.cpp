// Python bindings of fmcomm._C. Thin by design: argument checks live in Python
// (fmcomm/kernels.py, fmcomm/compression/kernels.py), which passes raw addresses of buffers
// it has already checked. Every kernel runs with the GIL released.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/compress.h"
#include "cpu/reduce.h"

namespace py = pybind11;

namespace {

template <typename T>
T* at(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

fmcomm::Fp8Format fp8_format(int fmt) {
  if (fmt != 0 && fmt != 1) throw py::value_error("fmcomm._C: unknown fp8 format code");
  return static_cast<fmcomm::Fp8Format>(fmt);
}

}  // namespace

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

  // Compression kernels (csrc/cpu/compress.h). A residual address of 0 means "no residual".
  m.def(
      "fp8_encode",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t out, std::uintptr_t scale, std::size_t n,
         std::size_t block, int fmt) {
        const fmcomm::Fp8Format format = fp8_format(fmt);
        if (block == 0) throw py::value_error("fmcomm._C.fp8_encode: block must be >= 1");
        py::gil_scoped_release release;
        fmcomm::fp8_encode(at<const float>(x), at<float>(residual), at<uint8_t>(out), at<const float>(scale), n,
                           block, format);
      },
      "fp8 codes of (x [+ residual]) * scale[i // block], saturating; updates residual when given",
      py::arg("x"), py::arg("residual"), py::arg("out"), py::arg("scale"), py::arg("n"), py::arg("block"),
      py::arg("fmt"));
  m.def(
      "fp8_decode",
      [](std::uintptr_t q, std::uintptr_t out, std::uintptr_t scale, std::size_t n, std::size_t block, int fmt,
         bool accumulate) {
        const fmcomm::Fp8Format format = fp8_format(fmt);
        if (block == 0) throw py::value_error("fmcomm._C.fp8_decode: block must be >= 1");
        py::gil_scoped_release release;
        fmcomm::fp8_decode(at<const uint8_t>(q), at<float>(out), at<const float>(scale), n, block, format,
                           accumulate);
      },
      "out[i] (+)= fp8 value of q[i] / scale[i // block]", py::arg("q"), py::arg("out"), py::arg("scale"),
      py::arg("n"), py::arg("block"), py::arg("fmt"), py::arg("accumulate"));
  m.def(
      "onebit_encode",
      [](std::uintptr_t x, std::uintptr_t residual, std::uintptr_t out, std::size_t n) {
        py::gil_scoped_release release;
        return fmcomm::onebit_encode(at<const float>(x), at<float>(residual), at<uint8_t>(out), n);
      },
      "sign bits of x [+ residual] (1 = negative, LSB first); returns the mean |c| as a float32 value",
      py::arg("x"), py::arg("residual"), py::arg("out"), py::arg("n"));
  m.def(
      "onebit_decode",
      [](std::uintptr_t bits, std::uintptr_t out, float scale, std::size_t n, bool accumulate) {
        py::gil_scoped_release release;
        fmcomm::onebit_decode(at<const uint8_t>(bits), at<float>(out), scale, n, accumulate);
      },
      "out[i] (+)= -scale if bit i else scale", py::arg("bits"), py::arg("out"), py::arg("scale"), py::arg("n"),
      py::arg("accumulate"));
  m.def(
      "topk_select",
      [](std::uintptr_t x, std::uintptr_t residual, std::size_t n, std::size_t k, std::uintptr_t idx_out,
         std::uintptr_t val_out) {
        if (k > n) throw py::value_error("fmcomm._C.topk_select: k > n");
        if (n > static_cast<std::size_t>(INT32_MAX)) throw py::value_error("fmcomm._C.topk_select: n > INT32_MAX");
        py::gil_scoped_release release;
        fmcomm::topk_select(at<const float>(x), at<float>(residual), n, k, at<int32_t>(idx_out), at<float>(val_out));
      },
      "the k largest |x [+ residual]| (ties: lower index) in index order; residual keeps the rest",
      py::arg("x"), py::arg("residual"), py::arg("n"), py::arg("k"), py::arg("idx_out"), py::arg("val_out"));
  m.def(
      "scatter_add",
      [](std::uintptr_t idx, std::uintptr_t val, std::size_t count, std::uintptr_t out) {
        py::gil_scoped_release release;
        fmcomm::scatter_add(at<const int32_t>(idx), at<const float>(val), count, at<float>(out));
      },
      "out[idx[j]] += val[j] in order (indices already checked)", py::arg("idx"), py::arg("val"), py::arg("count"),
      py::arg("out"));
  m.def("compress_isa", &fmcomm::compress_isa, "which build of the compression loops runs: avx2 or default");
  m.def(
      "set_compress_isa", [](const std::string& name) { return fmcomm::set_compress_isa(name.c_str()); },
      "run the avx2 or the default build of the compression loops (tests); False if unavailable", py::arg("name"));
}

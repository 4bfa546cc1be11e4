// Python bindings of the native engine (spectrum_fast._C). Small surface: policy stays in Python.
#include <pybind11/pybind11.h>

#include <string>

#include "cuda_check.h"

namespace py = pybind11;

namespace {

int device_count() {
  int n = 0;
  spectrum_fast::check_cuda(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  return n;
}

int runtime_version() {
  int v = 0;
  spectrum_fast::check_cuda(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "spectrum_fast native engine (CUDA)";
  m.def("device_count", &device_count, "Number of CUDA devices; raises RuntimeError naming the failed call.");
  m.def("runtime_version", &runtime_version, "CUDA runtime version the extension was built against.");
}

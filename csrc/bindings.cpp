// Python bindings of the native engine (spectrum_fast._C). Small surface: policy stays in Python.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "engine.h"

namespace py = pybind11;
using spectrum_fast::DType;
using spectrum_fast::GramEngine;
using spectrum_fast::Task;

namespace {

DType parse_dtype(const std::string& d) {
  if (d == "F32") return DType::F32;
  if (d == "F16") return DType::F16;
  if (d == "BF16") return DType::BF16;
  throw py::value_error("unsupported dtype '" + d + "' (the CUDA engine takes F32, F16, BF16)");
}

// (path, offset, nbytes, dtype, rows, cols) tuples from Python, validated before any GPU work.
std::vector<Task> to_tasks(const std::vector<std::tuple<std::string, int64_t, int64_t, std::string, int64_t, int64_t>>& items) {
  std::vector<Task> tasks;
  tasks.reserve(items.size());
  for (const auto& it : items) {
    Task t;
    t.path = std::get<0>(it);
    t.offset = std::get<1>(it);
    t.nbytes = std::get<2>(it);
    t.dtype = parse_dtype(std::get<3>(it));
    t.rows = std::get<4>(it);
    t.cols = std::get<5>(it);
    if (t.offset < 0) throw py::value_error(t.path + ": negative offset");
    if (t.rows <= 0 || t.cols <= 0) throw py::value_error(t.path + ": rows and cols must be positive");
    const int64_t esize = t.dtype == DType::F32 ? 4 : 2;
    if (t.nbytes != t.rows * t.cols * esize) {
      throw py::value_error(t.path + ": nbytes " + std::to_string(t.nbytes) + " != rows * cols * " +
                            std::to_string(esize));
    }
    if (t.rows > (int64_t{1} << 31) - 1 || t.cols > (int64_t{1} << 31) - 1) {
      throw py::value_error(t.path + ": matrix dimension exceeds 2^31 - 1");
    }
    tasks.push_back(std::move(t));
  }
  return tasks;
}

py::list run(GramEngine& engine,
             const std::vector<std::tuple<std::string, int64_t, int64_t, std::string, int64_t, int64_t>>& items,
             bool fp64, const py::object& should_stop) {
  std::vector<Task> tasks = to_tasks(items);
  std::vector<spectrum_fast::Result> results;
  bool interrupted = false;
  bool requested = false;  // should_stop() said so (other threads: signals only reach the main one)
  {
    py::gil_scoped_release release;
    auto stop = [&] {
      py::gil_scoped_acquire acquire;
      if (PyErr_CheckSignals() != 0) return true;
      if (!should_stop.is_none() && should_stop().cast<bool>()) {
        requested = true;
        return true;
      }
      return false;
    };
    try {
      results = engine.run(tasks, fp64, stop);
    } catch (const spectrum_fast::Interrupted&) {
      interrupted = true;
    }
  }
  if (interrupted && requested) throw py::value_error("stopped: should_stop() returned True");
  if (interrupted) throw py::error_already_set();  // PyErr_CheckSignals left the KeyboardInterrupt set
  py::list out;
  for (auto& r : results) {
    py::array_t<double> eig(static_cast<py::ssize_t>(r.eigenvalues.size()));
    std::copy(r.eigenvalues.begin(), r.eigenvalues.end(), eig.mutable_data());
    out.append(py::make_tuple(eig, r.amax, r.info));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "spectrum_fast native engine (CUDA): Gram eigenvalues of weight matrices streamed from disk";
  m.def("device_count", &spectrum_fast::device_count,
        "Number of CUDA devices; raises RuntimeError naming the failed call.");
  m.def("runtime_version", &spectrum_fast::runtime_version, "CUDA runtime version the extension was built against.");
  py::class_<GramEngine>(m, "GramEngine")
      .def(py::init<int>(), py::arg("device") = 0)
      .def_property_readonly("device", &GramEngine::device)
      .def("run", &run, py::arg("tasks"), py::arg("fp64") = false, py::arg("should_stop") = py::none(),
           "tasks: list of (path, offset, nbytes, dtype, rows, cols). Returns, per task and in order, "
           "(ascending eigenvalues of the Gram matrix on the smaller side, max |w|, cuSOLVER info). "
           "Between matrices, Ctrl-C raises KeyboardInterrupt and should_stop() -> True raises ValueError.");
  m.def("validate_tasks", [](const std::vector<std::tuple<std::string, int64_t, int64_t, std::string, int64_t, int64_t>>& items) {
        return to_tasks(items).size();
      }, "Check task tuples as run() would, without a GPU; returns their number.");
}

// Python bindings of the native engine (spectrum_fast._C). Small surface: policy stays in Python.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "band_solver_api.h"
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
  if (d == "F8_E4M3") return DType::F8_E4M3;
  if (d == "F8_E5M2") return DType::F8_E5M2;
  throw py::value_error("unsupported dtype '" + d + "' (the CUDA engine takes F32, F16, BF16, F8_E4M3, F8_E5M2)");
}

spectrum_fast::ScaleLayout parse_layout(const std::string& l) {
  if (l == "scalar") return spectrum_fast::ScaleLayout::Scalar;
  if (l == "row") return spectrum_fast::ScaleLayout::Row;
  if (l == "block") return spectrum_fast::ScaleLayout::Block;
  throw py::value_error("unknown scale layout '" + l + "' (scalar, row or block)");
}

// Task tuples from Python, validated before any GPU work:
//   (path, offset, nbytes, dtype, rows, cols[, scale])
//   scale: None or (path, offset, nbytes, dtype, layout, block, scale_cols), layout "scalar" | "row" | "block"
std::vector<Task> to_tasks(const py::sequence& items) {
  std::vector<Task> tasks;
  tasks.reserve(py::len(items));
  for (const py::handle& h : items) {
    if (!py::isinstance<py::tuple>(h)) throw py::value_error("a task must be a tuple");
    const auto it = py::reinterpret_borrow<py::tuple>(h);
    if (it.size() != 6 && it.size() != 7) {
      throw py::value_error("a task is (path, offset, nbytes, dtype, rows, cols[, scale])");
    }
    Task t;
    t.path = it[0].cast<std::string>();
    t.offset = it[1].cast<int64_t>();
    t.nbytes = it[2].cast<int64_t>();
    t.dtype = parse_dtype(it[3].cast<std::string>());
    t.rows = it[4].cast<int64_t>();
    t.cols = it[5].cast<int64_t>();
    if (it.size() == 7 && !it[6].is_none()) {
      if (!py::isinstance<py::tuple>(it[6])) throw py::value_error(t.path + ": scale must be None or a tuple");
      const auto sc = py::reinterpret_borrow<py::tuple>(it[6]);
      if (sc.size() != 7) throw py::value_error(t.path + ": scale is (path, offset, nbytes, dtype, layout, block, scale_cols)");
      t.scale_path = sc[0].cast<std::string>();
      t.scale_offset = sc[1].cast<int64_t>();
      t.scale_nbytes = sc[2].cast<int64_t>();
      t.scale_dtype = parse_dtype(sc[3].cast<std::string>());
      t.scale_layout = parse_layout(sc[4].cast<std::string>());
      t.scale_block = sc[5].cast<int64_t>();
      t.scale_cols = sc[6].cast<int64_t>();
    }
    try {
      spectrum_fast::validate(t);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
    tasks.push_back(std::move(t));
  }
  return tasks;
}

// Runs `work(stop)` without the GIL; between matrices, stop() checks for Ctrl-C and asks should_stop().
// Results become a list of (eigenvalues, amax, info) tuples.
template <typename Work>
py::list call_engine(const py::object& should_stop, Work&& work) {
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
      results = work(spectrum_fast::StopCheck(stop));
    } catch (const spectrum_fast::Interrupted&) {
      interrupted = true;
    }  // std::invalid_argument becomes ValueError through pybind11's translation
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

py::list run(GramEngine& engine, const py::sequence& items, bool fp64, const py::object& should_stop) {
  const std::vector<Task> tasks = to_tasks(items);
  return call_engine(should_stop, [&](const spectrum_fast::StopCheck& stop) { return engine.run(tasks, fp64, stop); });
}

py::list run_batched(GramEngine& engine, const py::sequence& items, bool fp64, int64_t batch,
                     const py::object& should_stop) {
  const std::vector<Task> tasks = to_tasks(items);
  return call_engine(should_stop, [&](const spectrum_fast::StopCheck& stop) {
    return engine.run_batched(tasks, fp64, batch, stop);
  });
}

using Array3 = py::array_t<double, py::array::c_style | py::array::forcecast>;

// The shape of a (batch, rows, cols) array, or a ValueError saying what it must be.
std::array<int64_t, 3> shape3(const Array3& a, const char* what) {
  if (a.ndim() != 3) throw py::value_error(std::string(what) + ", got " + std::to_string(a.ndim()) + " dimensions");
  return {a.shape(0), a.shape(1), a.shape(2)};
}

// bands: (batch, n, ld) float64, C order: matrix m's column q at [m, q, :], A(q + i, q) at [m, q, i], the
// rest zero (see band_solver.h). Not modified (the solver works on a copy).
py::array_t<double> band_eigenvalues_host(const Array3& bands, int64_t b, int64_t threads, int64_t lanes,
                                          int64_t variant) {
  const auto [batch, n, ld] = shape3(bands, "bands must be (batch, n, ld)");
  spectrum_fast::check_band_args(batch, n, b, ld, n * ld, threads);
  std::vector<double> work(bands.data(), bands.data() + batch * n * ld);
  py::array_t<double> w({static_cast<py::ssize_t>(batch), static_cast<py::ssize_t>(n)});
  double* out = w.mutable_data();
  {
    py::gil_scoped_release release;
    spectrum_fast::band_eigenvalues_host(work.data(), batch, n * ld, n, b, ld, out, threads, lanes, variant);
  }
  return w;
}

// panels: (batch, nb, lda) float64, C order: panel i's column c at [i, c, :m] (column-major, as LAPACK); returns
// (the factored panels, tau (batch, nb)) as geqrf leaves them. The input is not modified.
py::tuple panel_qr_host(const Array3& panels, int64_t m, int64_t threads, int64_t lanes) {
  const auto [batch, nb, lda] = shape3(panels, "panels must be (batch, nb, lda)");
  spectrum_fast::check_panel_args(batch, m, nb, lda, nb * lda, threads);
  py::array_t<double> out({panels.shape(0), panels.shape(1), panels.shape(2)});
  std::copy(panels.data(), panels.data() + batch * nb * lda, out.mutable_data());
  py::array_t<double> tau({static_cast<py::ssize_t>(batch), static_cast<py::ssize_t>(nb)});
  double* p = out.mutable_data();
  double* t = tau.mutable_data();
  {
    py::gil_scoped_release release;
    spectrum_fast::panel_qr_host(p, batch, nb * lda, m, nb, lda, t, threads, lanes);
  }
  return py::make_tuple(out, tau);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "spectrum_fast native engine (CUDA): Gram eigenvalues of weight matrices streamed from disk";
  m.def("device_count", &spectrum_fast::device_count,
        "Number of CUDA devices; raises RuntimeError naming the failed call.");
  m.def("runtime_version", &spectrum_fast::runtime_version, "CUDA runtime version the extension was built against.");
  m.def("cusolver_version", &spectrum_fast::cusolver_version,
        "cuSOLVER's version at run time (major * 1000 + minor * 100 + patch); needs no GPU.");
  m.def("cusolver_header_version", &spectrum_fast::cusolver_header_version,
        "cuSOLVER's version in the headers the extension was built with (CUSOLVER_VERSION).");
  py::class_<GramEngine>(m, "GramEngine")
      .def(py::init<int>(), py::arg("device") = 0)
      .def_property_readonly("device", &GramEngine::device)
      .def("set_syevd_algorithm", &GramEngine::set_syevd_algorithm, py::arg("alg"), py::arg("min_k") = 0,
           "cusolverDnXsyevd's algorithm for matrices with k >= min_k: 0 cuSOLVER's default, 1 one-stage, "
           "2 two-stage (cuSOLVER 12.3.4 or newer; cusolverDnSetAdvOptions with CUSOLVERDN_SYEVD).")
      .def("run", &run, py::arg("tasks"), py::arg("fp64") = false, py::arg("should_stop") = py::none(),
           "tasks: list of (path, offset, nbytes, dtype, rows, cols[, scale]), scale None or (path, offset, "
           "nbytes, dtype, 'scalar'|'row'|'block', block, scale_cols) for FP8. Returns, per task and in order, "
           "(ascending eigenvalues of the Gram matrix on the smaller side, max |w|, cuSOLVER info). "
           "Between matrices, Ctrl-C raises KeyboardInterrupt and should_stop() -> True raises ValueError.")
      .def("run_batched", &run_batched, py::arg("tasks"), py::arg("fp64") = false, py::arg("batch") = 64,
           py::arg("should_stop") = py::none(),
           "As run(), for tasks of one shape, dtype and scale layout: `batch` matrices per strided-batched GEMM "
           "and cusolverDnXsyevBatched call.");
  m.def("band_eigenvalues_host", &band_eigenvalues_host, py::arg("bands"), py::arg("b"), py::arg("threads") = 4,
        py::arg("lanes") = 1, py::arg("variant") = 0,
        "Ascending eigenvalues (batch, n) of symmetric band matrices given as (batch, n, ld) float64, ld >= 2b: "
        "the GPU's band solver run by a team of `threads` host threads per matrix in groups of `lanes` (a GPU "
        "block's warps: threads = lanes = 32 mirrors one warp), chase `variant` 0..7 (for tests).");
  m.def("band_eigenvalues_cuda",
        [](int device, uintptr_t bands, int64_t batch, int64_t stride, int64_t n, int64_t b, int64_t ld,
           uintptr_t work, uintptr_t w, uintptr_t stream, int64_t threads, int64_t variant) {
          spectrum_fast::band_eigenvalues_cuda(device, reinterpret_cast<double*>(bands), batch, stride, n, b, ld,
                                               reinterpret_cast<double*>(work), reinterpret_cast<double*>(w),
                                               stream, threads, variant);
        },
        py::arg("device"), py::arg("bands"), py::arg("batch"), py::arg("stride"), py::arg("n"), py::arg("b"),
        py::arg("ld"), py::arg("work"), py::arg("w"), py::arg("stream"), py::arg("threads") = 64,
        py::arg("variant") = 0,
        "Queue the band eigensolver on a GPU: device pointers (as integers) to `batch` band matrices `stride` "
        "doubles apart (layout of band_eigenvalues_host; overwritten), a work area of batch * 2n doubles and "
        "the output (batch, n); `stream` a cudaStream_t as an integer; `variant` the chase's (0..7, band_solver.h). "
        "Arguments are checked before any CUDA call.");
  m.def("band_solver_occupancy", &spectrum_fast::band_solver_occupancy, py::arg("device"), py::arg("b"),
        py::arg("threads"), py::arg("variant"),
        "Band-solver blocks (bandwidth b, `threads` per block, chase variant) one multiprocessor holds at once; "
        "arguments checked before any CUDA call.");
  m.def("panel_qr_host", &panel_qr_host, py::arg("panels"), py::arg("m"), py::arg("threads") = 4, py::arg("lanes") = 1,
        "Householder QR (as LAPACK dgeqrf) of m x nb column-major panels given as (batch, nb, lda) float64: "
        "(factored panels, tau), by the GPU's panel kernel run on `threads` host threads (for tests).");
  m.def("panel_qr_cuda",
        [](int device, uintptr_t panels, int64_t batch, int64_t stride, int64_t m, int64_t nb, int64_t lda,
           uintptr_t tau, uintptr_t stream, int64_t threads) {
          spectrum_fast::panel_qr_cuda(device, reinterpret_cast<double*>(panels), batch, stride, m, nb, lda,
                                       reinterpret_cast<double*>(tau), stream, threads);
        },
        py::arg("device"), py::arg("panels"), py::arg("batch"), py::arg("stride"), py::arg("m"), py::arg("nb"),
        py::arg("lda"), py::arg("tau"), py::arg("stream"), py::arg("threads") = 1024,
        "Queue the panel QR on a GPU: device pointers (as integers) to `batch` column-major m x nb panels `stride` "
        "doubles apart (factored in place) and to tau (batch x nb); arguments checked before any CUDA call.");
  m.def("validate_tasks", [](const py::sequence& items) { return to_tasks(items).size(); }, "Check task tuples as run() would, without a GPU; returns their number.");
}

// The CUDA engine: eigenvalues of the Gram matrices of weight matrices streamed from safetensors files.
//
// Small surface on purpose: it takes work items (file, byte offset, dtype, shape) and returns, per
// matrix, the ascending eigenvalues of the Gram matrix on the smaller side and the largest absolute
// entry. Deciding what they mean (SNR, accuracy guard, fallbacks) stays in Python.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace spectrum_fast {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct Task {
  std::string path;
  int64_t offset = 0;  // absolute byte offset of the tensor in the file
  int64_t nbytes = 0;
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
};

struct Result {
  std::vector<double> eigenvalues;  // ascending, min(rows, cols) of them
  double amax = 0.0;                // largest |w|; NaN or Inf when the matrix is not finite
  int info = 0;                     // cuSOLVER's info (0: converged)
};

// Thrown by GramEngine::run when the StopCheck asked to stop.
struct Interrupted : std::runtime_error {
  Interrupted() : std::runtime_error("interrupted") {}
};

// Returns true when the caller wants the run to stop (e.g. Ctrl-C); checked between matrices.
using StopCheck = std::function<bool()>;

class GramEngine {
 public:
  explicit GramEngine(int device);
  ~GramEngine();
  GramEngine(const GramEngine&) = delete;
  GramEngine& operator=(const GramEngine&) = delete;

  // Processes the tasks in order: a reader thread preads each tensor into one of two pinned host
  // buffers, a copy stream moves it to the device while the compute stream works on the previous one.
  // fp64: Gram matrix and eigensolver in double precision (the accuracy fallback), else float32.
  std::vector<Result> run(const std::vector<Task>& tasks, bool fp64, const StopCheck& stop);

  int device() const { return device_; }

 private:
  void release() noexcept;
  struct Impl;
  Impl* impl_;
  int device_;
};

int device_count();
int runtime_version();

}  // namespace spectrum_fast

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

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F8_E4M3 = 3, F8_E5M2 = 4 };

inline int64_t element_size(DType d) {
  return d == DType::F32 ? 4 : (d == DType::F8_E4M3 || d == DType::F8_E5M2) ? 1 : 2;
}

// How an FP8 weight's scale tensor applies: w[i, j] = fp8[i, j] * scale[...]
//   Scalar: scale[0]; Row: scale[i]; Block: scale[(i / block) * scale_cols + j / block] (DeepSeek-V3).
enum class ScaleLayout : int { None = 0, Scalar = 1, Row = 2, Block = 3 };

struct Task {
  std::string path;
  int64_t offset = 0;  // absolute byte offset of the tensor in the file
  int64_t nbytes = 0;
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  // FP8 only: the scale tensor the stored values are multiplied by (F32, F16 or BF16)
  ScaleLayout scale_layout = ScaleLayout::None;
  std::string scale_path;
  int64_t scale_offset = 0;
  int64_t scale_nbytes = 0;
  DType scale_dtype = DType::F32;
  int64_t scale_block = 1;
  int64_t scale_cols = 1;
};

// Checks a task's sizes (shared by the engine and the bindings' argument validation); throws
// std::invalid_argument naming the file.
void validate(const Task& t);

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

  // Same results for tasks that all have one shape, dtype and scale layout (MoE experts, GQA k/v):
  // up to `batch` matrices are read, widened, multiplied (strided-batched GEMM) and solved by one
  // cusolverDnXsyevBatched call. No read/compute overlap: meant for many small matrices, where one
  // solver call per matrix is dominated by launch and synchronisation costs.
  std::vector<Result> run_batched(const std::vector<Task>& tasks, bool fp64, int64_t batch, const StopCheck& stop);

  // The algorithm cusolverDnXsyevd uses for matrices with k >= min_k (cusolverDnSetAdvOptions with
  // CUSOLVERDN_SYEVD): 0 = cuSOLVER's default (from cuSOLVER 12.3.4 its own choice by size and
  // architecture), 1 = one-stage tridiagonal reduction, 2 = two-stage (dense to band with GEMMs, then
  // band to tridiagonal; cuSOLVER 12.3.4, CUDA 13.4 Update 1, or newer). Smaller matrices keep the default.
  // Throws std::invalid_argument for another alg, std::runtime_error where cuSOLVER lacks the option.
  void set_syevd_algorithm(int alg, int64_t min_k);

  int device() const { return device_; }

 private:
  void release() noexcept;
  struct Impl;
  Impl* impl_;
  int device_;
};

int device_count();
int runtime_version();
// cuSOLVER's version as major * 1000 + minor * 100 + patch: of the library loaded at run time, and of the
// headers the extension was built with (CUSOLVER_VERSION).
int cusolver_version();
int cusolver_header_version();

}  // namespace spectrum_fast

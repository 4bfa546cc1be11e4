// Every CUDA status becomes a Python exception naming the call and the status.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace spectrum_fast {

inline void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(call) + " failed: " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
  }
}

}  // namespace spectrum_fast

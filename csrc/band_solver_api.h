// Entry points of the band eigensolver (band_solver.h): eigenvalues of a batch of symmetric band matrices.
#pragma once

#include <cstdint>

namespace spectrum_fast {

// Checks the shape arguments shared by both entry points; throws std::invalid_argument saying which.
//   batch matrices, each n x n with bandwidth b, stored `stride` doubles apart as described in
//   band_solver.h (ld >= 2b doubles per column); threads: the team size.
void check_band_args(int64_t batch, int64_t n, int64_t b, int64_t ld, int64_t stride, int64_t threads);

// On the host with `threads` std::threads per matrix (the CPU tests run the device algorithm this way).
// bands is overwritten; w receives batch x n ascending eigenvalues.
void band_eigenvalues_host(double* bands, int64_t batch, int64_t stride, int64_t n, int64_t b, int64_t ld,
                           double* w, int64_t threads);

// On a GPU: one thread block of `threads` threads per matrix for the bulge chasing, then one thread per
// eigenvalue. bands, work (batch x 2n doubles) and w (batch x n) live on `device`; the kernels are queued
// on `stream` (a cudaStream_t as an integer, 0: the legacy default stream) and not waited for.
void band_eigenvalues_cuda(int device, double* bands, int64_t batch, int64_t stride, int64_t n, int64_t b,
                           int64_t ld, double* work, double* w, uintptr_t stream, int64_t threads);

}  // namespace spectrum_fast

// Entry points of the band eigensolver (band_solver.h): eigenvalues of a batch of symmetric band matrices.
#pragma once

#include <cstdint>

namespace spectrum_fast {

// Checks the shape arguments shared by both entry points; throws std::invalid_argument saying which.
//   batch matrices, each n x n with bandwidth b, stored `stride` doubles apart as described in
//   band_solver.h (ld >= 2b doubles per column); threads: the team size.
void check_band_args(int64_t batch, int64_t n, int64_t b, int64_t ld, int64_t stride, int64_t threads);

// The chase's variant (band_solver.h kLaneDot | kBatched | kCrews): 0 .. kChaseVariants - 1, else
// std::invalid_argument.
void check_chase_variant(int64_t variant);

// On the host with `threads` std::threads per matrix in groups of `lanes` (the CPU tests run the device
// algorithm this way; threads = lanes = 32 is a GPU block of one warp). bands is overwritten; w receives
// batch x n ascending eigenvalues.
void band_eigenvalues_host(double* bands, int64_t batch, int64_t stride, int64_t n, int64_t b, int64_t ld,
                           double* w, int64_t threads, int64_t lanes, int64_t variant);

// On a GPU: one thread block of `threads` threads per matrix for the bulge chasing, then one thread per
// eigenvalue. bands, work (batch x 2n doubles) and w (batch x n) live on `device`; the kernels are queued
// on `stream` (a cudaStream_t as an integer, 0: the legacy default stream) and not waited for.
void band_eigenvalues_cuda(int device, double* bands, int64_t batch, int64_t stride, int64_t n, int64_t b,
                           int64_t ld, double* work, double* w, uintptr_t stream, int64_t threads, int64_t variant);

// Chase blocks of `threads` threads (variant, bandwidth b) that one multiprocessor of `device` holds at once
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor): more in one launch run in a second wave.
int band_solver_occupancy(int device, int64_t b, int64_t threads, int64_t variant);

// Stage 1's panel factorization (band_solver.h panel_qr) for a batch of m x nb column-major panels,
// `stride` doubles apart, leading dimension lda; tau: batch x nb. Checks as check_band_args does.
void check_panel_args(int64_t batch, int64_t m, int64_t nb, int64_t lda, int64_t stride, int64_t threads);
void panel_qr_host(double* panels, int64_t batch, int64_t stride, int64_t m, int64_t nb, int64_t lda, double* tau,
                   int64_t threads, int64_t lanes);
// One thread block of `threads` (a multiple of 32) per panel, queued on `stream`.
void panel_qr_cuda(int device, double* panels, int64_t batch, int64_t stride, int64_t m, int64_t nb, int64_t lda,
                   double* tau, uintptr_t stream, int64_t threads);

}  // namespace spectrum_fast

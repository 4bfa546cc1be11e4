// The band eigensolver on a GPU: band_solver.h with a CUDA thread block as the team, one block per matrix
// for the bulge chasing (stage 2), then one thread per eigenvalue for the bisection (stage 3). A batch of
// matrices fills the GPU: each matrix's chase is a long chain of small steps, and the chains run side by side.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "band_solver_api.h"
#include "cuda_check.h"

#define SF_FN __device__
#define SF_NS device
#include "band_solver.h"

namespace spectrum_fast {
namespace {

struct BlockTeam {
  double* partial;  // shared, one per warp
  double* scratch;  // shared: v, w, y, u, each `sets` vectors of `stride` doubles
  int sets, stride;
  __device__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() { __syncthreads(); }
  // blockDim.x is a multiple of 32 (checked by the launcher): full warps, fixed order
  __device__ double sum(double x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = x;
    __syncthreads();
    double s = 0.0;
    for (int i = 0; i < static_cast<int>(blockDim.x >> 5); ++i) s += partial[i];
    __syncthreads();
    return s;
  }
  __device__ int group() const { return static_cast<int>(threadIdx.x >> 5); }
  __device__ int groups() const { return static_cast<int>(blockDim.x >> 5); }
  __device__ int lane() const { return static_cast<int>(threadIdx.x & 31); }
  __device__ int lanes() const { return 32; }
  __device__ void group_sync() const { __syncwarp(); }
  // lane 0's total, broadcast: every lane gets the same bits; ends with a barrier of the warp, as the Team
  // contract says (shuffles alone order no memory)
  __device__ double group_sum(double x) const {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
    x = __shfl_sync(0xffffffffu, x, 0);
    __syncwarp();
    return x;
  }
  __device__ double* v() { return scratch; }
  __device__ double* w() { return scratch + sets * stride; }
  __device__ double* y() { return scratch + 2 * sets * stride; }
  __device__ double* u() { return scratch + 3 * sets * stride; }
  __device__ int scratch_stride() const { return stride; }
};

// Dynamic shared memory of the chase kernel: v, w, y, u of b doubles, one set per crew with kCrews.
inline size_t chase_scratch_bytes(int variant, int64_t b, int64_t threads) {
  const int64_t sets = (variant & device::kCrews) ? threads / 32 : 1;
  return static_cast<size_t>(4 * sets * b) * sizeof(double);
}

constexpr int kChaseMaxThreads = 256;  // a thread per reflector row (b <= 128: 4 warps), or kMaxCrews crews of a warp
static_assert(kChaseMaxThreads / 32 <= device::kMaxCrews, "a chase block has at most kMaxCrews warps (crews)");

template <int Variant>
__global__ void __launch_bounds__(kChaseMaxThreads) chase_kernel(double* bands, int64_t stride, int64_t n, int64_t b, int64_t ld, double* work) {
  __shared__ double partial[32];
  extern __shared__ double scratch[];  // chase_scratch_bytes
  BlockTeam t{partial, scratch, (Variant & device::kCrews) ? static_cast<int>(blockDim.x >> 5) : 1, static_cast<int>(b)};
  const int64_t m = blockIdx.x;
  double* d = work + m * 2 * n;
  device::chase<Variant>(t, bands + m * stride, n, b, ld, d, d + n);
}

__global__ void __launch_bounds__(1024, 1) panel_kernel(double* panels, int64_t stride, int64_t m, int64_t nb, int64_t lda, double* tau) {
  __shared__ double partial[32];
  BlockTeam t{partial, nullptr, 0, 0};
  const int64_t i = blockIdx.x;
  device::panel_qr(t, panels + i * stride, m, nb, lda, tau + i * nb);
}

__global__ void bisect_kernel(const double* work, int64_t n, double* w) {
  const int64_t m = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const double* d = work + m * 2 * n;
  const double* e = d + n;
  double lo, hi, pivmin;
  device::bounds(d, e, n, &lo, &hi, &pivmin);
  w[m * n + j] = device::eigenvalue(d, e, n, j, lo, hi, pivmin);
}

}  // namespace

void panel_qr_cuda(int device, double* panels, int64_t batch, int64_t stride, int64_t m, int64_t nb, int64_t lda,
                   double* tau, uintptr_t stream, int64_t threads) {
  check_panel_args(batch, m, nb, lda, stride, threads);
  if (threads % 32 != 0) throw std::invalid_argument("panel QR: threads must be a multiple of 32 on a GPU");
  DeviceGuard guard(device);
  panel_kernel<<<static_cast<unsigned>(batch), static_cast<unsigned>(threads), 0,
                 reinterpret_cast<cudaStream_t>(stream)>>>(panels, stride, m, nb, lda, tau);
  check_cuda(cudaGetLastError(), "panel QR kernel launch");
}

namespace {

void check_chase_threads(int64_t threads) {
  if (threads < 32 || threads % 32 != 0 || threads > kChaseMaxThreads) {
    throw std::invalid_argument("band eigensolver: threads must be a multiple of 32 up to " +
                                std::to_string(kChaseMaxThreads) + " on a GPU, got " + std::to_string(threads));
  }
}

}  // namespace

int band_solver_occupancy(int device, int64_t b, int64_t threads, int64_t variant) {
  if (b < 1 || b > device::kMaxBand) throw std::invalid_argument("band eigensolver: bandwidth must be in 1..128");
  check_chase_variant(variant);
  check_chase_threads(threads);
  DeviceGuard guard(device);
  int blocks = 0;
  device::with_chase_variant(variant, [&](auto v) {
    constexpr int kVariant = decltype(v)::value;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, chase_kernel<kVariant>, static_cast<int>(threads),
                                                             chase_scratch_bytes(kVariant, b, threads)),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  });
  return blocks;
}

void band_eigenvalues_cuda(int device, double* bands, int64_t batch, int64_t stride, int64_t n, int64_t b,
                           int64_t ld, double* work, double* w, uintptr_t stream, int64_t threads, int64_t variant) {
  check_band_args(batch, n, b, ld, stride, threads);
  check_chase_variant(variant);
  check_chase_threads(threads);
  if (batch > 65535) throw std::invalid_argument("band eigensolver: at most 65535 matrices per call on a GPU");
  DeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(batch)), block(static_cast<unsigned>(threads));
  const size_t smem = chase_scratch_bytes(static_cast<int>(variant), b, threads);  // at most 32 KiB: no opt-in
  device::with_chase_variant(variant, [&](auto v) {
    chase_kernel<decltype(v)::value><<<grid, block, smem, s>>>(bands, stride, n, b, ld, work);
  });
  check_cuda(cudaGetLastError(), "band eigensolver kernel launch");
  const unsigned per_block = 128;
  const dim3 cover(static_cast<unsigned>((n + per_block - 1) / per_block), static_cast<unsigned>(batch));
  bisect_kernel<<<cover, per_block, 0, s>>>(work, n, w);
  check_cuda(cudaGetLastError(), "band eigensolver kernel launch");
}

}  // namespace spectrum_fast

// GramEngine: streamed Gram + eigensolver on one GPU. See engine.h for the contract.
#include "engine.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "cuda_check.h"

namespace spectrum_fast {

namespace {

constexpr int kSlots = 2;  // pinned host buffers / device raw buffers in the ring

// Device buffer that only grows, so matrices of one shape reuse it.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  void reserve(size_t n) {
    if (n <= bytes) return;
    if (ptr) check_cuda(cudaFree(ptr), "cudaFree");
    ptr = nullptr;
    bytes = 0;
    check_cuda(cudaMalloc(&ptr, n), "cudaMalloc");
    bytes = n;
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
};

struct PinnedBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  void reserve(size_t n) {
    if (n <= bytes) return;
    if (ptr) check_cuda(cudaFreeHost(ptr), "cudaFreeHost");
    ptr = nullptr;
    bytes = 0;
    check_cuda(cudaHostAlloc(&ptr, n, cudaHostAllocPortable), "cudaHostAlloc");
    bytes = n;
  }
  ~PinnedBuffer() {
    if (ptr) cudaFreeHost(ptr);
  }
};

__device__ __forceinline__ float load_as_float(const void* __restrict__ p, int dtype, int64_t i) {
  switch (dtype) {
    case static_cast<int>(DType::BF16):
      return __uint_as_float(static_cast<unsigned int>(static_cast<const unsigned short*>(p)[i]) << 16);
    case static_cast<int>(DType::F16):
      return __half2float(static_cast<const __half*>(p)[i]);
    case static_cast<int>(DType::F8_E4M3):  // e4m3fn, as stored by DeepSeek-V3 / torch.float8_e4m3fn
      return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<const __nv_fp8_storage_t*>(p)[i], __NV_E4M3)));
    case static_cast<int>(DType::F8_E5M2):
      return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<const __nv_fp8_storage_t*>(p)[i], __NV_E5M2)));
    default:
      return static_cast<const float*>(p)[i];
  }
}

// Widen stored values to T (FP8 times its scale, in fp32 as the CPU path does) and track max |w|
// (NaN wins, so a NaN anywhere shows in amax).
template <typename T>
__global__ void widen_kernel(const void* __restrict__ in, int dtype, T* __restrict__ out, int64_t n, int64_t cols,
                             const void* __restrict__ scale, int scale_dtype, int layout, int64_t block,
                             int64_t scale_cols, unsigned int* __restrict__ amax_bits) {
  unsigned int local = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = load_as_float(in, dtype, i);
    if (layout != static_cast<int>(ScaleLayout::None)) {
      const int64_t r = i / cols;
      int64_t si = 0;
      if (layout == static_cast<int>(ScaleLayout::Row)) {
        si = r;
      } else if (layout == static_cast<int>(ScaleLayout::Block)) {
        si = (r / block) * scale_cols + (i - r * cols) / block;
      }
      v *= load_as_float(scale, scale_dtype, si);
    }
    out[i] = static_cast<T>(v);
    // |v| as bits: for non-negative floats the bit pattern orders like the value; NaN > Inf.
    local = max(local, __float_as_uint(v) & 0x7fffffffu);
  }
  // warp reduction, then one atomic per warp
  for (int offset = 16; offset > 0; offset /= 2) local = max(local, __shfl_down_sync(0xffffffffu, local, offset));
  if ((threadIdx.x & 31) == 0) atomicMax(amax_bits, local);
}

// Widens task t's stored values at `in` (scale at `scale`, for FP8) into `out` as float or double, on
// `stream`; the element at `out_offset` is the matrix's first.
void launch_widen(const Task& t, bool fp64, const void* in, const void* scale, void* out, int64_t out_offset,
                  unsigned int* amax, cudaStream_t stream) {
  const int64_t n_el = t.rows * t.cols;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n_el + threads - 1) / threads, 4096));
  const int dtype = static_cast<int>(t.dtype), sdtype = static_cast<int>(t.scale_dtype);
  const int layout = static_cast<int>(t.scale_layout);
  if (fp64) {
    widen_kernel<double><<<blocks, threads, 0, stream>>>(in, dtype, static_cast<double*>(out) + out_offset, n_el,
                                                         t.cols, scale, sdtype, layout, t.scale_block, t.scale_cols,
                                                         amax);
  } else {
    widen_kernel<float><<<blocks, threads, 0, stream>>>(in, dtype, static_cast<float*>(out) + out_offset, n_el,
                                                        t.cols, scale, sdtype, layout, t.scale_block, t.scale_cols,
                                                        amax);
  }
}

void check_cublas(cublasStatus_t s, const char* call) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(call) + " failed: cublasStatus " + std::to_string(static_cast<int>(s)));
  }
}

void check_cusolver(cusolverStatus_t s, const char* call) {
  if (s != CUSOLVER_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(call) + " failed: cusolverStatus " + std::to_string(static_cast<int>(s)));
  }
}

void pread_all(const std::string& path, int64_t offset, int64_t nbytes, void* dst) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  char* p = static_cast<char*>(dst);
  int64_t done = 0;
  while (done < nbytes) {
    ssize_t got = ::pread(fd, p + done, static_cast<size_t>(nbytes - done), offset + done);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      int err = errno;
      ::close(fd);
      throw std::runtime_error(path + ": short read at byte " + std::to_string(offset + done) +
                               (got < 0 ? std::string(": ") + std::strerror(err) : std::string(" (truncated)")));
    }
    done += got;
  }
  ::close(fd);
}

}  // namespace

void validate(const Task& t) {
  if (t.offset < 0) throw std::invalid_argument(t.path + ": negative offset");
  if (t.rows <= 0 || t.cols <= 0) throw std::invalid_argument(t.path + ": rows and cols must be positive");
  if (t.rows > (int64_t{1} << 31) - 1 || t.cols > (int64_t{1} << 31) - 1) {
    throw std::invalid_argument(t.path + ": matrix dimension exceeds 2^31 - 1");
  }
  const int64_t esize = element_size(t.dtype);
  if (t.rows > INT64_MAX / t.cols / esize) throw std::invalid_argument(t.path + ": matrix too large");
  if (t.nbytes != t.rows * t.cols * esize) {
    throw std::invalid_argument(t.path + ": nbytes " + std::to_string(t.nbytes) + " != rows * cols * " +
                                std::to_string(esize));
  }
  const bool fp8 = t.dtype == DType::F8_E4M3 || t.dtype == DType::F8_E5M2;
  if (t.scale_layout == ScaleLayout::None) return;
  if (!fp8) throw std::invalid_argument(t.path + ": a scale applies to FP8 weights only");
  if (t.scale_dtype != DType::F32 && t.scale_dtype != DType::F16 && t.scale_dtype != DType::BF16) {
    throw std::invalid_argument(t.scale_path + ": scale dtype must be F32, F16 or BF16");
  }
  if (t.scale_offset < 0) throw std::invalid_argument(t.scale_path + ": negative scale offset");
  int64_t count = 1;
  if (t.scale_layout == ScaleLayout::Row) {
    count = t.rows;
  } else if (t.scale_layout == ScaleLayout::Block) {
    if (t.scale_block <= 0) throw std::invalid_argument(t.scale_path + ": scale block must be positive");
    const int64_t srows = (t.rows + t.scale_block - 1) / t.scale_block;
    if (t.scale_cols != (t.cols + t.scale_block - 1) / t.scale_block) {
      throw std::invalid_argument(t.scale_path + ": scale_cols does not match cols / block");
    }
    count = srows * t.scale_cols;
  }
  if (t.scale_nbytes != count * element_size(t.scale_dtype)) {
    throw std::invalid_argument(t.scale_path + ": scale nbytes " + std::to_string(t.scale_nbytes) +
                                " does not match its layout (" + std::to_string(count) + " values)");
  }
}

struct GramEngine::Impl {
  cudaStream_t copy_stream = nullptr;
  cudaStream_t compute_stream = nullptr;
  cublasHandle_t cublas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  cusolverDnParams_t params = nullptr;
  cusolverDnParams_t alg_params = nullptr;  // Xsyevd with a chosen algorithm, for k >= alg_min_k
  int64_t alg_min_k = 0;
  cudaEvent_t copied[kSlots] = {};
  cudaEvent_t widened[kSlots] = {};
  cudaEvent_t finished[kSlots] = {};
  PinnedBuffer pinned[kSlots];
  PinnedBuffer scale_pinned[kSlots];
  PinnedBuffer eig_host[kSlots];
  DeviceBuffer raw[kSlots];
  DeviceBuffer raw_scale[kSlots];
  DeviceBuffer matrix, gram, eig, work, amax, info;
  std::vector<char> host_work;
};

GramEngine::GramEngine(int device) : impl_(new Impl), device_(device) {
  try {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    check_cuda(cudaStreamCreateWithFlags(&impl_->copy_stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cuda(cudaStreamCreateWithFlags(&impl_->compute_stream, cudaStreamNonBlocking), "cudaStreamCreate");
    for (int s = 0; s < kSlots; ++s) {
      check_cuda(cudaEventCreateWithFlags(&impl_->copied[s], cudaEventDisableTiming), "cudaEventCreate");
      check_cuda(cudaEventCreateWithFlags(&impl_->widened[s], cudaEventDisableTiming), "cudaEventCreate");
      check_cuda(cudaEventCreateWithFlags(&impl_->finished[s], cudaEventDisableTiming), "cudaEventCreate");
    }
    check_cublas(cublasCreate(&impl_->cublas), "cublasCreate");
    check_cublas(cublasSetStream(impl_->cublas, impl_->compute_stream), "cublasSetStream");
    // Pedantic: no TF32 and no reduced-precision shortcuts in SYRK; the guard's error model assumes fp32.
    check_cublas(cublasSetMathMode(impl_->cublas, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode");
    check_cusolver(cusolverDnCreate(&impl_->solver), "cusolverDnCreate");
    check_cusolver(cusolverDnSetStream(impl_->solver, impl_->compute_stream), "cusolverDnSetStream");
    check_cusolver(cusolverDnCreateParams(&impl_->params), "cusolverDnCreateParams");
  } catch (...) {
    release();
    throw;
  }
}

GramEngine::~GramEngine() { release(); }

void GramEngine::release() noexcept {
  if (!impl_) return;
  cudaSetDevice(device_);
  if (impl_->compute_stream) cudaStreamSynchronize(impl_->compute_stream);
  if (impl_->copy_stream) cudaStreamSynchronize(impl_->copy_stream);
  if (impl_->params) cusolverDnDestroyParams(impl_->params);
  if (impl_->alg_params) cusolverDnDestroyParams(impl_->alg_params);
  if (impl_->solver) cusolverDnDestroy(impl_->solver);
  if (impl_->cublas) cublasDestroy(impl_->cublas);
  for (int s = 0; s < kSlots; ++s) {
    if (impl_->copied[s]) cudaEventDestroy(impl_->copied[s]);
    if (impl_->widened[s]) cudaEventDestroy(impl_->widened[s]);
    if (impl_->finished[s]) cudaEventDestroy(impl_->finished[s]);
  }
  if (impl_->copy_stream) cudaStreamDestroy(impl_->copy_stream);
  if (impl_->compute_stream) cudaStreamDestroy(impl_->compute_stream);
  delete impl_;
  impl_ = nullptr;
}

void GramEngine::set_syevd_algorithm(int alg, int64_t min_k) {
  if (alg < 0 || alg > 2) throw std::invalid_argument("syevd algorithm must be 0, 1 or 2, got " + std::to_string(alg));
  if (min_k < 0) throw std::invalid_argument("min_k must be >= 0, got " + std::to_string(min_k));
  Impl& im = *impl_;
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaStreamSynchronize(im.compute_stream), "cudaStreamSynchronize");  // no call uses it now
  if (im.alg_params) {
    cusolverDnDestroyParams(im.alg_params);
    im.alg_params = nullptr;
  }
  im.alg_min_k = min_k;
  if (alg == 0) return;
#if CUSOLVER_VERSION >= 12304
  cusolverDnParams_t p = nullptr;
  check_cusolver(cusolverDnCreateParams(&p), "cusolverDnCreateParams");
  const cusolverStatus_t st = cusolverDnSetAdvOptions(p, CUSOLVERDN_SYEVD, static_cast<cusolverAlgMode_t>(alg));
  if (st != CUSOLVER_STATUS_SUCCESS) {
    cusolverDnDestroyParams(p);
    check_cusolver(st, "cusolverDnSetAdvOptions(CUSOLVERDN_SYEVD)");
  }
  im.alg_params = p;
#else
  throw std::runtime_error("syevd algorithm " + std::to_string(alg) + " needs cuSOLVER 12.3.4 (CUDA 13.4 Update 1) "
                           "or newer; this extension was built with cuSOLVER " + std::to_string(CUSOLVER_VERSION));
#endif
}

std::vector<Result> GramEngine::run(const std::vector<Task>& tasks, bool fp64, const StopCheck& stop) {
  Impl& im = *impl_;
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  const size_t n_tasks = tasks.size();
  std::vector<Result> results(n_tasks);
  for (const Task& t : tasks) validate(t);

  // Reader thread: fills pinned slot (i % kSlots) with task i once the slot's previous copy is done.
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int> state(n_tasks, 0);  // 0 waiting, 1 read into its slot
  size_t released = 0;                 // tasks whose pinned slot has been copied out (slot reusable)
  bool abort = false;
  std::exception_ptr reader_error;
  std::thread reader([&] {
    try {
      check_cuda(cudaSetDevice(device_), "cudaSetDevice");
      for (size_t i = 0; i < n_tasks; ++i) {
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return abort || i < released + kSlots; });
          if (abort) return;
        }
        const Task& t = tasks[i];
        PinnedBuffer& slot = im.pinned[i % kSlots];
        slot.reserve(static_cast<size_t>(t.nbytes));
        pread_all(t.path, t.offset, t.nbytes, slot.ptr);
        if (t.scale_layout != ScaleLayout::None) {
          PinnedBuffer& sslot = im.scale_pinned[i % kSlots];
          sslot.reserve(static_cast<size_t>(t.scale_nbytes));
          pread_all(t.scale_path, t.scale_offset, t.scale_nbytes, sslot.ptr);
        }
        {
          std::lock_guard<std::mutex> lock(mu);
          state[i] = 1;
        }
        cv.notify_all();
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      reader_error = std::current_exception();
      abort = true;
      cv.notify_all();
    }
  });

  auto finish_reader = [&] {
    {
      std::lock_guard<std::mutex> lock(mu);
      abort = true;
    }
    cv.notify_all();
    reader.join();
  };

  auto collect = [&](size_t i) {
    const int s = static_cast<int>(i % kSlots);
    check_cuda(cudaEventSynchronize(im.finished[s]), "cudaEventSynchronize");
    const int64_t k = std::min(tasks[i].rows, tasks[i].cols);
    Result& r = results[i];
    r.eigenvalues.resize(static_cast<size_t>(k));
    const char* host = static_cast<const char*>(im.eig_host[s].ptr);
    if (fp64) {
      std::memcpy(r.eigenvalues.data(), host, static_cast<size_t>(k) * sizeof(double));
    } else {
      const float* f = reinterpret_cast<const float*>(host);
      for (int64_t j = 0; j < k; ++j) r.eigenvalues[static_cast<size_t>(j)] = f[j];
    }
    unsigned int bits;
    int info;
    std::memcpy(&bits, host + k * (fp64 ? 8 : 4), sizeof bits);
    std::memcpy(&info, host + k * (fp64 ? 8 : 4) + 4, sizeof info);
    float amax;
    std::memcpy(&amax, &bits, sizeof amax);
    r.amax = amax;
    r.info = info;
  };

  try {
    const cudaDataType dt = fp64 ? CUDA_R_64F : CUDA_R_32F;
    const size_t esize = fp64 ? sizeof(double) : sizeof(float);
    for (size_t i = 0; i < n_tasks; ++i) {
      if (stop && stop()) throw Interrupted();
      const Task& t = tasks[i];
      const int s = static_cast<int>(i % kSlots);
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return abort || state[i] == 1; });
        if (reader_error) std::rethrow_exception(reader_error);
      }
      // H2D on the copy stream; the raw slot must no longer be read by the widen of task i - kSlots.
      im.raw[s].reserve(static_cast<size_t>(t.nbytes));
      if (i >= kSlots) check_cuda(cudaStreamWaitEvent(im.copy_stream, im.widened[s], 0), "cudaStreamWaitEvent");
      check_cuda(cudaMemcpyAsync(im.raw[s].ptr, im.pinned[s].ptr, static_cast<size_t>(t.nbytes),
                                 cudaMemcpyHostToDevice, im.copy_stream), "cudaMemcpyAsync(H2D)");
      const bool scaled = t.scale_layout != ScaleLayout::None;
      if (scaled) {
        im.raw_scale[s].reserve(static_cast<size_t>(t.scale_nbytes));
        check_cuda(cudaMemcpyAsync(im.raw_scale[s].ptr, im.scale_pinned[s].ptr, static_cast<size_t>(t.scale_nbytes),
                                   cudaMemcpyHostToDevice, im.copy_stream), "cudaMemcpyAsync(H2D scale)");
      }
      check_cuda(cudaEventRecord(im.copied[s], im.copy_stream), "cudaEventRecord");

      // Compute stream: widen, Gram (SYRK on the smaller side), eigenvalues, results to pinned host.
      const int64_t n_el = t.rows * t.cols;
      const int64_t k = std::min(t.rows, t.cols);
      // Growing a buffer frees the old one, which the previous matrix's work may still be using:
      // wait for it first rather than rely on cudaFree synchronizing.
      const bool grows = static_cast<size_t>(n_el) * esize > im.matrix.bytes ||
                         static_cast<size_t>(k * k) * esize > im.gram.bytes || static_cast<size_t>(k) * esize > im.eig.bytes;
      if (grows) check_cuda(cudaStreamSynchronize(im.compute_stream), "cudaStreamSynchronize");
      im.matrix.reserve(static_cast<size_t>(n_el) * esize);
      im.gram.reserve(static_cast<size_t>(k * k) * esize);
      im.eig.reserve(static_cast<size_t>(k) * esize);
      im.amax.reserve(sizeof(unsigned int));
      im.info.reserve(sizeof(int));
      im.eig_host[s].reserve(static_cast<size_t>(k) * esize + 8);
      check_cuda(cudaStreamWaitEvent(im.compute_stream, im.copied[s], 0), "cudaStreamWaitEvent");
      check_cuda(cudaMemsetAsync(im.amax.ptr, 0, sizeof(unsigned int), im.compute_stream), "cudaMemsetAsync");
      launch_widen(t, fp64, im.raw[s].ptr, scaled ? im.raw_scale[s].ptr : nullptr, im.matrix.ptr, 0,
                   static_cast<unsigned int*>(im.amax.ptr), im.compute_stream);
      check_cuda(cudaGetLastError(), "widen_kernel launch");
      check_cuda(cudaEventRecord(im.widened[s], im.compute_stream), "cudaEventRecord");
      // The pinned slot can be refilled once its bytes are on the device.
      check_cuda(cudaEventSynchronize(im.copied[s]), "cudaEventSynchronize");
      {
        std::lock_guard<std::mutex> lock(mu);
        released = i + 1;
      }
      cv.notify_all();

      // Row-major W (rows x cols) is column-major W^T with ld = cols. rows >= cols: G = W^T W = A A^T
      // with A = W^T (cols x rows); rows < cols: G = W W^T = A^T A.
      const cublasOperation_t op = t.rows >= t.cols ? CUBLAS_OP_N : CUBLAS_OP_T;
      const int nk = static_cast<int>(k);
      const int kk = static_cast<int>(std::max(t.rows, t.cols));
      const int lda = static_cast<int>(t.cols);
      if (fp64) {
        const double one = 1.0, zero = 0.0;
        check_cublas(cublasDsyrk(im.cublas, CUBLAS_FILL_MODE_LOWER, op, nk, kk, &one,
                                 static_cast<const double*>(im.matrix.ptr), lda, &zero,
                                 static_cast<double*>(im.gram.ptr), nk), "cublasDsyrk");
      } else {
        const float one = 1.0f, zero = 0.0f;
        check_cublas(cublasSsyrk(im.cublas, CUBLAS_FILL_MODE_LOWER, op, nk, kk, &one,
                                 static_cast<const float*>(im.matrix.ptr), lda, &zero,
                                 static_cast<float*>(im.gram.ptr), nk), "cublasSsyrk");
      }
      size_t dev_ws = 0, host_ws = 0;
      cusolverDnParams_t params = im.alg_params && k >= im.alg_min_k ? im.alg_params : im.params;
      check_cusolver(cusolverDnXsyevd_bufferSize(im.solver, params, CUSOLVER_EIG_MODE_NOVECTOR,
                                                 CUBLAS_FILL_MODE_LOWER, k, dt, im.gram.ptr, k, dt, im.eig.ptr,
                                                 dt, &dev_ws, &host_ws), "cusolverDnXsyevd_bufferSize");
      if (dev_ws > im.work.bytes || host_ws > im.host_work.size()) {
        check_cuda(cudaStreamSynchronize(im.compute_stream), "cudaStreamSynchronize");
      }
      im.work.reserve(std::max<size_t>(dev_ws, 1));
      if (im.host_work.size() < host_ws) im.host_work.resize(host_ws);
      check_cusolver(cusolverDnXsyevd(im.solver, params, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_LOWER, k,
                                      dt, im.gram.ptr, k, dt, im.eig.ptr, dt, im.work.ptr, dev_ws,
                                      host_ws ? im.host_work.data() : nullptr, host_ws,
                                      static_cast<int*>(im.info.ptr)), "cusolverDnXsyevd");
      char* host = static_cast<char*>(im.eig_host[s].ptr);
      check_cuda(cudaMemcpyAsync(host, im.eig.ptr, static_cast<size_t>(k) * esize, cudaMemcpyDeviceToHost,
                                 im.compute_stream), "cudaMemcpyAsync(D2H)");
      check_cuda(cudaMemcpyAsync(host + k * esize, im.amax.ptr, 4, cudaMemcpyDeviceToHost, im.compute_stream),
                 "cudaMemcpyAsync(D2H)");
      check_cuda(cudaMemcpyAsync(host + k * esize + 4, im.info.ptr, 4, cudaMemcpyDeviceToHost, im.compute_stream),
                 "cudaMemcpyAsync(D2H)");
      check_cuda(cudaEventRecord(im.finished[s], im.compute_stream), "cudaEventRecord");
      // Collect the previous matrix now: its eigensolve overlapped this one's read and copy.
      if (i >= 1) collect(i - 1);
    }
    if (n_tasks) collect(n_tasks - 1);
  } catch (...) {
    finish_reader();
    cudaStreamSynchronize(im.compute_stream);
    cudaStreamSynchronize(im.copy_stream);
    throw;
  }
  finish_reader();
  return results;
}

std::vector<Result> GramEngine::run_batched(const std::vector<Task>& tasks, bool fp64, int64_t batch,
                                            const StopCheck& stop) {
  Impl& im = *impl_;
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  std::vector<Result> results(tasks.size());
  if (tasks.empty()) return results;
  if (batch <= 0) throw std::invalid_argument("batch must be positive");
  const Task& t0 = tasks[0];
  for (const Task& t : tasks) {
    validate(t);
    if (t.rows != t0.rows || t.cols != t0.cols || t.dtype != t0.dtype || t.scale_layout != t0.scale_layout ||
        t.scale_nbytes != t0.scale_nbytes || t.scale_dtype != t0.scale_dtype) {
      throw std::invalid_argument(t.path + ": run_batched needs tasks of one shape, dtype and scale layout");
    }
  }
  const int64_t rows = t0.rows, cols = t0.cols, k = std::min(rows, cols), n_el = rows * cols;
  const cudaDataType dt = fp64 ? CUDA_R_64F : CUDA_R_32F;
  const size_t esize = fp64 ? sizeof(double) : sizeof(float);
  const size_t raw_bytes = static_cast<size_t>(t0.nbytes), scale_bytes = static_cast<size_t>(t0.scale_nbytes);
  const bool scaled = t0.scale_layout != ScaleLayout::None;
#if !defined(CUSOLVER_VERSION) || CUSOLVER_VERSION < 11701
  throw std::runtime_error("run_batched needs cusolverDnXsyevBatched (cuSOLVER 11.7.1, CUDA 12.6 Update 2, or newer)");
#else
  // cusolverDnXsyevBatched: n * lda * batchSize must fit in a 32-bit int
  const int64_t fit = std::max<int64_t>(1, static_cast<int64_t>(INT32_MAX) / (k * k));
  const int64_t b_max = std::min<int64_t>({batch, static_cast<int64_t>(tasks.size()), fit});
  check_cuda(cudaStreamSynchronize(im.compute_stream), "cudaStreamSynchronize");
  im.pinned[0].reserve(raw_bytes * b_max);
  im.raw[0].reserve(raw_bytes * b_max);
  if (scaled) {
    im.scale_pinned[0].reserve(scale_bytes * b_max);
    im.raw_scale[0].reserve(scale_bytes * b_max);
  }
  im.matrix.reserve(static_cast<size_t>(n_el) * esize * b_max);
  im.gram.reserve(static_cast<size_t>(k * k) * esize * b_max);
  im.eig.reserve(static_cast<size_t>(k) * esize * b_max);
  im.amax.reserve(sizeof(unsigned int) * b_max);
  im.info.reserve(sizeof(int) * b_max);
  im.eig_host[0].reserve((static_cast<size_t>(k) * esize + 8) * b_max);
  const cublasOperation_t op_a = rows >= cols ? CUBLAS_OP_N : CUBLAS_OP_T;
  const cublasOperation_t op_b = rows >= cols ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int nk = static_cast<int>(k), kk = static_cast<int>(std::max(rows, cols)), lda = static_cast<int>(cols);

  try {
  for (size_t first = 0; first < tasks.size(); first += static_cast<size_t>(b_max)) {
    if (stop && stop()) throw Interrupted();
    const int64_t nb = std::min<int64_t>(b_max, static_cast<int64_t>(tasks.size() - first));
    char* host = static_cast<char*>(im.pinned[0].ptr);
    for (int64_t b = 0; b < nb; ++b) {
      const Task& t = tasks[first + static_cast<size_t>(b)];
      pread_all(t.path, t.offset, t.nbytes, host + raw_bytes * b);
      if (scaled) {
        pread_all(t.scale_path, t.scale_offset, t.scale_nbytes,
                  static_cast<char*>(im.scale_pinned[0].ptr) + scale_bytes * b);
      }
    }
    check_cuda(cudaMemcpyAsync(im.raw[0].ptr, host, raw_bytes * nb, cudaMemcpyHostToDevice, im.compute_stream),
               "cudaMemcpyAsync(H2D)");
    if (scaled) {
      check_cuda(cudaMemcpyAsync(im.raw_scale[0].ptr, im.scale_pinned[0].ptr, scale_bytes * nb,
                                 cudaMemcpyHostToDevice, im.compute_stream), "cudaMemcpyAsync(H2D scale)");
    }
    check_cuda(cudaMemsetAsync(im.amax.ptr, 0, sizeof(unsigned int) * nb, im.compute_stream), "cudaMemsetAsync");
    for (int64_t b = 0; b < nb; ++b) {
      const void* in = static_cast<const char*>(im.raw[0].ptr) + raw_bytes * b;
      const void* sc = scaled ? static_cast<const char*>(im.raw_scale[0].ptr) + scale_bytes * b : nullptr;
      launch_widen(t0, fp64, in, sc, im.matrix.ptr, n_el * b, static_cast<unsigned int*>(im.amax.ptr) + b,
                   im.compute_stream);
    }
    check_cuda(cudaGetLastError(), "widen_kernel launch");
    // Row-major W is column-major W^T (ld = cols); the Gram matrix on the smaller side, full (both triangles).
    if (fp64) {
      const double one = 1.0, zero = 0.0;
      check_cublas(cublasDgemmStridedBatched(im.cublas, op_a, op_b, nk, nk, kk, &one,
                                             static_cast<const double*>(im.matrix.ptr), lda, n_el,
                                             static_cast<const double*>(im.matrix.ptr), lda, n_el, &zero,
                                             static_cast<double*>(im.gram.ptr), nk, k * k, static_cast<int>(nb)),
                   "cublasDgemmStridedBatched");
    } else {
      const float one = 1.0f, zero = 0.0f;
      check_cublas(cublasSgemmStridedBatched(im.cublas, op_a, op_b, nk, nk, kk, &one,
                                             static_cast<const float*>(im.matrix.ptr), lda, n_el,
                                             static_cast<const float*>(im.matrix.ptr), lda, n_el, &zero,
                                             static_cast<float*>(im.gram.ptr), nk, k * k, static_cast<int>(nb)),
                   "cublasSgemmStridedBatched");
    }
    size_t dev_ws = 0, host_ws = 0;
    check_cusolver(cusolverDnXsyevBatched_bufferSize(im.solver, im.params, CUSOLVER_EIG_MODE_NOVECTOR,
                                                     CUBLAS_FILL_MODE_LOWER, k, dt, im.gram.ptr, k, dt, im.eig.ptr,
                                                     dt, &dev_ws, &host_ws, nb),
                   "cusolverDnXsyevBatched_bufferSize");
    if (dev_ws > im.work.bytes) check_cuda(cudaStreamSynchronize(im.compute_stream), "cudaStreamSynchronize");
    im.work.reserve(std::max<size_t>(dev_ws, 1));
    if (im.host_work.size() < host_ws) im.host_work.resize(host_ws);
    check_cusolver(cusolverDnXsyevBatched(im.solver, im.params, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_LOWER, k,
                                          dt, im.gram.ptr, k, dt, im.eig.ptr, dt, im.work.ptr, dev_ws,
                                          host_ws ? im.host_work.data() : nullptr, host_ws,
                                          static_cast<int*>(im.info.ptr), nb),
                   "cusolverDnXsyevBatched");
    char* out = static_cast<char*>(im.eig_host[0].ptr);
    const size_t eig_bytes = static_cast<size_t>(k) * esize * nb;
    check_cuda(cudaMemcpyAsync(out, im.eig.ptr, eig_bytes, cudaMemcpyDeviceToHost, im.compute_stream),
               "cudaMemcpyAsync(D2H)");
    check_cuda(cudaMemcpyAsync(out + eig_bytes, im.amax.ptr, 4 * nb, cudaMemcpyDeviceToHost, im.compute_stream),
               "cudaMemcpyAsync(D2H)");
    check_cuda(cudaMemcpyAsync(out + eig_bytes + 4 * nb, im.info.ptr, 4 * nb, cudaMemcpyDeviceToHost,
                               im.compute_stream), "cudaMemcpyAsync(D2H)");
    check_cuda(cudaStreamSynchronize(im.compute_stream), "cudaStreamSynchronize");
    for (int64_t b = 0; b < nb; ++b) {
      Result& r = results[first + static_cast<size_t>(b)];
      r.eigenvalues.resize(static_cast<size_t>(k));
      for (int64_t j = 0; j < k; ++j) {
        r.eigenvalues[static_cast<size_t>(j)] =
            fp64 ? reinterpret_cast<const double*>(out)[b * k + j] : reinterpret_cast<const float*>(out)[b * k + j];
      }
      unsigned int bits;
      float amax;
      std::memcpy(&bits, out + eig_bytes + 4 * b, 4);
      std::memcpy(&amax, &bits, 4);
      r.amax = amax;
      std::memcpy(&r.info, out + eig_bytes + 4 * nb + 4 * b, 4);
    }
  }
  } catch (...) {
    // nothing queued may still read the pinned buffers that the next run() reuses
    cudaStreamSynchronize(im.compute_stream);
    throw;
  }
  return results;
#endif
}

int device_count() {
  int n = 0;
  check_cuda(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  return n;
}

int runtime_version() {
  int v = 0;
  check_cuda(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}

int cusolver_version() {
  int major = 0, minor = 0, patch = 0;
  check_cusolver(cusolverGetProperty(MAJOR_VERSION, &major), "cusolverGetProperty(MAJOR_VERSION)");
  check_cusolver(cusolverGetProperty(MINOR_VERSION, &minor), "cusolverGetProperty(MINOR_VERSION)");
  check_cusolver(cusolverGetProperty(PATCH_LEVEL, &patch), "cusolverGetProperty(PATCH_LEVEL)");
  return major * 1000 + minor * 100 + patch;
}

int cusolver_header_version() { return CUSOLVER_VERSION; }

}  // namespace spectrum_fast

// The band eigensolver on the host: each matrix by a team of std::threads running band_solver.h with real
// barriers, so the CPU tests exercise the same phases and synchronisation as the GPU's thread blocks.
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "band_solver_api.h"

#define SF_FN
#define SF_NS host
#include "band_solver.h"

namespace spectrum_fast {
namespace {

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != gen; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  int64_t generation_ = 0;
};

struct Shared {
  // stride: the scratch vectors' length per group, b for the chase (as on a GPU, so that an index past b
  // would spill into the next crew's vectors here too, and show in the tests)
  Shared(int size, int lanes, int stride = host::kMaxBand)
      : barrier(size), partial(size), lane_partial(size), v(stride * (size / lanes)), w(stride * (size / lanes)),
        y(stride * (size / lanes)), u(stride * (size / lanes)), stride(stride) {
    for (int g = 0; g < size / lanes; ++g) group_barriers.emplace_back(new Barrier(lanes));
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Barrier>> group_barriers;
  std::vector<double> partial, lane_partial, v, w, y, u;
  int stride;
};

// A team of `size` threads in groups of `lanes` (a warp's worth in the tests that mirror a GPU block).
struct HostTeam {
  Shared* sh;
  int rank_, size_, lanes_;
  int rank() const { return rank_; }
  int size() const { return size_; }
  void sync() { sh->barrier.wait(); }
  double sum(double x) {
    sh->partial[rank_] = x;
    sync();
    double s = 0.0;
    for (int i = 0; i < size_; ++i) s += sh->partial[i];
    sync();  // nobody writes partial[] again before everyone has read it
    return s;
  }
  int group() const { return rank_ / lanes_; }
  int groups() const { return size_ / lanes_; }
  int lane() const { return rank_ % lanes_; }
  int lanes() const { return lanes_; }
  void group_sync() {
    if (lanes_ > 1) sh->group_barriers[group()]->wait();
  }
  double group_sum(double x) {
    if (lanes_ == 1) return x;
    Barrier& barrier = *sh->group_barriers[group()];
    sh->lane_partial[rank_] = x;
    barrier.wait();
    double s = 0.0;
    for (int i = group() * lanes_; i < (group() + 1) * lanes_; ++i) s += sh->lane_partial[i];
    barrier.wait();
    return s;
  }
  double* v() { return sh->v.data(); }
  double* w() { return sh->w.data(); }
  double* y() { return sh->y.data(); }
  double* u() { return sh->u.data(); }
  int scratch_stride() const { return sh->stride; }
};

}  // namespace

void check_band_args(int64_t batch, int64_t n, int64_t b, int64_t ld, int64_t stride, int64_t threads) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("band eigensolver: " + what); };
  if (batch < 1) fail("batch must be at least 1, got " + std::to_string(batch));
  if (n < 1) fail("n must be at least 1, got " + std::to_string(n));
  if (b < 1 || b > host::kMaxBand) {
    fail("bandwidth must be in 1.." + std::to_string(host::kMaxBand) + ", got " + std::to_string(b));
  }
  if (ld < 2 * b) fail("ld must be at least 2 * bandwidth = " + std::to_string(2 * b) + ", got " + std::to_string(ld));
  if (stride < n * ld) fail("stride must be at least n * ld = " + std::to_string(n * ld) + ", got " + std::to_string(stride));
  if (threads < 1 || threads > 1024) fail("threads must be in 1..1024, got " + std::to_string(threads));
}

namespace {

template <typename Body>
void run_team(int size, int lanes, Shared& sh, Body&& body) {
  std::vector<std::thread> team;
  for (int r = 1; r < size; ++r) team.emplace_back([&, r] { HostTeam t{&sh, r, size, lanes}; body(t); });
  HostTeam t0{&sh, 0, size, lanes};
  body(t0);
  for (auto& th : team) th.join();
}

void check_lanes(int64_t threads, int64_t lanes, const char* what) {
  if (lanes < 1 || threads % lanes != 0) {
    throw std::invalid_argument(std::string(what) + ": lanes must divide threads = " + std::to_string(threads) +
                                ", got " + std::to_string(lanes));
  }
}

template <int Variant>
void chase_all(double* bands, int64_t batch, int64_t stride, int64_t n, int64_t b, int64_t ld, double* w,
               int threads, int lanes) {
  std::vector<double> d(n), e(n);
  for (int64_t m = 0; m < batch; ++m) {
    double* a = bands + m * stride;
    double* out = w + m * n;
    Shared sh(threads, lanes, static_cast<int>(b));
    run_team(threads, lanes, sh, [&](HostTeam& t) {
      host::chase<Variant>(t, a, n, b, ld, d.data(), e.data());
      double lo, hi, pivmin;
      host::bounds(d.data(), e.data(), n, &lo, &hi, &pivmin);
      for (int64_t j = t.rank(); j < n; j += t.size()) out[j] = host::eigenvalue(d.data(), e.data(), n, j, lo, hi, pivmin);
    });
  }
}

}  // namespace

void check_panel_args(int64_t batch, int64_t m, int64_t nb, int64_t lda, int64_t stride, int64_t threads) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("panel QR: " + what); };
  if (batch < 1) fail("batch must be at least 1, got " + std::to_string(batch));
  if (m < 1 || nb < 1) fail("the panel must not be empty, got " + std::to_string(m) + " x " + std::to_string(nb));
  if (lda < m) fail("lda must be at least m = " + std::to_string(m) + ", got " + std::to_string(lda));
  if (stride < nb * lda) fail("stride must be at least nb * lda = " + std::to_string(nb * lda) + ", got " + std::to_string(stride));
  if (threads < 1 || threads > 1024) fail("threads must be in 1..1024, got " + std::to_string(threads));
}

void check_chase_variant(int64_t variant) {
  if (variant < 0 || variant >= host::kChaseVariants) {
    throw std::invalid_argument("band eigensolver: variant must be in 0.." + std::to_string(host::kChaseVariants - 1) +
                                ", got " + std::to_string(variant));
  }
}

void panel_qr_host(double* panels, int64_t batch, int64_t stride, int64_t m, int64_t nb, int64_t lda, double* tau,
                   int64_t threads, int64_t lanes) {
  check_panel_args(batch, m, nb, lda, stride, threads);
  check_lanes(threads, lanes, "panel QR");
  for (int64_t i = 0; i < batch; ++i) {
    Shared sh(static_cast<int>(threads), static_cast<int>(lanes));
    double* p = panels + i * stride;
    double* ti = tau + i * nb;
    run_team(static_cast<int>(threads), static_cast<int>(lanes), sh,
             [&](HostTeam& t) { host::panel_qr(t, p, m, nb, lda, ti); });
  }
}

void band_eigenvalues_host(double* bands, int64_t batch, int64_t stride, int64_t n, int64_t b, int64_t ld,
                           double* w, int64_t threads, int64_t lanes, int64_t variant) {
  check_band_args(batch, n, b, ld, stride, threads);
  check_lanes(threads, lanes, "band eigensolver");
  check_chase_variant(variant);
  if ((variant & host::kCrews) && threads / lanes > host::kMaxCrews) {
    throw std::invalid_argument("band eigensolver: at most " + std::to_string(host::kMaxCrews) +
                                " crews (threads / lanes), got " + std::to_string(threads / lanes));
  }
  const int th = static_cast<int>(threads), ln = static_cast<int>(lanes);
  host::with_chase_variant(variant, [&](auto v) { chase_all<decltype(v)::value>(bands, batch, stride, n, b, ld, w, th, ln); });
}

}  // namespace spectrum_fast

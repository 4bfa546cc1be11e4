// Race check of the band solver's phases (built with -fsanitize=thread by tests/test_band_solver_races.py).
// The host executor runs band_solver.h with the partition of a GPU block: a team of threads in groups of
// `lanes` (32: a warp), each phase split by rank, phases separated by barriers; with kCrews, each group
// chasing its own sweep, the crews kSweepLag steps apart. A read or write of one thread that a barrier
// does not order against another's write is a data race here, and would be one in the CUDA kernel too.
// Prints one line per case: its maximum eigenvalue difference between chase variants (must be tiny) and
// whether every variant equals, bit for bit, its twin without kBatched and kCrews (must be 1).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/band_solver_host.cpp"

namespace {

std::vector<double> random_band(int64_t n, int64_t b, int64_t ld, unsigned seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  std::vector<double> a(n * ld, 0.0);
  for (int64_t q = 0; q < n; ++q) {
    for (int64_t p = 0; p <= b && q + p < n; ++p) a[q * ld + p] = normal(gen);
  }
  return a;
}

std::vector<double> dense(int64_t count, unsigned seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  std::vector<double> a(count);
  for (double& x : a) x = normal(gen);
  return a;
}

}  // namespace

int main() {
  // n, b, the team (threads in groups of lanes); the crew variants (kCrews) run threads / lanes crews of
  // `lanes` threads each, one sweep per crew, kSweepLag steps apart
  struct Case {
    int64_t n, b, threads, lanes;
  };
  const Case cases[] = {{50, 32, 32, 32}, {70, 64, 64, 32}, {40, 8, 8, 4}, {33, 5, 3, 1},
                        {75, 8, 16, 4}, {120, 4, 8, 1}, {66, 32, 64, 32}};
  const int crews = spectrum_fast::host::kCrews, lane_dot = spectrum_fast::host::kLaneDot;
  int bad = 0;
  for (const Case& c : cases) {
    const int64_t ld = 2 * c.b;
    // team: the whole team takes each step (variants 0-3); one: a team of one group, which is what each crew
    // is; crews: variants 4-7, a crew per group. Crews must give one group's numbers bit for bit.
    std::vector<std::vector<double>> team(4), one(4), crew(4);
    auto solve = [&](int variant, int64_t threads) {
      std::vector<double> a = random_band(c.n, c.b, ld, static_cast<unsigned>(c.n + c.b)), w(c.n);
      spectrum_fast::band_eigenvalues_host(a.data(), 1, c.n * ld, c.n, c.b, ld, w.data(), threads, c.lanes, variant);
      return w;
    };
    for (int v = 0; v < 4; ++v) {
      team[v] = solve(v, c.threads);
      one[v] = solve(v, c.lanes);
      crew[v] = solve(v | crews, c.threads);
    }
    double diff = 0.0, top = 0.0;
    for (int64_t j = 0; j < c.n; ++j) {
      top = std::fmax(top, std::fabs(team[0][j]));
      for (int v = 0; v < 4; ++v) {
        diff = std::fmax(diff, std::fmax(std::fabs(team[v][j] - team[0][j]), std::fabs(crew[v][j] - team[0][j])));
      }
    }
    bool twins = true;  // kBatched changes no bit, nor do crews
    for (int v = 0; v < 4; ++v) twins = twins && team[v] == team[v & lane_dot] && crew[v] == one[v & lane_dot];
    std::printf("case n=%ld b=%ld threads=%ld lanes=%ld variant_diff=%.3e twins=%d\n", static_cast<long>(c.n),
                static_cast<long>(c.b), static_cast<long>(c.threads), static_cast<long>(c.lanes), diff / top, twins);
    if (!(diff <= 1e-13 * top) || !twins) bad = 1;
  }
  // the panel QR with a GPU block's partition (64 threads: two warps) against groups of one thread
  const int64_t m = 50, nb = 12, lda = 52;
  std::vector<double> panel[2], tau[2];
  const int64_t lanes[2] = {32, 1};
  for (int i = 0; i < 2; ++i) {
    panel[i] = dense(nb * lda, 7);  // column-major, nb columns of lda
    tau[i].assign(nb, 0.0);
    spectrum_fast::panel_qr_host(panel[i].data(), 1, nb * lda, m, nb, lda, tau[i].data(), 64, lanes[i]);
  }
  double pdiff = 0.0;
  for (size_t j = 0; j < panel[0].size(); ++j) pdiff = std::fmax(pdiff, std::fabs(panel[0][j] - panel[1][j]));
  for (int64_t j = 0; j < nb; ++j) pdiff = std::fmax(pdiff, std::fabs(tau[0][j] - tau[1][j]));
  std::printf("panel m=%ld nb=%ld lanes 32 vs 1: diff=%.3e\n", static_cast<long>(m), static_cast<long>(nb), pdiff);
  if (!(pdiff <= 1e-12)) bad = 1;
  return bad;
}

// Eigenvalues of symmetric band matrices: stage 2 and 3 of a two-stage eigensolver.
//
// Stage 1 (dense to band, matrix products) runs in torch (spectrum_fast/twostage.py). This file is the rest,
// written once for two executors: a CUDA thread block per matrix (band_solver.cu, SF_FN = __device__) and a
// team of std::threads on the host (band_solver_host.cpp, SF_FN empty), which the CPU tests run. Both
// include this header inside their own namespace (SF_NS), so the two instantiations never meet.
//
// A team is a fixed set of threads that run the same code: rank() / size(), sync() (a barrier), sum(x)
// (every thread's x added in a fixed order, the total returned to all; a barrier), and shared scratch
// vectors v(), w(), y(), u() of at least b doubles (per group, scratch_stride() apart, for kCrews). Work inside one phase is split by rank and touches disjoint
// memory; phases are separated by sync(). A team is also split into groups (a warp on the GPU; on the host
// `lanes` threads with their own barrier, 32 in the tests that mirror a GPU's blocks): group() / groups(),
// lane() / lanes(), and group_sum(x), the group's total in every lane (a barrier of the group).
//
// Storage: the lower triangle of a symmetric n x n matrix in band form, column-major by column:
//   A(p, q), p >= q, at a[q * ld + (p - q)],   ld >= 2 * b (the bulges reach 2b - 1 below the diagonal).
// On entry A has bandwidth b (offsets b + 1 .. ld - 1 must be zero); it is overwritten.
//
// Stage 2 (chase): band to tridiagonal by Householder bulge chasing, one column at a time (the scheme of
// LAPACK's dsytrd_sb2st): sweep i annihilates column i below its subdiagonal with a reflector H on rows
// i+1 .. i+b, applies it to the diagonal block from both sides and to the block below from the right,
// which creates a bulge; the bulge's first column is annihilated by the next reflector, and so on down
// the matrix. What stays of each bulge is removed by the next sweeps. O(n^2 b) flops, n^2 / (2b) steps.
// Stage 3 (bisection): every eigenvalue of the tridiagonal matrix by Sturm counts, one per thread.
// Inputs should be scaled to max |a| ~ 1 (the callers divide by it), so that squares neither overflow nor
// underflow in ways that matter.
//
// The result depends only on the matrix and the team size: no atomics, fixed summation order.

#ifndef SF_FN
#error "define SF_FN (__device__ or empty) and SF_NS before including band_solver.h"
#endif

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace spectrum_fast {
namespace SF_NS {

constexpr int kMaxBand = 128;

SF_FN inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// A(p, q) of the symmetric band matrix, either triangle
SF_FN inline double sym(const double* a, int64_t ld, int64_t p, int64_t q) {
  return p >= q ? a[q * ld + (p - q)] : a[p * ld + (q - p)];
}

// A reflector as LAPACK's dlarfg makes it: (I - tau v v^T) x = beta e_1, v = (1, x[1:] * scale).
struct Reflector {
  double tau, beta, scale;
};

// The reflector of x[0 .. len) (read only). x[0] is read before the barrier in t.sum(), so a caller may
// overwrite x as soon as this returns.
template <class Team>
SF_FN Reflector householder(Team& t, const double* x, int64_t len) {
  const double alpha = x[0];
  double part = 0.0;
  for (int64_t r = 1 + t.rank(); r < len; r += t.size()) part += x[r] * x[r];
  const double ss = t.sum(part);
  Reflector h{0.0, alpha, 0.0};  // nothing below x[0]: H = I
  if (ss > 0.0) {
    h.beta = -copysign(sqrt(alpha * alpha + ss), alpha);
    h.tau = (h.beta - alpha) / h.beta;
    h.scale = 1.0 / (alpha - h.beta);
  }
  return h;
}

// Variants of the chase (bit flags; the GPU bench times them side by side, the default is twostage.py's):
// - kLaneDot: the left update's dot products one thread per column (on a GPU, no chain of warp reductions,
//   one per column, but strided loads), its subtraction moved into phase C (no extra barrier);
// - kBatched: the read-modify-write loops of phase C take four entries at a time, loads before stores, so
//   that a thread has four loads in flight (the entries are distinct; a compiler cannot know that). The
//   arithmetic is the same (minus_product in both loops): kBatched changes no bit, kLaneDot the order of
//   one sum.
constexpr int kLaneDot = 1;
constexpr int kBatched = 2;
constexpr int kCrews = 4;  // several sweeps at once, one per group (chase() below)
constexpr int kChaseVariants = 8;
constexpr int kMaxCrews = 8;

// f(std::integral_constant<int, V>()) for the chase variant V = variant (0 .. kChaseVariants - 1, checked by
// the caller): the one place where a run-time variant becomes a template argument. Host code.
template <class F>
inline void with_chase_variant(int64_t variant, F&& f) {
  static_assert(kChaseVariants == 8, "one case per variant");
  switch (variant) {
    case 0: f(std::integral_constant<int, 0>()); break;
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    default: f(std::integral_constant<int, 7>()); break;
  }
}

// x - p q, rounded once on a GPU (an explicit fused multiply-add, so that the compiler's contraction of the
// expression around it cannot differ between the batched and the plain loop), twice on the host (no FMA
// unit assumed there; the host tests compare with float64, never with a GPU's bits).
SF_FN inline double minus_product(double x, double p, double q) {
#ifdef __CUDA_ARCH__
  return fma(-p, q, x);
#else
  return x - p * q;
#endif
}
SF_FN inline double plus_product(double x, double p, double q) { return minus_product(x, -p, q); }

// The entry (r, c) of v z^T + z v^T, z = w - gamma v, given zc = z_c: written out rounding by rounding, so
// that a GPU's two loops (and crews of any size) round it the same way whatever ptxas would contract.
SF_FN inline double rank2_entry(double vr, double wr, double vc, double zc, double gamma) {
  return plus_product(plus_product(wr, -gamma, vr) * vc, vr, zc);
}

// For i = rank, rank + size, ... < count with at(i, off, p, q) true: a[off] = minus_product(a[off], p, q).
// Batched as above.
template <bool Batched, class At>
SF_FN inline void subtract(double* a, int count, int rank, int size, At at) {
  if constexpr (!Batched) {
    for (int i = rank; i < count; i += size) {
      int64_t off;
      double p, q;
      if (at(i, off, p, q)) a[off] = minus_product(a[off], p, q);
    }
  } else {
    for (int i0 = rank; i0 < count; i0 += 4 * size) {
      int64_t off[4];
      double p[4], q[4], x[4];
      bool keep[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int i = i0 + k * size;
        keep[k] = i < count && at(i, off[k], p[k], q[k]);
        if (keep[k]) x[k] = a[off[k]];
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (keep[k]) a[off[k]] = minus_product(x[k], p[k], q[k]);
      }
    }
  }
}

// A sweep's position: its next step's reflector rows J = [j0, j1], taken from column col, applied from the
// left to the columns Q = [pc0 + 1, pc1] (none in the first step).
struct Sweep {
  int64_t col, j0, j1, pc0, pc1;
};

SF_FN inline Sweep sweep_start(int64_t i, int64_t n, int64_t b) { return Sweep{i, i + 1, min64(i + b, n - 1), 0, -1}; }
SF_FN inline bool sweep_active(const Sweep& s) { return s.j1 > s.j0; }
SF_FN inline void sweep_advance(Sweep& s, int64_t n, int64_t b) {
  s.col = s.j0;
  s.pc0 = s.j0;
  s.pc1 = s.j1;
  s.j0 = s.j1 + 1;
  s.j1 = min64(s.j1 + b, n - 1);
}

// One step of a sweep, by the team t: the reflector of A(J, col), applied to A(J, Q) from the left, to the
// diagonal block D = A(J, J) from both sides and to the block below, A(R, J), from the right (which makes
// the next bulge). Touches rows [j0, j1 + b] of columns [j0 - b, j1] only.
template <int Variant, class Team>
SF_FN void chase_step(Team& t, double* a, int64_t n, int64_t b, int64_t ld, const Sweep& sw) {
  constexpr bool lane_dot = (Variant & kLaneDot) != 0, batched = (Variant & kBatched) != 0;
  const int rank = t.rank(), size = t.size();
  const int group = t.group(), groups = t.groups(), lane = t.lane(), lanes = t.lanes();
  double* v = t.v();
  double* w = t.w();
  double* y = t.y();
  double* u = t.u();
  const int64_t col = sw.col, j0 = sw.j0, j1 = sw.j1, pc0 = sw.pc0, pc1 = sw.pc1;
  const int64_t len = j1 - j0 + 1;
  double* x = a + col * ld + (j0 - col);  // A(J, col), contiguous
  const Reflector h = householder(t, x, len);
  const double tau = h.tau;
  for (int64_t r = rank; r < len; r += size) {
    v[r] = r == 0 ? 1.0 : x[r] * h.scale;
    x[r] = r == 0 ? h.beta : 0.0;  // each thread reads its x[r] before writing it
  }
  t.sync();
  if (tau != 0.0) {  // the same decision in every thread (tau is shared)
    const int64_t r0 = j1 + 1, r1 = min64(j1 + b, n - 1), rows = r1 - j1;  // the block below: rows R
    const int64_t q0 = pc0 + 1;                                             // the left columns Q
    const int nr = static_cast<int>(rows), nl = static_cast<int>(len);      // <= kMaxBand: 32-bit division
    const int nq = static_cast<int>(pc1 - pc0);
    // phase A, three disjoint regions read (the left one written too) with v only
    if (lane_dot) {  // u = tau A(J, Q)^T v, a thread per column; A(J, Q) -= v u^T in phase C
      for (int q = rank; q < nq; q += size) {
        const double* c = a + (q0 + q) * ld + (j0 - q0 - q);
        double s = 0.0;
        for (int64_t r = 0; r < len; ++r) s += v[r] * c[r];
        u[q] = tau * s;
      }
    } else {
      // left: A(J, q) -= tau v (v^T A(J, q)), a group per column (on a GPU, a warp reads a column's
      // consecutive entries together, and the dot product needs no barrier)
      for (int64_t q = q0 + group; q <= pc1; q += groups) {
        double* c = a + q * ld + (j0 - q);
        double s = 0.0;
        for (int64_t r = lane; r < len; r += lanes) s += v[r] * c[r];
        s = tau * t.group_sum(s);
        for (int64_t r = lane; r < len; r += lanes) c[r] = minus_product(c[r], s, v[r]);
      }
    }
    for (int64_t r = rank; r < len; r += size) {  // w = tau D v, D = A(J, J)
      double s = 0.0;
      for (int64_t c = 0; c < len; ++c) s += sym(a, ld, j0 + r, j0 + c) * v[c];
      w[r] = tau * s;
    }
    for (int64_t r = rank; r < rows; r += size) {  // y = A(R, J) v
      double s = 0.0;
      for (int64_t c = 0; c < len; ++c) s += a[(j0 + c) * ld + (r0 + r - j0 - c)] * v[c];
      y[r] = s;
    }
    // no barrier here: each thread reads back only its own w[r], and sum()'s barrier orders phase A
    // before phase C (tests/native/race_check.cpp under ThreadSanitizer)
    double part = 0.0;
    for (int64_t r = rank; r < len; r += size) part += v[r] * w[r];
    const double gamma = 0.5 * tau * t.sum(part);
    // phase C: D -= v z^T + z v^T (lower triangle), z = w - gamma v; A(R, J) -= tau y v^T
    if (batched) {
      subtract<true>(a, nl * nl, rank, size, [&](int idx, int64_t& off, double& p, double& q) {
        const int r = idx % nl, c = idx / nl;
        if (r < c) return false;
        const double vc = v[c], zc = plus_product(w[c], -gamma, vc);
        off = (j0 + c) * ld + (r - c);
        p = 1.0;  // x - 1 * s is x - s exactly
        q = rank2_entry(v[r], w[r], vc, zc, gamma);
        return true;
      });
    } else {
      for (int64_t c = group; c < len; c += groups) {  // a group per column, as above
        const double vc = v[c], zc = plus_product(w[c], -gamma, vc);
        double* dc = a + (j0 + c) * ld;
        for (int64_t r = c + lane; r < len; r += lanes) {
          dc[r - c] = minus_product(dc[r - c], 1.0, rank2_entry(v[r], w[r], vc, zc, gamma));
        }
      }
    }
    subtract<batched>(a, nr * nl, rank, size, [&](int idx, int64_t& off, double& p, double& q) {
      const int r = idx % nr, c = idx / nr;
      off = (j0 + c) * ld + (r0 + r - j0 - c);
      p = tau * y[r];
      q = v[c];
      return true;
    });
    if (lane_dot) {
      subtract<batched>(a, nq * nl, rank, size, [&](int idx, int64_t& off, double& p, double& q) {
        const int r = idx % nl, k = idx / nl;
        off = (q0 + k) * ld + (j0 - q0 - k) + r;
        p = u[k];
        q = v[r];
        return true;
      });
    }
    t.sync();
  }
}

// A crew: one group of a team (a warp) acting as a team of its own, with its own scratch vectors (the team's
// hold groups() * scratch_stride() each, scratch_stride() >= b) and the group's barrier; its sum() ends with
// that barrier, as a team's does, so that the phases of a step are ordered as they are for a whole team.
template <class Team>
struct Crew {
  Team& t;
  SF_FN int rank() const { return t.lane(); }
  SF_FN int size() const { return t.lanes(); }
  SF_FN void sync() { t.group_sync(); }
  SF_FN double sum(double x) {
    const double s = t.group_sum(x);
    t.group_sync();
    return s;
  }
  SF_FN int group() const { return 0; }
  SF_FN int groups() const { return 1; }
  SF_FN int lane() const { return t.lane(); }
  SF_FN int lanes() const { return t.lanes(); }
  SF_FN double group_sum(double x) { return t.group_sum(x); }
  SF_FN double* v() { return t.v() + t.group() * t.scratch_stride(); }
  SF_FN double* w() { return t.w() + t.group() * t.scratch_stride(); }
  SF_FN double* y() { return t.y() + t.group() * t.scratch_stride(); }
  SF_FN double* u() { return t.u() + t.group() * t.scratch_stride(); }
};

// Consecutive sweeps started this many steps apart never touch the same entry at the same time, and every
// entry still sees its updates in the order of one sweep after another: step s of sweep i + 1 overlaps
// steps s - 1 .. s + 2 of sweep i only (chase_step's rows and columns), which are done by then.
constexpr int64_t kSweepLag = 3;

template <class Team>
SF_FN void tridiagonal(Team& t, const double* a, int64_t n, int64_t ld, double* d, double* e) {
  for (int64_t q = t.rank(); q < n; q += t.size()) {
    d[q] = a[q * ld];
    if (q + 1 < n) e[q] = a[q * ld + 1];
  }
  t.sync();
}

// Band (ld, n as described above) to tridiagonal: d[0..n-1] the diagonal, e[0..n-2] the subdiagonal.
// Without kCrews the whole team takes each step, one sweep after another. With kCrews each group (a warp on
// a GPU) is a crew that takes its own sweeps, sweep i by crew i % groups(): a sweep starts once its crew is
// free and the sweep before it started kSweepLag steps earlier; all crews step together, a team barrier
// between steps. The numbers are those of one crew alone (the same steps, in an order that changes no
// entry's sequence of updates), and a chase takes about 1 / groups() of the steps.
template <int Variant, class Team>
SF_FN void chase(Team& t, double* a, int64_t n, int64_t b, int64_t ld, double* d, double* e) {
  if ((Variant & kCrews) == 0) {
    for (int64_t i = 0; i + 2 < n && b > 1; ++i) {
      for (Sweep sw = sweep_start(i, n, b); sweep_active(sw); sweep_advance(sw, n, b)) chase_step<Variant>(t, a, n, b, ld, sw);
    }
    tridiagonal(t, a, n, ld, d, e);
    return;
  }
  // every thread follows every crew's schedule (a few integers each), so crews need not tell each other
  const int crews = t.groups(), me = t.group();
  Crew<Team> crew{t};
  Sweep sw[kMaxCrews];
  int64_t sweep[kMaxCrews], started[kMaxCrews];  // each crew's current (or last) sweep and when it started
  bool busy[kMaxCrews];
  const int64_t sweeps = b > 1 && n > 2 ? n - 2 : 0;
  for (int c = 0; c < crews; ++c) {
    sweep[c] = c - crews;  // "the sweep before its first"
    started[c] = INT64_MIN / 2;
    busy[c] = false;
  }
  for (int64_t now = 0;; ++now) {
    bool any = false;
    for (int c = 0; c < crews; ++c) {
      const int64_t next = sweep[c] + crews;
      const int before = (c + crews - 1) % crews;  // the crew of sweep next - 1
      if (!busy[c] && next < sweeps && (next == 0 || (sweep[before] == next - 1 && started[before] <= now - kSweepLag))) {
        sw[c] = sweep_start(next, n, b);
        sweep[c] = next;
        started[c] = now;
        busy[c] = true;
      }
      any = any || busy[c] || next < sweeps;
    }
    if (!any) break;
    if (busy[me]) chase_step<Variant>(crew, a, n, b, ld, sw[me]);
    t.sync();
    for (int c = 0; c < crews; ++c) {
      if (!busy[c]) continue;
      sweep_advance(sw[c], n, b);
      busy[c] = sweep_active(sw[c]);
    }
  }
  tridiagonal(t, a, n, ld, d, e);
}

// Stage 1's panel factorization: Householder QR of the m x nb column-major panel p (leading dimension lda),
// left as LAPACK's dgeqrf leaves it: R on and above the diagonal, the reflectors' v below it (v[0] = 1 not
// stored) and tau[j] (0 where a column is already zero below the diagonal: H = I). One group per trailing
// column, so the dot product and the update of a column need no barrier.
template <class Team>
SF_FN void panel_qr(Team& t, double* p, int64_t m, int64_t nb, int64_t lda, double* tau) {
  const int rank = t.rank(), size = t.size();
  const int group = t.group(), groups = t.groups(), lane = t.lane(), lanes = t.lanes();
  const int64_t steps = min64(m, nb);
  for (int64_t j = 0; j < steps; ++j) {
    double* x = p + j * lda + j;
    const int64_t len = m - j;
    const Reflector h = householder(t, x, len);
    const double tj = h.tau;
    for (int64_t r = 1 + rank; r < len; r += size) x[r] *= h.scale;  // v below the diagonal
    t.sync();
    if (tj != 0.0) {
      for (int64_t c = j + 1 + group; c < nb; c += groups) {  // y -= tau v (v^T y), v[0] = 1
        double* y = p + c * lda + j;
        double s = 0.0;
        for (int64_t r = lane; r < len; r += lanes) s += (r == 0 ? 1.0 : x[r]) * y[r];
        s = tj * t.group_sum(s);
        for (int64_t r = lane; r < len; r += lanes) y[r] -= s * (r == 0 ? 1.0 : x[r]);
      }
    }
    t.sync();
    if (rank == 0) {
      x[0] = h.beta;
      tau[j] = tj;
    }
  }
  for (int64_t j = steps + rank; j < nb; j += size) tau[j] = 0.0;  // m < nb: no reflector there
  t.sync();
}

// Number of eigenvalues of the tridiagonal (d, e) below x (Sturm count; LAPACK dlaebz's pivmin guard).
SF_FN inline int64_t count_below(const double* d, const double* e, int64_t n, double x, double pivmin) {
  int64_t count = 0;
  double q = d[0] - x;
  if (fabs(q) < pivmin) q = -pivmin;
  if (q < 0.0) ++count;
  for (int64_t i = 1; i < n; ++i) {
    q = d[i] - x - e[i - 1] * e[i - 1] / q;
    if (fabs(q) < pivmin) q = -pivmin;
    if (q < 0.0) ++count;
  }
  return count;
}

// The j-th smallest eigenvalue (j = 0 .. n-1) of the tridiagonal (d, e) by bisection, to about
// 2 eps max(|lo|, |hi|) of the Gershgorin interval [lo, hi]; pivmin as in count_below.
SF_FN inline double eigenvalue(const double* d, const double* e, int64_t n, int64_t j, double lo, double hi,
                               double pivmin) {
  const double tol = 2.0 * DBL_EPSILON * fmax(fabs(lo), fabs(hi)) + pivmin;
  for (int it = 0; it < 200 && hi - lo > tol; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi) break;
    if (count_below(d, e, n, mid, pivmin) > j) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return 0.5 * (lo + hi);
}

// Gershgorin interval (widened a little) and pivmin of the tridiagonal (d, e).
SF_FN inline void bounds(const double* d, const double* e, int64_t n, double* lo, double* hi, double* pivmin) {
  double l = d[0], h = d[0], emax2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double r = (i > 0 ? fabs(e[i - 1]) : 0.0) + (i + 1 < n ? fabs(e[i]) : 0.0);
    l = fmin(l, d[i] - r);
    h = fmax(h, d[i] + r);
    if (i + 1 < n) emax2 = fmax(emax2, e[i] * e[i]);
  }
  // a multiple of the identity (the zero matrix included) is exact: an empty interval
  const double pad = h > l ? 2.0 * DBL_EPSILON * fmax(fabs(l), fabs(h)) * static_cast<double>(n) + DBL_MIN : 0.0;
  *lo = l - pad;
  *hi = h + pad;
  *pivmin = DBL_MIN * fmax(1.0, emax2);
}

}  // namespace SF_NS
}  // namespace spectrum_fast

"""Singular values and SNR of one matrix on the CPU, fast where that is exact enough, exact elsewhere.

The fast path forms the Gram matrix on the smaller side in float32 (a BLAS SYRK) and takes its
eigenvalues with LAPACK (values only; MRRR, or the two-stage solver from ``TWO_STAGE_MIN_K``): 2-4x
faster than an SVD. It loses the small
singular values of ill-conditioned matrices, and it can move a value across the Marchenko-Pastur
threshold ``tau``, where the SNR jumps. So every matrix goes through a guard (SPEC.md §1, see
:func:`stats_from_gram`); a matrix that fails it is recomputed with a float64 Gram matrix (:func:`gram64`,
summed over blocks widened one at a time: no float64 copy of the matrix), and if that still fails, with a
float64 SVD (the reference definition itself). LAPACK and BLAS are called through ctypes
(:mod:`spectrum_fast.lapack`), which releases the GIL, so the scan's worker threads compute at once.

The guard needs the error of each computed eigenvalue. Its model,
``delta_i = eps·(8·sqrt(m)·lambda_i + 4·‖W‖_F² / sqrt(k))``, was fitted to the measured errors of the
fp32 route (against float64 SVDs) on all 36 MiniLM matrices, on the bench checkpoint's bf16 Llama
matrices (up to 5632x2048) and on Gaussian, heavy-tailed, spiked and decaying random matrices: the
largest error there is 0.29 of ``delta_i``, whichever eigenvalue it is. The large errors sit at the top
of the spectrum and grow like ``sqrt(m)·lambda_i`` (rounding in the length-``m`` dot products); the
second term covers the eigensolver's absolute error and gives the small eigenvalues of a
rank-deficient matrix an error far larger than themselves, so such matrices always fail the guard.
With fp32 eigenvalues accurate to about 1e-5 relative near ``tau`` and neighbouring singular values
about 1e-3 apart there, 10-20% of large matrices cannot be decided in fp32; that, not the arithmetic,
is what the float64 fallback costs on real checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dsyrk

from . import lapack
from .snr import SnrStats, snr_from_singular_values, snr_interval

#: Gram matrices of at least this order take LAPACK's two-stage eigensolver (``?syevd_2stage``), the
#: smaller ones MRRR (``?syevr``). Measured on one core (bench/bench_cpu_eigensolver.py): the two-stage
#: solver is slower below this order and faster above it, increasingly with k.
TWO_STAGE_MIN_K = 3072
#: The float64 Gram matrix is summed over blocks of the longer side of about this many bytes, each one
#: widened to float64 on its own (BLAS ``dsyrk`` with ``beta = 1``): a float32 matrix is never copied whole
#: into float64, which takes twice its own memory (7 GB for a 53248 x 16384 Llama-3.1-405B projection). On
#: one core this is also 1.05-1.25x faster than the whole copy (bench/bench_cpu_memory.py).
GRAM64_BLOCK_BYTES = 64 << 20
#: Changes with anything that moves the CPU engine's last bits (scan journals record it).
REVISION = 2
#: Relative width of the SNR enclosure under which a fast result is accepted.
REL_TOL = 1e-4
_GRAM_C_REL = 8.0
_GRAM_C_FRO = 4.0
# Scale a matrix by a power of two (exact) when its largest entry lies outside this range, so its
# Gram matrix neither overflows nor drops into subnormals.
_SAFE_EXP = 30

STATUS_OK = "ok"
STATUS_ZERO = "zero"
STATUS_NONFINITE = "nonfinite"
STATUS_EMPTY = "empty"

METHOD_GRAM32 = "gram-fp32"
METHOD_GRAM64 = "gram-fp64"
METHOD_SVD64 = "svd-fp64"


@dataclass(frozen=True)
class MatrixStats:
    """The outcome for one matrix: statistics when ``status == "ok"``, else why there are none."""

    status: str
    method: str | None = None
    stats: SnrStats | None = None

    @property
    def snr(self) -> float:
        return self.stats.snr if self.stats is not None else math.nan


def eigvalsh(a: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of the symmetric float32/float64 matrix ``a`` in its precision, by the solver
    :func:`eigensolver` names for its order; ``a`` is overwritten. Only the lower triangle of a
    column-major ``a`` is read (the upper one of a row-major ``a``, which is the same matrix)."""
    lam = lapack.syevd_2stage(a) if a.shape[0] >= TWO_STAGE_MIN_K else lapack.syevr(a)
    if lam is not None:
        return lam
    # where the library lacks them: scipy's wrapper (which holds the GIL, so workers take turns), given a
    # row-major symmetric matrix as its transpose, a view, where scipy would otherwise copy it
    a = a.T if a.flags.c_contiguous and not a.flags.f_contiguous else a
    return scipy.linalg.eigh(a, eigvals_only=True, driver="evr", overwrite_a=True, check_finite=False)


def eigensolver() -> str:
    """The eigensolvers :func:`eigvalsh` uses here (recorded in scan journals: they fix the last bits)."""
    if lapack.syevd_2stage_available(np.float32) and lapack.syevd_2stage_available(np.float64):
        return f"syevr below k={TWO_STAGE_MIN_K}, syevd_2stage from it"
    return "syevr"


def gram64(w: np.ndarray) -> np.ndarray:
    """The float64 Gram matrix on the smaller side of the float32/float64 matrix ``w`` (``WᵀW`` if ``w`` is
    tall, else ``WWᵀ``), column-major, lower triangle only (the upper one is zero), summed over blocks of
    :data:`GRAM64_BLOCK_BYTES` widened one at a time: no float64 copy of the whole of ``w``."""
    m, n = w.shape
    k, long = min(m, n), max(m, n)
    g = np.zeros((k, k), dtype=np.float64, order="F")
    step = max(1, GRAM64_BLOCK_BYTES // (8 * k))
    trans = m < n  # tall: G += BᵀB for the row-major block B = w[rows], column-major Bᵀ; wide: G += CCᵀ, C = w[:, cols]
    for start in range(0, long, step):
        block = np.ascontiguousarray(w[:, start:start + step] if trans else w[start:start + step], dtype=np.float64)
        if not lapack.syrk_lower(g, block.T, trans):  # BLAS through ctypes, which releases the GIL
            g = dsyrk(1.0, block.T, beta=1.0, c=g, trans=int(trans), lower=1, overwrite_c=1)
        del block  # before the next one is made
    return g


def _gram_eigenvalues(w: np.ndarray, fp64: bool) -> tuple[np.ndarray, float]:
    """Ascending eigenvalues of the Gram matrix on the smaller side, in float32 (``w`` float32) or float64,
    and ``‖W‖_F²``."""
    if fp64:
        gram = gram64(w)
    else:
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T  # numpy runs SYRK for x.T @ x
    fro2 = float(gram.diagonal().sum(dtype=np.float64))
    return np.asarray(eigvalsh(gram), dtype=np.float64), fro2


def stats_from_gram(lam: np.ndarray, fro2: float, eps: float, m: int, n: int) -> SnrStats | None:
    """The SNR from Gram eigenvalues if the guard finds it accurate, else ``None``.

    ``delta`` bounds the error of each eigenvalue (see the module docstring). Two checks:

    1. No singular value may lie within its error of ``tau``, with ``tau`` itself widened by the
       error of the quartiles (:func:`snr_interval`, worst case): the SNR jumps there.
    2. The SNR's error, from first-order sensitivities ``d snr / d sigma_i`` times each value's error
       ``d sigma_i = min(sqrt(delta), delta / (2 sigma_i))``, combined as independent errors (rounding
       errors of different eigenvalues do not add up coherently; a worst-case sum would reject nearly
       every matrix although the measured errors are 100x smaller), must stay below ``REL_TOL``.
       Rank-deficient and ill-conditioned matrices fail here: their small values carry errors of
       ``sqrt(delta)``, far above the values themselves.
    """
    lam = np.maximum(lam, 0.0)
    delta = eps * (_GRAM_C_REL * math.sqrt(max(m, n)) * lam + _GRAM_C_FRO * fro2 / math.sqrt(lam.size))
    s = np.sqrt(lam)
    lo = np.sqrt(np.maximum(lam - delta, 0.0))
    hi = np.sqrt(lam + delta)
    if snr_interval(lo, hi, m, n) is None:
        return None
    stats = snr_from_singular_values(s, m, n)
    if not (math.isfinite(stats.snr) and stats.snr > 0):
        return None
    above = s > stats.tau
    signal = float(s[above].sum())
    noise = float(s[~above].sum()) if not stats.noise_free else 1.0
    with np.errstate(divide="ignore"):
        d_sigma = np.minimum(np.sqrt(delta), delta / (2.0 * s))
    # relative sensitivities: d ln(snr) = d signal / signal - d noise / noise - d sigma_max / sigma_max
    rel = np.where(above, d_sigma / signal, 0.0 if stats.noise_free else d_sigma / noise)
    rel_err = math.sqrt(float(np.dot(rel, rel))) + float(d_sigma[-1]) / stats.sigma_max
    if rel_err > REL_TOL:
        return None
    return stats


def matrix_stats(w: np.ndarray, *, exact: bool = False) -> MatrixStats:
    """SNR statistics of a 2-D float32/float64 matrix, accurate to 1e-4 relative (SPEC.md §1).

    ``exact=True`` skips the fast paths and uses the float64 SVD directly.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(w.shape)}")
    m, n = w.shape
    if w.size == 0:
        return MatrixStats(STATUS_EMPTY)
    hi_val, lo_val = float(w.max()), float(w.min())  # NaN propagates: also the finiteness check
    amax = max(abs(hi_val), abs(lo_val))
    if not math.isfinite(amax):
        return MatrixStats(STATUS_NONFINITE)
    if amax == 0.0:
        return MatrixStats(STATUS_ZERO)
    exponent = math.frexp(amax)[1]
    if abs(exponent) <= _SAFE_EXP:
        exponent = 0
    else:
        w = np.ldexp(w, -exponent).astype(w.dtype, copy=False)  # power of two: exact, no overflow

    def rescaled(stats: SnrStats, method: str) -> MatrixStats:
        if exponent:
            # sigma_max and tau scale with W; the SNR as 1/scale, except noise-free (signal / S[0])
            snr = stats.snr if stats.noise_free else math.ldexp(stats.snr, -exponent)
            stats = SnrStats(snr, math.ldexp(stats.sigma_max, exponent), math.ldexp(stats.tau, exponent),
                             stats.n_signal, stats.noise_free)
        return MatrixStats(STATUS_OK, method, stats)

    if not exact:
        if w.dtype == np.float32:
            lam, fro2 = _gram_eigenvalues(w, fp64=False)
            stats = stats_from_gram(lam, fro2, float(np.finfo(np.float32).eps), m, n)
            if stats is not None:
                return rescaled(stats, METHOD_GRAM32)
        lam, fro2 = _gram_eigenvalues(w, fp64=True)
        stats = stats_from_gram(lam, fro2, float(np.finfo(np.float64).eps), m, n)
        if stats is not None:
            return rescaled(stats, METHOD_GRAM64)
    # our own float64 copy, which LAPACK overwrites, column-major as its transpose (same singular values)
    w64 = w.astype(np.float64, order="C")
    s = lapack.gesdd(w64.T)
    if s is None:  # scipy's wrapper: the same routine, holding the GIL
        s = scipy.linalg.svdvals(w64.T, overwrite_a=True, check_finite=False)
    del w64
    return rescaled(snr_from_singular_values(s, m, n), METHOD_SVD64)


def working_bytes(m: int, n: int, exact: bool = False) -> int:
    """Memory :func:`matrix_stats` takes for an ``m x n`` matrix beyond the matrix itself: on its Gram routes,
    the float32 Gram matrix, then the float64 one, the eigensolver's workspace (LAPACK's two-stage solver
    needs less than one more k x k matrix) and one block being widened; with ``exact``, the float64 SVD's
    copy of the matrix and its workspace. (The float64 SVD that the Gram routes fall back on for the rare
    matrices they cannot decide is not counted: counting it for every matrix would halve what runs at once.)"""
    k = min(m, n)
    if exact:
        return 8 * m * n + 8 * k * k + 8 * (m + n) * 8
    return 16 * k * k + GRAM64_BLOCK_BYTES

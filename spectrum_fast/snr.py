"""Spectrum signal-to-noise ratio of one matrix from its singular values (SPEC.md §1).

Two entry points:

* :func:`snr_from_singular_values` -- the exact formula, for singular values taken as exact.
* :func:`snr_interval` -- the same formula evaluated on singular values that are only known to lie in
  intervals ``[lo_i, hi_i]``. It returns an enclosure of every SNR the true values could give, or
  ``None`` when a singular value may sit on the other side of the Marchenko-Pastur threshold (the SNR
  is discontinuous there, so no enclosure short of recomputing exists). The engine uses it to decide
  whether a fast fp32 result is good enough or the matrix must be recomputed more accurately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IQR_TO_SIGMA = 1.349


@dataclass(frozen=True)
class SnrStats:
    """Everything SPEC.md §1 derives from the singular values of one matrix."""

    snr: float
    sigma_max: float
    tau: float
    n_signal: int
    noise_free: bool


def _quartiles(s_ascending: np.ndarray) -> tuple[float, float]:
    q25, q75 = np.quantile(s_ascending, [0.25, 0.75])  # linear interpolation, numpy's default
    return float(q25), float(q75)


def mp_threshold(s_ascending: np.ndarray, m: int, n: int) -> float:
    """Marchenko-Pastur edge ``sigma * (1 + sqrt(beta))`` with the IQR noise estimate."""
    q25, q75 = _quartiles(s_ascending)
    sigma = (q75 - q25) / IQR_TO_SIGMA
    beta = min(m, n) / max(m, n)
    return sigma * (1.0 + math.sqrt(beta))


def snr_from_singular_values(s: np.ndarray, m: int, n: int) -> SnrStats:
    """SNR per SPEC.md §1. ``s`` holds all ``min(m, n)`` singular values, in any order."""
    s = np.sort(np.asarray(s, dtype=np.float64))
    if s.size != min(m, n):
        raise ValueError(f"expected {min(m, n)} singular values for a {m}x{n} matrix, got {s.size}")
    tau = mp_threshold(s, m, n)
    above = s > tau
    signal = float(s[above].sum())
    n_noise = int(s.size - above.sum())
    noise = float(s[~above].sum()) if n_noise else 1.0
    sigma_max = float(s[-1])
    if sigma_max <= 0:
        snr = math.nan
    elif noise > 0:
        snr = (signal / noise) / sigma_max
    else:  # values <= tau exist but are all exactly 0: the reference's `inf`
        snr = math.inf
    return SnrStats(snr, sigma_max, tau, int(above.sum()), n_noise == 0)


def snr_interval(lo: np.ndarray, hi: np.ndarray, m: int, n: int) -> tuple[float, float] | None:
    """Enclose the SNR of any singular values ``s_i`` with ``lo_i <= s_i <= hi_i``.

    ``lo`` and ``hi`` are ascending, elementwise ``lo <= hi``, and pair up in sorted order (which is
    what Weyl's theorem gives for eigenvalues of a perturbed Gram matrix). Order statistics, hence the
    quartiles and ``tau``, are monotone in the values, so they are enclosed by evaluating on ``lo`` and
    ``hi``. Returns ``None`` when some value's interval meets ``tau``'s interval: the value could fall on
    either side of the threshold, and no enclosure is possible.
    """
    beta = min(m, n) / max(m, n)
    q25_lo, q75_lo = _quartiles(lo)
    q25_hi, q75_hi = _quartiles(hi)
    scale = (1.0 + math.sqrt(beta)) / IQR_TO_SIGMA
    tau_lo = max(q75_lo - q25_hi, 0.0) * scale
    tau_hi = (q75_hi - q25_lo) * scale
    above = lo > tau_hi
    below = hi <= tau_lo
    if not np.all(above | below):
        return None
    if hi[-1] <= 0 or lo[-1] <= 0:
        return None
    sig_lo, sig_hi = float(lo[above].sum()), float(hi[above].sum())
    if below.any():
        noise_lo, noise_hi = float(lo[below].sum()), float(hi[below].sum())
        if noise_lo <= 0:
            return None
    else:
        noise_lo = noise_hi = 1.0
    return (sig_lo / noise_hi) / hi[-1], (sig_hi / noise_lo) / lo[-1]

"""Eigenvalues of a symmetric matrix by a two-stage reduction: stage 1 on the GPU, stage 2 on CPU cores.

Opt-in for the GPU scan's float64 pass (``SPECTRUM_FAST_TWOSTAGE=1``, see :func:`spectrum_fast.cuda_engine.twostage_threads`)
until a lent GPU shows it beats ``syevd`` (bench/bench_twostage.py, bench/NOTES-gpu.md).

Why: on an H100 the one-stage eigensolver (``cusolverDnXsyevd``) is the floor of every scan (14.5 s of the
Mistral-7B-shaped scan's 21 s; 193 s of Qwen1.5-110B's 210 s floor). Its tridiagonal reduction is half
matrix-vector products, bound by memory bandwidth. A two-stage reduction does the O(k^3) part as matrix
products (dense to band, bandwidth ``b``: QR of a k x b panel, then a rank-2b update of the trailing
matrix) and leaves an O(k^2 b) part (band to tridiagonal, LAPACK ``dsbevd`` by bulge chasing), which runs
on the CPU cores, one matrix per thread, many at once (called through ctypes, which releases the GIL).

Stage 1 (:func:`band_reduce`) is plain torch, so it runs on the CPU too (the tests), in float32 or float64.
For ``Q = I - V T V^T`` from ``geqrf``'s reflectors, ``T^{-1} = striu(V^T V) + diag(1 / tau)`` (Joffrain et
al., "Accumulating Householder transformations, revisited", 2006), and with ``X = A V T`` the two-sided
update is ``A - V Z^T - Z V^T``, ``Z = X - V (T^T V^T X) / 2``.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np


def band_reduce(a, b: int):
    """Lower band storage ``(b + 1, n)`` (row ``i`` holds the ``i``-th subdiagonal, as LAPACK's ``?sbevd``
    and ``scipy.linalg.eig_banded(lower=True)`` take it) of a band matrix orthogonally similar to the
    symmetric torch tensor ``a`` (only ``a``'s values are used, both triangles; ``a`` is not modified)."""
    import torch

    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(a.shape)}")
    if b < 1:
        raise ValueError(f"bandwidth must be at least 1, got {b}")
    n = a.shape[0]
    a = a.clone()
    for j in range(0, n, b):
        m = n - j - b  # rows below the band in this panel's columns
        if m < 2:
            break  # a single row below the band is already inside it after this panel
        qr, tau = torch.geqrf(a[j + b:, j:j + b])
        kk = min(m, b)
        tau = tau[:kk]
        v = torch.tril(qr[:, :kk], -1)
        v.diagonal().fill_(1)
        # geqrf's "nothing to do" reflector (tau = 0, H = I): a zero column of V with T's diagonal 1 is the
        # same; done without a branch, which would wait for the GPU once per panel
        zero = tau == 0
        v = v * ~zero
        tau = torch.where(zero, torch.ones_like(tau), tau)
        a[j + b:, j:j + b] = 0
        a[j + b:j + b + kk, j:j + b] = torch.triu(qr[:kk, :])
        a[j:j + b, j + b:] = a[j + b:, j:j + b].T
        t_inv = torch.triu(v.T @ v, 1) + torch.diag(1 / tau)
        t = torch.linalg.solve_triangular(t_inv, torch.eye(kk, dtype=a.dtype, device=a.device), upper=True)
        a22 = a[j + b:, j + b:]
        x = a22 @ (v @ t)
        z = x - 0.5 * (v @ (t.T @ (v.T @ x)))
        a22 -= v @ z.T + z @ v.T
    band = torch.zeros(b + 1, n, dtype=a.dtype, device=a.device)
    for i in range(min(b, n - 1) + 1):
        band[i, : n - i] = torch.diagonal(a, offset=-i)
    return band


_LAPACKE_NAMES = ("scipy_LAPACKE_dsbevd", "LAPACKE_dsbevd")


@functools.cache
def _lapacke() -> tuple[object | None, str]:
    """``LAPACKE_dsbevd`` from scipy's bundled OpenBLAS (or a system LAPACKE) through ctypes, which releases
    the GIL during the call, so a thread pool runs several at once; ``(None, why)`` where none is found."""
    import ctypes
    import ctypes.util
    import glob
    import os

    import scipy

    site = os.path.dirname(os.path.dirname(scipy.__file__))
    paths = sorted(glob.glob(os.path.join(site, "scipy.libs", "libscipy_openblas*.so*")))
    paths += [p for p in (ctypes.util.find_library("lapacke"),) if p]
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _LAPACKE_NAMES:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_int, ctypes.c_int,
                               ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
                return fn, f"{name} in {os.path.basename(path)}"
    return None, "no LAPACKE_dsbevd found: scipy's eig_banded, one at a time"


def stage2_backend() -> str:
    """What computes stage 2 here (for benchmarks and diagnostics)."""
    return _lapacke()[1]


def band_eigenvalues(band: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of a symmetric band matrix in lower band storage (stage 2: LAPACK ``dsbevd``,
    values only, on the CPU). Raises ``numpy.linalg.LinAlgError`` if it does not converge."""
    fn, _ = _lapacke()
    if fn is None:
        from scipy.linalg import eig_banded

        return eig_banded(np.ascontiguousarray(band, dtype=np.float64), lower=True, eigvals_only=True,
                          overwrite_a_band=True, check_finite=False)
    ab = np.array(band, dtype=np.float64, order="F")  # (kd + 1, n), column-major, as LAPACK stores bands
    kd, n = ab.shape[0] - 1, ab.shape[1]
    w = np.empty(n, dtype=np.float64)
    info = fn(102, b"N", b"L", n, kd, ab.ctypes.data, kd + 1, w.ctypes.data, None, 1)  # 102: column-major
    if info != 0:
        raise np.linalg.LinAlgError(f"dsbevd failed (info {info})")
    return w


def eigenvalues(a, b: int = 64) -> np.ndarray:
    """Both stages in this thread: ascending eigenvalues of the symmetric torch tensor ``a``."""
    return band_eigenvalues(band_reduce(a, b).cpu().numpy())


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def pool(threads: int) -> ThreadPoolExecutor:
    """The threads that run stage 2 (``dsbevd`` through ctypes releases the GIL, so they run at once)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != threads:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(threads, thread_name_prefix="spectrum_fast-band")
            _POOL_SIZE = threads
        return _POOL


def submit(a, b: int, threads: int) -> Future:
    """Stage 1 here (on ``a``'s device), stage 2 in the pool: a future of the ascending eigenvalues."""
    band = band_reduce(a, b).to("cpu", copy=True).numpy()
    return pool(threads).submit(band_eigenvalues, band)

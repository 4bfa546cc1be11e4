"""LAPACK routines that scipy does not wrap, called through ctypes from scipy's bundled OpenBLAS (or a
system LAPACKE).

ctypes releases the GIL for the length of a call, so a thread pool runs several at once. Every routine
here is optional: where the library lacks it, :func:`routine` says why and the caller falls back to
what scipy offers.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

_COL_MAJOR = 102  # LAPACKE's LAPACK_COL_MAJOR: the array is used in place, never transposed into a copy


@functools.cache
def _libraries() -> tuple[tuple[str, ctypes.CDLL], ...]:
    import ctypes.util
    import glob

    import scipy

    site = os.path.dirname(os.path.dirname(scipy.__file__))
    paths = sorted(glob.glob(os.path.join(site, "scipy.libs", "libscipy_openblas*.so*")))
    paths = [p for p in paths if "openblas64" not in os.path.basename(p)]  # 32-bit integers only
    paths += [p for p in (ctypes.util.find_library("lapacke"),) if p]
    libs = []
    for path in paths:
        try:
            libs.append((os.path.basename(path), ctypes.CDLL(path)))
        except OSError:
            continue
    return tuple(libs)


@functools.cache
def routine(name: str, *argtypes) -> tuple[object | None, str]:
    """``LAPACKE_<name>`` (scipy's prefixed copy first) with these argument types, returning ``int``, and
    where it was found; ``(None, why)`` where no library here has it."""
    for where, lib in _libraries():
        for symbol in (f"scipy_LAPACKE_{name}", f"LAPACKE_{name}"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                fn.argtypes = list(argtypes)
                return fn, f"{symbol} in {where}"
    return None, f"no LAPACKE_{name} in scipy's OpenBLAS or a system LAPACKE"


_C_INT, _C_CHAR, _PTR = ctypes.c_int, ctypes.c_char, ctypes.c_void_p


def _syevd_2stage(dtype: np.dtype) -> tuple[object | None, str]:
    prefix = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}[np.dtype(dtype)]
    return routine(f"{prefix}syevd_2stage", _C_INT, _C_CHAR, _C_CHAR, _C_INT, _PTR, _C_INT, _PTR)


def syevd_2stage_available(dtype=np.float64) -> bool:
    return _syevd_2stage(dtype)[0] is not None


def syevd_2stage(a: np.ndarray) -> np.ndarray | None:
    """Ascending eigenvalues of the symmetric float32/float64 matrix ``a`` by LAPACK's two-stage
    ``?syevd_2stage`` (dense to band with blocked GEMMs, band to tridiagonal by bulge chasing, then the
    tridiagonal solver), in ``a``'s precision; ``a`` is overwritten. ``None`` where the routine is missing.

    Only one triangle is read, so a C-ordered symmetric matrix serves as its own column-major transpose.
    Raises ``numpy.linalg.LinAlgError`` if it does not converge."""
    fn, _ = _syevd_2stage(a.dtype)
    if fn is None:
        return None
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {a.shape}")
    if not (a.flags.c_contiguous or a.flags.f_contiguous) or not a.flags.writeable:
        a = a.copy()
    n = a.shape[0]
    w = np.empty(n, dtype=a.dtype)
    info = fn(_COL_MAJOR, b"N", b"L", n, a.ctypes.data, max(n, 1), w.ctypes.data)
    if info != 0:
        raise np.linalg.LinAlgError(f"{'d' if a.dtype == np.float64 else 's'}syevd_2stage failed (info {info})")
    return w


def sbevd_routine() -> tuple[object | None, str]:
    """``dsbevd`` and where it was found, or ``(None, why)``."""
    return routine("dsbevd", _C_INT, _C_CHAR, _C_CHAR, _C_INT, _C_INT, _PTR, _C_INT, _PTR, _PTR, _C_INT)


def sbevd(band: np.ndarray) -> np.ndarray | None:
    """Ascending eigenvalues of a symmetric band matrix in lower band storage ``(kd + 1, n)`` by LAPACK's
    ``dsbevd`` in float64; ``None`` where the routine is missing. Raises ``numpy.linalg.LinAlgError`` if it
    does not converge."""
    fn, _ = sbevd_routine()
    if fn is None:
        return None
    ab = np.array(band, dtype=np.float64, order="F")  # column-major, as LAPACK stores bands
    kd, n = ab.shape[0] - 1, ab.shape[1]
    w = np.empty(n, dtype=np.float64)
    info = fn(_COL_MAJOR, b"N", b"L", n, kd, ab.ctypes.data, kd + 1, w.ctypes.data, None, 1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsbevd failed (info {info})")
    return w

"""LAPACK and BLAS routines called through ctypes from scipy's bundled OpenBLAS (or a system LAPACKE): the
ones scipy does not wrap (``?syevd_2stage``, ``dsbevd``), and the ones the CPU engine's workers call at once
(``?syevr``, ``?syrk``, ``?gesdd``), whose scipy wrappers hold the GIL so that two workers took turns.

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


def _find(symbols: tuple[str, ...], restype, argtypes) -> tuple[object | None, str]:
    for where, lib in _libraries():
        for symbol in symbols:
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = restype
                fn.argtypes = list(argtypes)
                return fn, f"{symbol} in {where}"
    return None, f"no {symbols[-1]} in scipy's OpenBLAS or a system LAPACKE"


@functools.cache
def routine(name: str, *argtypes) -> tuple[object | None, str]:
    """``LAPACKE_<name>`` (scipy's prefixed copy first) with these argument types, returning ``int``, and
    where it was found; ``(None, why)`` where no library here has it."""
    return _find((f"scipy_LAPACKE_{name}", f"LAPACKE_{name}"), ctypes.c_int, argtypes)


@functools.cache
def cblas(name: str, *argtypes) -> tuple[object | None, str]:
    """``cblas_<name>`` (scipy's prefixed copy first), returning nothing, as :func:`routine` does."""
    return _find((f"scipy_cblas_{name}", f"cblas_{name}"), None, argtypes)


_C_INT, _C_CHAR, _PTR = ctypes.c_int, ctypes.c_char, ctypes.c_void_p
_REAL = {np.dtype(np.float32): ("s", ctypes.c_float), np.dtype(np.float64): ("d", ctypes.c_double)}
_CBLAS_COL_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS, _CBLAS_LOWER = 102, 111, 112, 122


def _syrk(dtype: np.dtype) -> tuple[object | None, str]:
    prefix, real = _REAL[np.dtype(dtype)]
    return cblas(f"{prefix}syrk", _C_INT, _C_INT, _C_INT, _C_INT, _C_INT, real, _PTR, _C_INT, real, _PTR, _C_INT)


def syrk_lower(c: np.ndarray, a: np.ndarray, trans: bool) -> bool:
    """``c += a aᵀ`` (``trans=False``, ``a`` n x K) or ``c += aᵀ a`` (``trans=True``, ``a`` K x n), lower triangle
    only, by BLAS ``?syrk`` in place; ``c`` and ``a`` column-major, of one float dtype. Releases the GIL (scipy's
    own wrapper does not, so threads calling it take turns). ``False`` where the routine is missing."""
    fn, _ = _syrk(c.dtype)
    if fn is None:
        return False
    if not (c.flags.f_contiguous and a.flags.f_contiguous and c.dtype == a.dtype and c.flags.writeable):
        raise ValueError("syrk_lower takes column-major arrays of one dtype, c writeable")
    n, depth = (a.shape[1], a.shape[0]) if trans else a.shape
    if c.shape != (n, n):
        raise ValueError(f"c is {c.shape}, a gives {n} x {n}")
    fn(_CBLAS_COL_MAJOR, _CBLAS_LOWER, _CBLAS_TRANS if trans else _CBLAS_NO_TRANS, n, depth, 1.0,
       a.ctypes.data, max(1, a.shape[0]), 1.0, c.ctypes.data, max(1, n))
    return True


def _check(info: int, name: str) -> None:
    """LAPACK's ``info``: non-zero (no convergence, or a bad argument) raises naming the routine."""
    if info != 0:
        raise np.linalg.LinAlgError(f"{name} failed (info {info})")


def _square(a: np.ndarray) -> np.ndarray:
    """``a`` as LAPACK can take it in place (contiguous in either order, writeable), else a copy; refuses a
    matrix that is not square."""
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {a.shape}")
    if not (a.flags.c_contiguous or a.flags.f_contiguous) or not a.flags.writeable:
        a = a.copy()
    return a


def _syevr(dtype: np.dtype) -> tuple[object | None, str]:
    prefix, real = _REAL[np.dtype(dtype)]
    return routine(f"{prefix}syevr", _C_INT, _C_CHAR, _C_CHAR, _C_CHAR, _C_INT, _PTR, _C_INT, real, real, _C_INT,
                   _C_INT, real, _PTR, _PTR, _PTR, _C_INT, _PTR)


def syevr(a: np.ndarray) -> np.ndarray | None:
    """Ascending eigenvalues of the symmetric float32/float64 matrix ``a`` by LAPACK's MRRR ``?syevr`` (all of
    them, values only, ``abstol = 0``: what ``scipy.linalg.eigh(driver="evr")`` computes, bit for bit), in
    ``a``'s precision; ``a`` is overwritten, its lower triangle read as column-major (a row-major symmetric
    matrix serves as its own transpose). Through ctypes, which releases the GIL: scipy's wrapper holds it, so
    threads calling that one take turns. ``None`` where the routine is missing."""
    fn, _ = _syevr(a.dtype)
    if fn is None:
        return None
    a = _square(a)
    n = a.shape[0]
    w = np.empty(n, dtype=a.dtype)
    z = np.empty(1, dtype=a.dtype)  # not referenced for values only
    isuppz = np.empty(2 * max(1, n), dtype=np.intc)
    found = ctypes.c_int(0)
    info = fn(_COL_MAJOR, b"N", b"A", b"L", n, a.ctypes.data, max(n, 1), 0.0, 0.0, 0, 0, 0.0,
              ctypes.addressof(found), w.ctypes.data, z.ctypes.data, 1, isuppz.ctypes.data)
    _check(info, f"{_REAL[a.dtype][0]}syevr")
    return w[: found.value] if found.value != n else w


def _syevd_2stage(dtype: np.dtype) -> tuple[object | None, str]:
    prefix, _ = _REAL[np.dtype(dtype)]
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
    a = _square(a)
    n = a.shape[0]
    w = np.empty(n, dtype=a.dtype)
    info = fn(_COL_MAJOR, b"N", b"L", n, a.ctypes.data, max(n, 1), w.ctypes.data)
    _check(info, f"{_REAL[a.dtype][0]}syevd_2stage")
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
    _check(info, "dsbevd")
    return w


def _gesdd(dtype: np.dtype) -> tuple[object | None, str]:
    prefix, _ = _REAL[np.dtype(dtype)]
    return routine(f"{prefix}gesdd", _C_INT, _C_CHAR, _C_INT, _C_INT, _PTR, _C_INT, _PTR, _PTR, _C_INT, _PTR, _C_INT)


def gesdd(a: np.ndarray) -> np.ndarray | None:
    """Descending singular values of the float32/float64 matrix ``a`` by LAPACK's ``?gesdd`` (values only:
    what ``scipy.linalg.svdvals`` computes), in ``a``'s precision; ``a`` must be column-major and is
    overwritten. Through ctypes, which releases the GIL (scipy's wrapper holds it). ``None`` where the routine
    is missing."""
    fn, _ = _gesdd(a.dtype)
    if fn is None:
        return None
    if a.ndim != 2 or not a.flags.f_contiguous or not a.flags.writeable:
        raise ValueError("gesdd takes a writeable column-major 2-D array")
    m, n = a.shape
    s = np.empty(min(m, n), dtype=a.dtype)
    unused = np.empty(1, dtype=a.dtype)  # U and Vᵀ: not referenced for values only
    info = fn(_COL_MAJOR, b"N", m, n, a.ctypes.data, max(1, m), s.ctypes.data, unused.ctypes.data, 1,
              unused.ctypes.data, 1)
    _check(info, f"{_REAL[a.dtype][0]}gesdd")
    return s

"""Which compute backends this installation has, and why one is missing."""

from __future__ import annotations

import ctypes
import functools
import sys


def native_extension():
    """The compiled ``spectrum_fast._C`` module, or None when it was not built."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


@functools.lru_cache(maxsize=1)
def _driver_missing() -> str | None:
    """Why no NVIDIA driver is usable, checked without loading the CUDA runtime, cuBLAS and cuSOLVER (the
    extension's libraries: ~200 MB of resident memory for a CPU-only scan to find out there is no GPU)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 cannot be loaded)"
    return None


def cuda_unavailable_reason() -> str | None:
    """None when a CUDA scan can run here, else a short reason."""
    missing = _driver_missing()
    if missing:
        return f"no usable GPU: {missing}"
    ext = native_extension()
    if ext is None:
        return "the native extension spectrum_fast._C was not built (no nvcc when installing)"
    try:
        count = int(ext.device_count())
    except RuntimeError as e:  # the CUDA runtime reports why (no driver, no device, ...)
        return f"no usable GPU ({e})"
    if count == 0:
        return "no GPU found"
    return None

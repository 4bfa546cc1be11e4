"""Which compute backends this installation has, and why one is missing."""

from __future__ import annotations


def native_extension():
    """The compiled ``spectrum_fast._C`` module, or None when it was not built."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def cuda_unavailable_reason() -> str | None:
    """None when a CUDA scan can run here, else a short reason."""
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

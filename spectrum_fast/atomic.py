"""Atomic file output: a result is either complete under its final name or not there at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import ResultFileError


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove it is writable, before any long work starts."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".spectrum_fast-probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ResultFileError(f"{d}: output directory is not writable ({e.strerror or e})") from None
    return d


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it into place."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ResultFileError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; results are for other users' tools too
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ResultFileError(f"{path}: cannot write ({e.strerror or e})") from None
        raise
    return path

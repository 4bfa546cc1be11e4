"""What every benchmark shares: the machine it ran on, its result file, and file-reading rates (standard
library only: the benchmarks' parents must stay small)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpu_model": cpu, "mem_gib": mem_gib}
    if os.environ.get("SF_SOURCES"):  # bench/gpu_check.sh's fingerprint of the tree (a device's .git can be stale)
        info["sources"] = os.environ["SF_SOURCES"]
    return info


def seconds(fn, repeats: int = 1, device: str = "cpu", reduce=min) -> float:
    """``reduce`` (``min``, or e.g. ``statistics.median``) of ``repeats`` timings of ``fn()``; on ``cuda`` the
    GPU is synchronised before and after each, so that queued work is neither charged nor left out."""
    sync = None
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return reduce(times)


def write_result(path: Path, doc: dict[str, Any]) -> None:
    """The benchmark's JSON, written atomically (a killed run never leaves a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def drop_cache(path: Path) -> None:
    """Evict a file's pages from the page cache (no root needed for one's own files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_rate(path: Path, *, cold: bool) -> float:
    """Bytes/s of one sequential read of a file, from disk (``cold``: page cache dropped first) or from the
    page cache as it is."""
    if cold:
        drop_cache(path)
    buf = bytearray(64 * 2**20)
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(buf)) > 0:
            n += k
    return n / (time.perf_counter() - t0)

"""How much memory a CPU scan may hold at once, and the byte budget that keeps it there.

A CPU scan holds each matrix it is reading or computing in float32, plus the Gram matrices of the ones being
computed (:func:`spectrum_fast.cpu_engine.working_bytes`). For a 7B model that is well under a gigabyte per
matrix; for Llama-3.1-405B's 53248 x 16384 projections it is about 8 GB each, so the two workers and the
read-ahead that suit a 7B model would need some 40 GB. The scan therefore reads a matrix only once its bytes
fit in the budget beside those in flight (:class:`Budget`), so that on a small machine a big model runs one
matrix at a time instead of running out of memory.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ._cgroup import MOUNTINFO, OWN, ROOT, read_int, stat, v1_dirs, v2_dirs
from .distributed import local_world_size
from .errors import SpectrumError


class MemoryBudgetWarning(UserWarning):
    """A matrix needs more memory than the scan may take: it is scanned alone, and may still run out."""


#: Share of the available memory the scan's matrices may take; the rest is left for the interpreter, the
#: libraries' own buffers and the page cache the reads go through.
SHARE = 0.8


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(root: Path = ROOT, own: Path = OWN, mountinfo: Path = MOUNTINFO) -> int | None:
    """The least room (limit minus usage) among this process's memory cgroups, its own and each one above it
    (v2: ``memory.max`` or the lower ``memory.high``; v1: ``memory.limit_in_bytes``); None where none of them
    has a limit."""
    rooms = []
    for d in v2_dirs(root, own, mountinfo):
        # "max": no limit here; above memory.high (systemd's MemoryHigh=) the kernel throttles and reclaims hard
        limits = [v for v in (read_int(d / "memory.max"), read_int(d / "memory.high")) if v is not None]
        if limits:
            # the usage counts the page cache; its inactive part is given back on demand, as MemAvailable counts it
            rooms.append(min(limits) - (read_int(d / "memory.current") or 0) + stat(d / "memory.stat", "inactive_file"))
    for i, d in enumerate(v1_dirs("memory", root, own, mountinfo)):
        limit = read_int(d / "memory.limit_in_bytes")  # "no limit" is a huge number
        # an ancestor's limit holds its descendants only with use_hierarchy (always, from Linux 5.11)
        if limit is not None and limit < 1 << 60 and (i == 0 or read_int(d / "memory.use_hierarchy") != 0):
            usage = read_int(d / "memory.usage_in_bytes") or 0
            rooms.append(limit - usage + stat(d / "memory.stat", "total_inactive_file"))
    return max(0, min(rooms)) if rooms else None


def available_bytes() -> int | None:
    """Bytes this process's matrices may hold at once: ``SPECTRUM_FAST_MEMORY_GB`` if set, else :data:`SHARE` of
    the least of the system's available memory and the memory cgroup's room (containers), shared evenly among
    the ranks torchrun started on this machine; ``None`` where neither is known (no budget then)."""
    flag = os.environ.get("SPECTRUM_FAST_MEMORY_GB", "").strip()
    if flag:
        try:
            gb = float(flag)
        except ValueError:
            gb = -1.0
        if not gb > 0:
            raise SpectrumError(f"SPECTRUM_FAST_MEMORY_GB must be a positive number of gigabytes, got {flag!r}")
        return int(gb * (1 << 30))
    known = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return int(SHARE * min(known)) // local_world_size() if known else None


class Budget:
    """Bytes held by matrices in flight, at most ``limit`` of them (``None``: no limit). One matrix is let in
    whatever its size when nothing else is held, so that a scan always moves on."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most held at once (for tests and benchmarks)
        self._cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        """Wait until ``n`` bytes fit; ``False`` (nothing taken) if ``stop`` is set first."""
        with self._cond:
            while self.limit is not None and self.held and self.held + n > self.limit:
                if stop.is_set():
                    return False
                self._cond.wait(timeout=0.1)
            if stop.is_set():
                return False
            self.held += n
            self.peak = max(self.peak, self.held)
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()

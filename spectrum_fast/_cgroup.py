"""Reading this process's control group (Linux cgroup v2, and v1 where noted by the callers): the limits a
container or batch scheduler puts on memory and CPU, which the machine-wide figures do not show."""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
OWN = Path("/proc/self/cgroup")


def read_int(path: Path) -> int | None:
    """The file's integer; None where it is missing, unreadable or not a plain count ("max", "-1")."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def v2_dirs(root: Path = ROOT, own: Path = OWN) -> list[Path]:
    """This process's cgroup v2 folder (from ``own``'s ``0::/path`` line), then ``root`` (inside a container's
    cgroup namespace the process's cgroup is the root)."""
    dirs = []
    try:
        for line in own.read_text().splitlines():
            if line.startswith("0::"):
                dirs.append(root / line[3:].lstrip("/"))
    except OSError:
        pass
    dirs.append(root)
    return dirs


def cpu_quota(root: Path = ROOT, own: Path = OWN) -> float | None:
    """CPUs' worth of time the cgroup may use (a container's ``--cpus``, a Kubernetes CPU limit): ``cpu.max``'s
    quota over its period (v2), else ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (v1); None for no limit."""
    for d in v2_dirs(root, own):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota == "max" or not (quota.isdigit() and period.isdigit() and int(period) > 0):
            return None
        return int(quota) / int(period)
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        quota, period = read_int(v1 / "cpu.cfs_quota_us"), read_int(v1 / "cpu.cfs_period_us")  # -1: no limit
        if quota is not None and period:
            return quota / period
    return None

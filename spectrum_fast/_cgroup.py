"""Reading this process's control groups (Linux cgroup v2 and v1): the limits a container or batch scheduler
puts on memory and CPU, which the machine-wide figures do not show.

A limit set on any cgroup above the process applies to it too (a Slurm job's memory limit sits on the job's
cgroup, the process in a step or task cgroup below it; a systemd slice above a service), so every function
here looks at the process's own cgroup and each one above it, and the tightest limit wins. Where the
process's cgroup path is not under the mount (a container that sees only its own cgroup, mounted as the
root), the mount's root is the process's cgroup.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
OWN = Path("/proc/self/cgroup")
# where cgroup v1 mounts each controller's hierarchy, under ROOT (joined controllers get one folder)
V1_MOUNTS = {"memory": ("memory",), "cpu": ("cpu", "cpu,cpuacct", "cpuacct,cpu")}


def read_int(path: Path) -> int | None:
    """The file's integer; None where it is missing, unreadable or not a plain count ("max", "-1")."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def own_paths(own: Path = OWN) -> dict[str, str]:
    """This process's cgroup path per v1 controller (``"4:memory:/slurm/job_7"`` -> ``{"memory": ...}``), and
    its cgroup v2 path under the key ``""`` (``"0::/kubepods/pod1"``); empty where ``own`` is unreadable."""
    paths: dict[str, str] = {}
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _up_from(base: Path, path: str | None) -> list[Path]:
    """``base / path`` and every folder above it up to ``base``, innermost first; only ``base`` where the path is
    unknown or not under the mount."""
    rel = Path(path.lstrip("/")) if path else Path()
    if ".." in rel.parts or not (base / rel).is_dir():  # "/../x": outside this cgroup namespace's view
        return [base]
    return [base / p for p in (rel, *rel.parents)]


def v2_dirs(root: Path = ROOT, own: Path = OWN) -> list[Path]:
    """The cgroup v2 folders whose limits apply to this process: its own (``own``'s ``0::/path`` line) and
    every one above it, innermost first, ending at ``root``."""
    return _up_from(root, own_paths(own).get(""))


def v1_dirs(controller: str, root: Path = ROOT, own: Path = OWN) -> list[Path]:
    """The cgroup v1 folders of ``controller`` (``"memory"``, ``"cpu"``) whose limits apply to this process,
    innermost first; empty where that hierarchy is not mounted."""
    for name in V1_MOUNTS[controller]:
        base = root / name
        if base.is_dir():
            return _up_from(base, own_paths(own).get(controller))
    return []


def cpu_quota(root: Path = ROOT, own: Path = OWN) -> float | None:
    """CPUs' worth of time this process's cgroups may use (a container's ``--cpus``, a Kubernetes CPU limit, a
    quota on a parent slice): the least over them of ``cpu.max``'s quota over its period (v2) and
    ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (v1); None for no limit."""
    quotas = []
    for d in v2_dirs(root, own):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota.isdigit() and period.isdigit() and int(period) > 0:  # "max": no limit here
            quotas.append(int(quota) / int(period))
    for d in v1_dirs("cpu", root, own):
        quota, period = read_int(d / "cpu.cfs_quota_us"), read_int(d / "cpu.cfs_period_us")  # -1: no limit
        if quota is not None and period:
            quotas.append(quota / period)
    return min(quotas, default=None)

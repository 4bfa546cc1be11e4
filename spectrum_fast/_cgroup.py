"""Reading this process's control groups (Linux cgroup v2 and v1): the limits a container or batch scheduler
puts on memory and CPU, which the machine-wide figures do not show.

A limit set on any cgroup above the process applies to it too (a Slurm job's memory limit sits on the job's
cgroup, the process in a step or task cgroup below it; a systemd slice above a service), so every function
here looks at the process's own cgroup and each one above it that it can see, and the tightest limit wins.
Where each hierarchy is mounted, and which of its cgroups the mount shows, comes from
``/proc/self/mountinfo`` (a container without a cgroup namespace mounts its own cgroup as the root of the
folder); without it, v2 is taken to be mounted at ``/sys/fs/cgroup`` and v1's controllers in folders below.
Nothing here raises on odd files: what cannot be read or parsed is no limit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
OWN = Path("/proc/self/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")
V2 = ""  # the key of the unified hierarchy, as /proc/self/cgroup writes its controllers ("0::/path")
CONTROLLERS = ("memory", "cpu")  # the v1 hierarchies read here
# without a mount table: where cgroup v1 mounts each controller's hierarchy under ROOT
_V1_FOLDERS = {"memory": ("memory",), "cpu": ("cpu", "cpu,cpuacct", "cpuacct,cpu")}


def read_text(path: Path) -> str | None:
    """The file's text (bytes that are not UTF-8 kept as in file names); None where it is missing or unreadable."""
    try:
        return path.read_text(errors="surrogateescape")
    except (OSError, ValueError):
        return None


def count(text: str) -> int | None:
    """A plain decimal count of at most 20 digits (any 64-bit one); None for anything else ("max", "-1", "")."""
    text = text.strip()
    return int(text) if len(text) <= 20 and text.isascii() and text.isdigit() else None


def read_int(path: Path) -> int | None:
    """The file's integer; None where it is missing, unreadable or not a plain count ("max", "-1")."""
    text = read_text(path)
    return None if text is None else count(text)


def stat(path: Path, key: str) -> int:
    """One counter of a cgroup's ``key value`` file (``memory.stat``, ``cpu.stat``, ``memory.oom_control``); 0
    where the file or the key is missing or the value is not a count."""
    for line in (read_text(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return count(value) or 0
    return 0


def own_paths(own: Path = OWN) -> dict[str, str]:
    """This process's cgroup path per v1 controller (``"4:memory:/slurm/job_7"`` -> ``{"memory": ...}``), and
    its cgroup v2 path under the key :data:`V2` (``"0::/kubepods/pod1"``); empty where ``own`` is unreadable."""
    paths: dict[str, str] = {}
    for line in (read_text(own) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [V2]:
                paths[controller] = parts[2]
    return paths


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)  # mountinfo writes " " as "\040"


def mounts(mountinfo: Path = MOUNTINFO) -> dict[str, list[tuple[str, Path]]]:
    """Per hierarchy (a v1 controller of :data:`CONTROLLERS`, or :data:`V2`), its mounts in the table's order:
    the cgroup each shows as its root, and where it is; empty where ``mountinfo`` is unreadable."""
    found: dict[str, list[tuple[str, Path]]] = {}
    for line in (read_text(mountinfo) or "").splitlines():
        # "ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS"; names escape spaces
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(" "), tail.split(" ")
        if not sep or len(fields) < 6 or len(after) < 3 or after[0] not in ("cgroup", "cgroup2"):
            continue
        mount = (_unescape(fields[3]), Path(_unescape(fields[4])))
        for key in [V2] if after[0] == "cgroup2" else [c for c in CONTROLLERS if c in after[2].split(",")]:
            found.setdefault(key, []).append(mount)
    return found


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def _mount_for(path: str | None, candidates: list[tuple[str, Path]]) -> tuple[str, Path]:
    """Of a hierarchy's mounts, the one that shows the most of the way to ``path``: the longest root above it
    (roots outside this cgroup namespace, ``/../x``, last); the first mount where none is above it."""
    usable = [m for m in candidates if ".." not in Path(m[0]).parts] or candidates
    above = [m for m in usable if path is not None and _under(path, m[0])]
    return max(above, key=lambda m: len(m[0])) if above else usable[0]


def _up_from(base: Path, path: str) -> list[Path]:
    """``base / path`` and every folder above it up to ``base``, innermost first; only ``base`` where that folder
    does not exist."""
    rel = Path(path.lstrip("/"))
    if not os.path.isdir(base / rel):
        return [base]
    return [base / p for p in (rel, *rel.parents)]


def _dirs(key: str, own: Path, mountinfo: Path, fallback: Path | None) -> list[Path]:
    """The folders of hierarchy ``key`` whose limits apply to this process, innermost first: its own cgroup and
    those above it, as far up as the mount shows; empty where the process's cgroup is outside what is mounted
    (``/proc/self/cgroup`` writes ``/../x`` for a cgroup outside this cgroup namespace). ``fallback`` is where
    the hierarchy is taken to be mounted, showing its root, when the mount table is unreadable."""
    path = own_paths(own).get(key)
    table = mounts(mountinfo)
    if table:
        if key not in table:
            return []
        root, base = _mount_for(path, table[key])
    elif fallback is not None:
        root, base = "/", fallback
    else:
        return []
    if path is None:
        return [base]
    if ".." in Path(path).parts:
        return []
    if root != "/":  # the mount shows the subtree under `root` (a container without a cgroup namespace)
        if not _under(path, root):
            return [base]  # the process's own cgroup is the mount's root, by the container's convention
        path = path[len(root):]
    return _up_from(base, path)


def v2_dirs(root: Path = ROOT, own: Path = OWN, mountinfo: Path = MOUNTINFO) -> list[Path]:
    """The cgroup v2 folders whose limits apply to this process, innermost first (``root`` is where v2 is taken
    to be mounted when ``mountinfo`` is unreadable)."""
    return _dirs(V2, own, mountinfo, root)


def v1_dirs(controller: str, root: Path = ROOT, own: Path = OWN, mountinfo: Path = MOUNTINFO) -> list[Path]:
    """The cgroup v1 folders of ``controller`` (``"memory"``, ``"cpu"``) whose limits apply to this process,
    innermost first; empty where that hierarchy is not mounted."""
    fallback = next((root / name for name in _V1_FOLDERS[controller] if os.path.isdir(root / name)), None)
    return _dirs(controller, own, mountinfo, fallback)


def cpu_quota(root: Path = ROOT, own: Path = OWN, mountinfo: Path = MOUNTINFO) -> float | None:
    """CPUs' worth of time this process's cgroups may use (a container's ``--cpus``, a Kubernetes CPU limit, a
    quota on a parent slice): the least over them of ``cpu.max``'s quota over its period (v2) and
    ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (v1); None for no limit."""
    quotas = []
    for d in v2_dirs(root, own, mountinfo):
        fields = (read_text(d / "cpu.max") or "").split()
        quota, period = (count(fields[0]), count(fields[1])) if len(fields) >= 2 else (None, None)  # "max": none
        if quota is not None and period:
            quotas.append(quota / period)
    for d in v1_dirs("cpu", root, own, mountinfo):
        quota, period = read_int(d / "cpu.cfs_quota_us"), read_int(d / "cpu.cfs_period_us")  # -1: no limit
        if quota is not None and period:
            quotas.append(quota / period)
    return min(quotas, default=None)

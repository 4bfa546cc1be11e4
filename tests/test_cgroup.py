"""Control-group limits: the process's own cgroup and every one above it count (a Slurm job's limit sits
above the step's cgroup the process runs in), on fake cgroup trees and, where the tests run as root on a
writable cgroup v1 hierarchy, in a real cgroup with a real memory limit and CPU quota."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from spectrum_fast import _cgroup, memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_cgroup  # (its cgroup maker and mover, for the test in a real cgroup)

GIB = 1 << 30


def _v1_memory(d: Path, limit: int, usage: int, inactive: int = 0) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {inactive}\n")


def _v1_quota(d: Path, cpus: float) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "cpu.cfs_period_us").write_text("100000\n")
    (d / "cpu.cfs_quota_us").write_text(f"{int(cpus * 100000)}\n")


def _table(tmp_path: Path, *mounts: tuple[str, str, str, str]) -> Path:
    """A mountinfo file: (cgroup shown as the root, folder under tmp_path, fstype, superblock options) each."""
    lines = [f"{30 + i} 23 0:{40 + i} {root} {tmp_path / folder} rw,relatime shared:9 - {fstype} {fstype} {opts}"
             for i, (root, folder, fstype, opts) in enumerate(mounts)]
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(["22 1 8:1 / / rw - ext4 /dev/sda1 rw", *lines]) + "\n")
    return path


NO_LIMIT = 2**63 - 4096  # v1's "no limit"


def test_own_paths_per_controller(tmp_path):
    own = tmp_path / "self_cgroup"
    own.write_text("12:memory:/slurm/uid_1/job_7/step_0\n3:cpu,cpuacct:/slurm/uid_1/job_7\n1:name=systemd:/\n0::/\n")
    assert _cgroup.own_paths(own) == {"memory": "/slurm/uid_1/job_7/step_0", "cpu": "/slurm/uid_1/job_7",
                                      "cpuacct": "/slurm/uid_1/job_7", "name=systemd": "/", "": "/"}
    assert _cgroup.own_paths(tmp_path / "missing") == {}


def test_mounts_from_the_mount_table(tmp_path):
    table = _table(tmp_path, ("/", "cg/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"), ("/", "cg/my memory", "cgroup", "rw,memory"),
                   ("/", "cg/pids", "cgroup", "rw,pids"), ("/", "cg/unified", "cgroup2", "rw,nsdelegate"),
                   ("/pod 1", "elsewhere/memory", "cgroup", "rw,memory"))
    text = table.read_text().replace("my memory", "my\\040memory").replace("/pod 1", "/pod\\0401")  # as the kernel
    lines = [
        f"50 23 0:50 / {tmp_path}/no-optional rw - cgroup cgroup rw,memory",  # no optional fields
        f"51 23 0:51 /a\\134b {tmp_path}/many rw shared:1 master:2 propagate_from:3 - cgroup cgroup rw,memory",
        f"52 23 0:52 / {tmp_path}/nameless rw - cgroup2  rw,nsdelegate",  # an empty source
        "1 2 3", "-", "53 23 0:53 / /x rw - cgroup", "54 23 0:54 / /y rw - - cgroup x rw,memory",  # malformed
    ]
    table.write_text(text + "\n".join(lines) + "\n")
    assert _cgroup.mounts(table) == {
        "cpu": [("/", tmp_path / "cg/cpu,cpuacct")], "": [("/", tmp_path / "cg/unified"), ("/", tmp_path / "nameless")],
        "memory": [("/", tmp_path / "cg/my memory"), ("/pod 1", tmp_path / "elsewhere/memory"),
                   ("/", tmp_path / "no-optional"), ("/a\\b", tmp_path / "many")]}
    assert _cgroup.mounts(tmp_path / "missing") == {}


def test_the_mount_that_shows_the_processs_cgroup_is_read(tmp_path):
    """Two mounts of the memory hierarchy: the host's whole tree, and (listed first) a bind mount of a pod's
    cgroup, as in a container that sees a sub-cgroup of the host's through a volume."""
    own = tmp_path / "self_cgroup"
    table = _table(tmp_path, ("/kubepods/pod1", "pod", "cgroup", "rw,memory"), ("/", "host", "cgroup", "rw,memory"),
                   ("/../..", "outside", "cgroup", "rw,cpu"))
    _v1_memory(tmp_path / "pod" / "worker", 3 * GIB, 1 * GIB)
    _v1_memory(tmp_path / "host" / "other", 5 * GIB, 1 * GIB)
    own.write_text("4:memory:/kubepods/pod1/worker\n")
    assert _cgroup.v1_dirs("memory", tmp_path, own, table) == [tmp_path / "pod/worker", tmp_path / "pod"]
    assert memory._cgroup_available(tmp_path, own, table) == 2 * GIB
    own.write_text("4:memory:/other\n")  # not under the pod's mount: the host's
    assert memory._cgroup_available(tmp_path, own, table) == 4 * GIB
    own.write_text("3:cpu:/x\n")  # the only cpu mount shows a cgroup outside this namespace: its folder, no deeper
    assert _cgroup.v1_dirs("cpu", tmp_path, own, table) == [tmp_path / "outside"]
    own.write_text("0::/\n")  # the table is readable and has no v2 mount: no v2 limits, not the fallback folder
    (tmp_path / "memory.max").write_text(f"{GIB}\n")
    assert _cgroup.v2_dirs(tmp_path, own, table) == []
    assert _cgroup.v2_dirs(tmp_path, own, tmp_path / "none") == [tmp_path]


def test_a_slurm_jobs_memory_limit_above_the_steps_cgroup_counts(tmp_path):
    own = tmp_path / "self_cgroup"
    own.write_text("4:memory:/slurm/uid_1/job_7/step_0\n0::/\n")
    table = _table(tmp_path, ("/", "memory", "cgroup", "rw,memory"))
    v1 = tmp_path / "memory"
    _v1_memory(v1, NO_LIMIT, 50 * GIB)  # the machine: no limit
    _v1_memory(v1 / "slurm", NO_LIMIT, 50 * GIB)
    _v1_memory(v1 / "slurm" / "uid_1", NO_LIMIT, 20 * GIB)
    _v1_memory(v1 / "slurm" / "uid_1" / "job_7", 16 * GIB, 10 * GIB, inactive=1 * GIB)  # the job's --mem
    _v1_memory(v1 / "slurm" / "uid_1" / "job_7" / "step_0", NO_LIMIT, 9 * GIB)
    assert memory._cgroup_available(tmp_path, own, table) == 7 * GIB  # 16 - 10 + 1: the job's room, not "no limit"
    _v1_memory(v1 / "slurm" / "uid_1" / "job_7" / "step_0", 12 * GIB, 9 * GIB)  # a looser limit on the step ...
    _v1_memory(v1 / "slurm" / "uid_1" / "job_7", 16 * GIB, 15 * GIB)  # ... whose job has 1 GiB left (other steps)
    assert memory._cgroup_available(tmp_path, own, table) == 1 * GIB
    _v1_memory(v1 / "slurm" / "uid_1" / "job_7", 16 * GIB, 10 * GIB)
    assert memory._cgroup_available(tmp_path, own, table) == 3 * GIB  # now the step's own is the tightest
    (v1 / "slurm" / "uid_1" / "job_7" / "memory.use_hierarchy").write_text("0\n")  # old kernels: holds itself only
    _v1_memory(v1 / "slurm" / "uid_1" / "job_7", 16 * GIB, 15 * GIB)
    assert memory._cgroup_available(tmp_path, own, table) == 3 * GIB
    assert _cgroup.v1_dirs("memory", tmp_path, own, table) == [v1 / "slurm/uid_1/job_7/step_0", v1 / "slurm/uid_1/job_7",
                                                               v1 / "slurm/uid_1", v1 / "slurm", v1]
    # the same tree without a mount table: the default folder under the root
    assert memory._cgroup_available(tmp_path, own, tmp_path / "none") == 3 * GIB


def test_a_container_that_sees_only_its_own_cgroup(tmp_path):
    own = tmp_path / "self_cgroup"
    # cgroup v1 without a cgroup namespace: the host's path; the container's mount shows that cgroup as its root
    own.write_text("4:memory:/kubepods/burstable/pod1/abc\n2:cpu,cpuacct:/kubepods/burstable/pod1/abc/worker\n0::/\n")
    table = _table(tmp_path, ("/kubepods/burstable/pod1/abc", "memory", "cgroup", "rw,memory"),
                   ("/kubepods/burstable/pod1/abc", "cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"))
    _v1_memory(tmp_path / "memory", 6 * GIB, 2 * GIB)
    _v1_quota(tmp_path / "cpu,cpuacct", 2.5)
    _v1_quota(tmp_path / "cpu,cpuacct" / "worker", 1.5)  # a cgroup the container made below its own
    assert memory._cgroup_available(tmp_path, own, table) == 4 * GIB
    assert _cgroup.cpu_quota(tmp_path, own, table) == 1.5
    assert _cgroup.v1_dirs("cpu", tmp_path, own, table) == [tmp_path / "cpu,cpuacct/worker", tmp_path / "cpu,cpuacct"]
    assert memory._cgroup_available(tmp_path, own, tmp_path / "none") == 4 * GIB  # no table: the mount's root
    own.write_text("4:memory:/../../outside\n0::/../x\n")  # outside this cgroup namespace: not this mount's limits
    assert _cgroup.v1_dirs("memory", tmp_path, own, table) == []
    assert memory._cgroup_available(tmp_path, own, table) is None
    assert _cgroup.v2_dirs(tmp_path, own, tmp_path / "none") == []


def test_the_tightest_cpu_quota_and_memory_limit_on_the_way_up_wins(tmp_path):
    own = tmp_path / "self_cgroup"
    own.write_text("0::/batch.slice/job.scope\n")
    table = _table(tmp_path, ("/", "", "cgroup2", "rw,nsdelegate"))
    slice_, scope = tmp_path / "batch.slice", tmp_path / "batch.slice" / "job.scope"
    scope.mkdir(parents=True)
    (scope / "cpu.max").write_text("max 100000\n")
    (scope / "memory.max").write_text("max\n")
    (slice_ / "cpu.max").write_text("300000 100000\n")  # the slice: 3 CPUs for all its jobs
    (slice_ / "memory.max").write_text(f"{8 * GIB}\n")
    (slice_ / "memory.current").write_text(f"{5 * GIB}\n")
    assert _cgroup.cpu_quota(tmp_path, own, table) == 3.0
    assert memory._cgroup_available(tmp_path, own, table) == 3 * GIB
    (scope / "cpu.max").write_text("150000 100000\n")
    (scope / "memory.max").write_text(f"{4 * GIB}\n")
    (scope / "memory.current").write_text(f"{2 * GIB}\n")
    assert _cgroup.cpu_quota(tmp_path, own, table) == 1.5
    assert memory._cgroup_available(tmp_path, own, table) == 2 * GIB
    (scope / "cpu.max").write_text("800000 100000\n")  # the scope's own limits looser than the slice's
    (slice_ / "memory.current").write_text(f"{7 * GIB}\n")
    assert _cgroup.cpu_quota(tmp_path, own, table) == 3.0
    assert memory._cgroup_available(tmp_path, own, table) == 1 * GIB
    (scope / "memory.current").write_text(f"{5 * GIB}\n")  # over the limit (reclaim pending): no room, not less
    assert memory._cgroup_available(tmp_path, own, table) == 0
    (scope / "memory.current").write_text(f"{2 * GIB}\n")
    (slice_ / "memory.current").write_text(f"{5 * GIB}\n")
    (scope / "memory.high").write_text(f"{3 * GIB}\n")  # systemd's MemoryHigh=: throttled above it
    assert memory._cgroup_available(tmp_path, own, table) == 1 * GIB
    (scope / "memory.high").write_text("max\n")
    assert memory._cgroup_available(tmp_path, own, table) == 2 * GIB


def test_odd_files_are_no_limit_never_an_error(tmp_path):
    own = tmp_path / "self_cgroup"
    own.write_bytes(b"0::/caf\xe9\n")  # a cgroup name that is not UTF-8 is still a name
    (tmp_path / os.fsdecode(b"caf\xe9")).mkdir()
    (tmp_path / os.fsdecode(b"caf\xe9") / "memory.max").write_text(f"{2 * GIB}\n")
    assert memory._cgroup_available(tmp_path, own, tmp_path / "none") == 2 * GIB
    own.write_text("0::/job\n" + "x" * 5000 + "\n")
    job = tmp_path / "job"
    job.mkdir()
    (job / "cpu.max").write_text("\u00b2 100000\n")  # a digit to str.isdigit, not to int()
    (job / "memory.max").write_text(f"{4 * GIB}\n")
    (job / "memory.stat").write_text("inactive_file \u00b3\n")
    assert _cgroup.cpu_quota(tmp_path, own, tmp_path / "none") is None
    assert memory._cgroup_available(tmp_path, own, tmp_path / "none") == 4 * GIB
    (job / "cpu.max").write_text("9" * 5000 + " 1\n")  # more digits than int() takes, or a float holds
    (job / "memory.max").write_text("9" * 400 + "\n")
    assert _cgroup.cpu_quota(tmp_path, own, tmp_path / "none") is None
    assert memory._cgroup_available(tmp_path, own, tmp_path / "none") is None
    own.write_text("0::/" + "y" * 5000 + "\n")  # a name too long for the file system
    assert _cgroup.v2_dirs(tmp_path, own, tmp_path / "none") == [tmp_path]
    (tmp_path / "mountinfo").write_bytes(b"31 23 0:28 / /sys/fs/cgroup/caf\xe9 rw - cgroup2 cgroup2 rw\n")
    assert _cgroup.mounts(tmp_path / "mountinfo") == {"": [("/", Path(os.fsdecode(b"/sys/fs/cgroup/caf\xe9")))]}


def test_an_own_cgroup_without_use_hierarchy_still_holds_itself(tmp_path):
    own = tmp_path / "self_cgroup"
    own.write_text("4:memory:/job\n")
    table = _table(tmp_path, ("/", "memory", "cgroup", "rw,memory"))
    _v1_memory(tmp_path / "memory", 8 * GIB, 1 * GIB)
    (tmp_path / "memory" / "memory.use_hierarchy").write_text("0\n")  # the root holds only itself
    _v1_memory(tmp_path / "memory" / "job", 6 * GIB, 1 * GIB)
    (tmp_path / "memory" / "job" / "memory.use_hierarchy").write_text("0\n")
    assert memory._cgroup_available(tmp_path, own, table) == 5 * GIB
    (tmp_path / "memory" / "memory.use_hierarchy").write_text("1\n")
    _v1_memory(tmp_path / "memory", 4 * GIB, 1 * GIB)
    assert memory._cgroup_available(tmp_path, own, table) == 3 * GIB


@contextmanager
def _real_cgroups(name: str) -> Iterator[dict[str, Path]]:
    """Per controller (memory, cpu), a new cgroup ``name`` below this process's own v1 cgroup and a cgroup
    ``inner`` in it (bench/bench_cgroup.py's, removed afterwards); skips where they cannot be made (not root, no
    writable v1)."""
    with ExitStack() as stack:
        try:
            stack.enter_context(bench_cgroup.cgroup(name))
            inner = stack.enter_context(bench_cgroup.cgroup(f"{name}/inner"))
        except SystemExit as e:  # the bench's one-line error
            pytest.skip(str(e))
        yield inner


def test_a_process_in_a_real_cgroup_sees_the_limits_above_it():
    """Half a CPU's quota and a 3 GiB memory limit on a new cgroup, looser ones on a cgroup inside it: a process
    moved into the inner one reports the outer limits, scans with one worker, and the diagnostics say why."""
    with _real_cgroups(f"spectrum_fast_test_{os.getpid()}") as inner:
        mem, cpu = inner["memory"], inner["cpu"]
        period = _cgroup.read_int(cpu.parent / "cpu.cfs_period_us") or 100000
        try:
            (mem.parent / "memory.limit_in_bytes").write_text(str(3 * GIB))
            (mem / "memory.limit_in_bytes").write_text(str(8 * GIB))
            (cpu.parent / "cpu.cfs_quota_us").write_text(str(period // 2))
        except OSError as e:  # e.g. a tighter quota above this process already (a child's may not exceed it)
            pytest.skip(f"cannot set the test cgroup's limits here ({e.strerror})")
        code = ("from spectrum_fast import _cgroup, distributed, memory, scanner; "
                "print(_cgroup.cpu_quota(), memory._cgroup_available(), distributed.cores_per_rank(), "
                "*scanner._parallelism(None))")
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "SPECTRUM_FAST_MEMORY_GB")}

        def inside(*cmd: str) -> str:  # cmd's output, run as a process of the inner cgroups
            done = subprocess.run([*bench_cgroup.entering(inner), *cmd], check=False, capture_output=True, text=True,
                                  env=env, timeout=120)
            assert done.returncode == 0, done.stderr
            return done.stdout

        quota, room, cores, workers, threads = inside(sys.executable, "-c", code).split()
        assert float(quota) == 0.5
        assert 0 < int(room) <= 3 * GIB
        assert (cores, workers, threads) == ("1", "1", "1")
        diag = inside(sys.executable, "-m", "spectrum_fast")
        assert "CPU: 1 core for a scan (cgroup quota 0.5 CPUs): 1 worker x 1 BLAS thread" in diag, diag
        budget = re.search(r"CPU: memory budget: ([0-9.]+) GiB .*\(memory cgroup room ([0-9.]+) GiB\)", diag)
        assert budget and 0 < float(budget[2]) <= 3.05, diag  # the outer cgroup's room, not the machine's
        assert float(budget[1]) <= memory.SHARE * float(budget[2]) + 0.05, diag

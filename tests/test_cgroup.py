"""Control-group limits: the process's own cgroup and every one above it count (a Slurm job's limit sits
above the step's cgroup the process runs in), on fake cgroup trees and, where the tests run as root on a
writable cgroup v1 hierarchy, in a real cgroup with a real memory limit and CPU quota."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spectrum_fast import _cgroup, memory

GIB = 1 << 30


def _v1_memory(d: Path, limit: int, usage: int, inactive: int = 0) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {inactive}\n")


def test_own_paths_per_controller(tmp_path):
    own = tmp_path / "self_cgroup"
    own.write_text("12:memory:/slurm/uid_1/job_7/step_0\n3:cpu,cpuacct:/slurm/uid_1/job_7\n1:name=systemd:/\n0::/\n")
    assert _cgroup.own_paths(own) == {"memory": "/slurm/uid_1/job_7/step_0", "cpu": "/slurm/uid_1/job_7",
                                      "cpuacct": "/slurm/uid_1/job_7", "name=systemd": "/", "": "/"}
    assert _cgroup.own_paths(tmp_path / "missing") == {}


def test_a_slurm_jobs_memory_limit_above_the_steps_cgroup_counts(tmp_path):
    own = tmp_path / "self_cgroup"
    own.write_text("4:memory:/slurm/uid_1/job_7/step_0\n0::/\n")
    v1 = tmp_path / "memory"
    _v1_memory(v1, 2**63 - 4096, 50 * GIB)  # the machine: no limit
    _v1_memory(v1 / "slurm", 2**63 - 4096, 50 * GIB)
    _v1_memory(v1 / "slurm" / "uid_1", 2**63 - 4096, 20 * GIB)
    _v1_memory(v1 / "slurm" / "uid_1" / "job_7", 16 * GIB, 10 * GIB, inactive=1 * GIB)  # the job's --mem
    _v1_memory(v1 / "slurm" / "uid_1" / "job_7" / "step_0", 2**63 - 4096, 9 * GIB)
    assert memory._cgroup_available(tmp_path, own) == 7 * GIB  # 16 - 10 + 1: the job's room, not "no limit"
    _v1_memory(v1 / "slurm" / "uid_1" / "job_7" / "step_0", 12 * GIB, 9 * GIB)  # a tighter limit on the step
    assert memory._cgroup_available(tmp_path, own) == 3 * GIB
    assert _cgroup.v1_dirs("memory", tmp_path, own) == [v1 / "slurm/uid_1/job_7/step_0", v1 / "slurm/uid_1/job_7",
                                                        v1 / "slurm/uid_1", v1 / "slurm", v1]


def test_a_container_that_sees_only_its_own_cgroup_reads_the_mounts_root(tmp_path):
    own = tmp_path / "self_cgroup"
    # cgroup v1 without a cgroup namespace: the host's path, which is not under the container's mount
    own.write_text("4:memory:/kubepods/burstable/pod1/abc\n2:cpu,cpuacct:/kubepods/burstable/pod1/abc\n0::/\n")
    _v1_memory(tmp_path / "memory", 6 * GIB, 2 * GIB)
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("250000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert memory._cgroup_available(tmp_path, own) == 4 * GIB
    assert _cgroup.cpu_quota(tmp_path, own) == 2.5
    own.write_text("4:memory:/../../outside\n0::/../x\n")  # a cgroup outside this namespace's view
    assert _cgroup.v1_dirs("memory", tmp_path, own) == [tmp_path / "memory"]
    assert _cgroup.v2_dirs(tmp_path, own) == [tmp_path]


def test_the_tightest_cpu_quota_and_memory_limit_on_the_way_up_wins(tmp_path):
    own = tmp_path / "self_cgroup"
    own.write_text("0::/batch.slice/job.scope\n")
    scope = tmp_path / "batch.slice" / "job.scope"
    scope.mkdir(parents=True)
    (scope / "cpu.max").write_text("max 100000\n")
    (scope / "memory.max").write_text("max\n")
    (tmp_path / "batch.slice" / "cpu.max").write_text("300000 100000\n")  # the slice: 3 CPUs for all its jobs
    (tmp_path / "batch.slice" / "memory.max").write_text(f"{8 * GIB}\n")
    (tmp_path / "batch.slice" / "memory.current").write_text(f"{5 * GIB}\n")
    assert _cgroup.cpu_quota(tmp_path, own) == 3.0
    assert memory._cgroup_available(tmp_path, own) == 3 * GIB
    (scope / "cpu.max").write_text("150000 100000\n")
    (scope / "memory.max").write_text(f"{4 * GIB}\n")
    (scope / "memory.current").write_text(f"{2 * GIB}\n")
    assert _cgroup.cpu_quota(tmp_path, own) == 1.5
    assert memory._cgroup_available(tmp_path, own) == 2 * GIB
    (scope / "memory.current").write_text(f"{5 * GIB}\n")  # over the limit (reclaim pending): no room, not less
    assert memory._cgroup_available(tmp_path, own) == 0


def _writable_v1_child(controller: str, name: str) -> Path:
    dirs = _cgroup.v1_dirs(controller)
    if not dirs:
        pytest.skip(f"no cgroup v1 {controller} hierarchy mounted here")
    child = dirs[0] / name
    try:
        child.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup here ({e.strerror}): needs root and a writable cgroup v1 {controller}")
    return child


def test_a_process_in_a_real_cgroup_sees_its_limits():
    """A child cgroup of this process's own, with a memory limit and half a CPU's quota: the process moved into
    it reports both, scans with one worker, and the diagnostics say why."""
    name = f"spectrum_fast_test_{os.getpid()}"
    made: list[Path] = []
    try:
        for controller in ("memory", "cpu"):
            made.append(_writable_v1_child(controller, name))
        mem, cpu = made
        (mem / "memory.limit_in_bytes").write_text(str(3 * GIB))
        (cpu / "cpu.cfs_quota_us").write_text(str(int(_cgroup.read_int(cpu / "cpu.cfs_period_us") or 100000) // 2))
        code = ("from spectrum_fast import _cgroup, distributed, memory, scanner; "
                "print(_cgroup.cpu_quota(), memory._cgroup_available(), distributed.cores_per_rank(), "
                "*scanner._parallelism(None))")
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "SPECTRUM_FAST_MEMORY_GB")}
        enter = f'echo $$ > "{mem}/cgroup.procs" && echo $$ > "{cpu}/cgroup.procs" && exec "$@"'

        def inside(*cmd: str) -> str:  # cmd's output, run as a process of the new cgroup
            done = subprocess.run(["sh", "-c", enter, "sh", *cmd], check=False, capture_output=True, text=True,
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
        assert budget and 0 < float(budget[2]) <= 3.05, diag  # the cgroup's room, not the machine's
        assert float(budget[1]) <= memory.SHARE * float(budget[2]) + 0.05, diag
    finally:
        for d in made:  # empty again: the processes in it have exited
            d.rmdir()

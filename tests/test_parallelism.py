"""How a CPU scan splits the cores it may use: among the ranks torchrun started on one machine, then among
the scan's workers (matrices at once) and their BLAS threads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from spectrum_fast import _cgroup, distributed, scanner
from spectrum_fast.errors import SpectrumError


@pytest.fixture
def no_quota(monkeypatch):
    monkeypatch.setattr(distributed, "cpu_quota", lambda: None)


def test_ranks_on_one_machine_split_its_cores(monkeypatch, no_quota):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert distributed.cores_per_rank() == 16
    assert scanner._parallelism(None) == (2, 8)
    assert scanner._parallelism(4) == (4, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4: 4 cores each, not 16
    assert distributed.cores_per_rank() == 4
    assert scanner._parallelism(None) == (2, 2)
    assert scanner._parallelism(1) == (1, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more ranks than cores: one core, one worker each
    assert distributed.cores_per_rank() == 1
    assert scanner._parallelism(None) == (1, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "many")
    assert distributed.local_world_size() == 1
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.local_rank() == 3
    monkeypatch.setenv("LOCAL_RANK", "x")
    assert distributed.local_rank() == 0
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.local_rank() == 0
    with pytest.raises(SpectrumError, match="workers must be at least 1, got 0"):
        scanner._parallelism(0)


def test_read_ahead_threads_follow_the_process_cores(monkeypatch, no_quota):
    """The GPU scan's read-ahead (cuda_engine.warm_threads) takes a quarter of this process's cores, 1 to 4: a
    16-core GPU host alone 4, its 8 torchrun ranks 1 each (not 4 each: 32 readers on 16 cores), a 2-core
    machine 1, a 64-core container with a 6-CPU quota 1."""
    from spectrum_fast import cuda_engine

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # never the machine's count
    for cores, ranks, threads in [(16, 1, 4), (16, 8, 1), (64, 1, 4), (64, 4, 4), (64, 8, 2), (2, 1, 1), (7, 1, 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert cuda_engine.warm_threads() == threads, (cores, ranks)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(distributed, "cpu_quota", lambda: 6.0)
    assert cuda_engine.warm_threads() == 1


def test_the_cores_are_the_process_affinity_not_the_machine(monkeypatch, no_quota):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # taskset -c 0,1 / a cgroup cpuset
    assert distributed.cores_per_rank() == 2
    assert scanner._parallelism(None) == (2, 1)


def test_a_cpu_quota_caps_the_cores(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core node ...
    monkeypatch.setattr(distributed, "cpu_quota", lambda: 4.0)  # ... and a container of 4 CPUs
    assert distributed.cores_per_rank() == 4
    assert scanner._parallelism(None) == (2, 2)
    monkeypatch.setattr(distributed, "cpu_quota", lambda: 2.5)
    assert distributed.cores_per_rank() == 3
    monkeypatch.setattr(distributed, "cpu_quota", lambda: 0.2)
    assert distributed.cores_per_rank() == 1
    monkeypatch.setattr(distributed, "cpu_quota", lambda: 128.0)  # a quota above the affinity: the affinity
    assert distributed.cores_per_rank() == 64
    monkeypatch.setattr(distributed, "cpu_quota", lambda: 8.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.cores_per_rank() == 2


def test_cpu_quota_from_cgroup_files(tmp_path):
    no_table = tmp_path / "no_mountinfo"  # no mount table: v2 at the root, v1 in folders below it
    own = tmp_path / "self_cgroup"
    own.write_text("0::/kubepods/pod1\n")
    pod = tmp_path / "kubepods" / "pod1"
    pod.mkdir(parents=True)
    (pod / "cpu.max").write_text("400000 100000\n")  # cgroup v2, the process's own cgroup
    assert _cgroup.cpu_quota(tmp_path, own, no_table) == 4.0
    (pod / "cpu.max").write_text("max 100000\n")
    assert _cgroup.cpu_quota(tmp_path, own, no_table) is None
    (pod / "cpu.max").unlink()
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # in a cgroup namespace: the root
    assert _cgroup.cpu_quota(tmp_path, own, no_table) == 1.5
    (tmp_path / "cpu.max").unlink()
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # cgroup v1: no limit
    assert _cgroup.cpu_quota(tmp_path, own, no_table) is None
    (v1 / "cpu.cfs_quota_us").write_text("800000\n")
    assert _cgroup.cpu_quota(tmp_path, own, no_table) == 8.0
    assert _cgroup.cpu_quota(tmp_path / "missing", tmp_path / "missing_self", no_table) is None


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_a_pinned_process_sees_its_own_cores():
    code = "from spectrum_fast import distributed, scanner; print(distributed.cores_per_rank(), *scanner._parallelism(None))"
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_WORLD_SIZE"}
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    assert out == ["1", "1", "1"]

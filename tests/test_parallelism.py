"""How a CPU scan splits the cores it may use: among the ranks torchrun started on one machine, then among
the scan's workers (matrices at once) and their BLAS threads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from spectrum_fast import distributed, scanner
from spectrum_fast.errors import SpectrumError


def test_ranks_on_one_machine_split_its_cores(monkeypatch):
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
    with pytest.raises(SpectrumError, match="workers must be at least 1, got 0"):
        scanner._parallelism(0)


def test_the_cores_are_the_process_affinity_not_the_machine(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # taskset -c 0,1 / a cgroup cpuset
    assert distributed.cores_per_rank() == 2
    assert scanner._parallelism(None) == (2, 1)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_a_pinned_process_sees_its_own_cores():
    code = "from spectrum_fast import distributed, scanner; print(distributed.cores_per_rank(), *scanner._parallelism(None))"
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_WORLD_SIZE"}
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    assert out == ["1", "1", "1"]

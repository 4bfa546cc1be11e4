"""bench/bench_cgroup.py on tiny shapes, where the tests run as root on a writable cgroup v1 hierarchy: every
scenario's scans finish inside their cgroups, against a copy of this tree, with the same SNRs, and the cgroups'
counters come back (the quota scenario's CPU time is throttled, the memory scenario's peak is under its limit)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from spectrum_fast import _cgroup

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
bench = pytest.importorskip("bench_cgroup")


def _writable_v1() -> bool:
    for controller in ("memory", "cpu"):
        dirs = _cgroup.v1_dirs(controller)
        if not dirs or not os.access(dirs[0], os.W_OK):
            return False
    return True


@pytest.mark.skipif(not _writable_v1(), reason="needs root and writable cgroup v1 memory and cpu hierarchies")
def test_scans_in_real_cgroups_against_a_baseline_tree(tmp_path):
    baseline = tmp_path / "baseline"
    shutil.copytree(ROOT / "spectrum_fast", baseline / "spectrum_fast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    out = tmp_path / "cgroup.json"
    assert bench.main(["--baseline", str(baseline), "--shape", "600x200", "--count", "2", "--cpus", "0.5",
                       "--mem-gib", "2", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["scenarios"]) == {"none", "quota", "memory"}
    for name, scenario in doc["scenarios"].items():
        assert scenario["ours"]["exit"] == 0 and scenario["baseline"]["exit"] == 0, name
        assert scenario["baseline"]["imported"].startswith(str(baseline)), name
        assert scenario["max_rel_snr_diff"] == 0.0 and scenario["same_routes"], name
        assert scenario["ours"]["oom_kills"] == 0, name
    assert doc["scenarios"]["none"]["ours"]["nr_throttled"] == 0  # no quota, never throttled
    quota = doc["scenarios"]["quota"]
    assert quota["ours"]["nr_throttled"] > 0 and quota["baseline"]["nr_throttled"] > 0  # importing torch at 0.5 CPU
    assert 0 < doc["scenarios"]["memory"]["ours"]["cgroup_peak_gb"] <= 2.0
    assert not any((_cgroup.v1_dirs(d)[0] / f"spectrum_fast_bench_{os.getpid()}").exists()
                   for d in ("memory", "cpu"))  # the cgroups are gone

"""The band solver's phases are free of data races with a GPU block's partition of the work: the host
executor (csrc/band_solver_host.cpp) runs csrc/band_solver.h with teams of 32 and 64 threads in groups of 32
lanes (a CUDA block of one and of two warps) under ThreadSanitizer (tests/native/race_check.cpp). A read or
write not ordered by a barrier against another thread's write is reported there, and would be a race in the
CUDA kernel too, whose phases and barriers are the same code. The driver also checks that the chase variants
agree with each other (bit for bit where only the batching of the updates differs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "native" / "race_check.cpp"


@pytest.fixture(scope="module")
def race_check(tmp_path_factory) -> Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("tsan") / "race_check"
    probe = subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-fsanitize=thread", "-pthread", str(DRIVER), "-o", str(exe)],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        if "tsan" in probe.stderr.lower() or "sanitize" in probe.stderr.lower():
            pytest.skip(f"{cxx} cannot build with ThreadSanitizer here: {probe.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"race_check.cpp does not compile:\n{probe.stderr}")
    return exe


def test_band_solver_and_panel_qr_have_no_data_races(race_check):
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66 report_signal_unsafe=0")
    run = subprocess.run([str(race_check)], capture_output=True, text=True, env=env, timeout=600, check=False)
    if "unexpected memory mapping" in run.stderr:
        pytest.skip("ThreadSanitizer cannot run on this kernel's memory layout")
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    cases = re.findall(r"^case .* variant_diff=(\S+) twins=(\d)$", run.stdout, re.MULTILINE)
    assert len(cases) == 7, run.stdout
    assert all(float(d) <= 1e-13 and t == "1" for d, t in cases), run.stdout
    panel = re.findall(r"^panel .* diff=(\S+)$", run.stdout, re.MULTILINE)
    assert len(panel) == 1 and float(panel[0]) <= 1e-12, run.stdout

"""bench/bench_guard.py on the CPU: the guard's error model bounds the fp32 route's measured eigenvalue errors,
and every SNR the guard accepts is within SPEC.md's 1e-4 of the float64 route."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench_guard = pytest.importorskip("bench_guard")


def test_error_model_bounds_the_measured_fp32_errors(tmp_path):
    out = tmp_path / "guard.json"
    assert bench_guard.main(["--device", "cpu", "--sizes", "96", "320", "--count", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["k"] for r in rows] == [96] * 4 + [320] * 4
    assert {tuple(r["shape"]) for r in rows} == {(336, 96), (96, 96), (1120, 320), (320, 320)}
    for r in rows:
        assert 0 < r["max_ratio"] < 1, r  # measured error below the modelled bound, and not zero (it measured)
        if r["guard_accepts"]:
            assert r["snr_rel_err"] <= 1e-4, r
    assert any(r["guard_accepts"] for r in rows)

"""bench/bench_guard.py on the CPU: the guard's error model bounds the fp32 route's measured eigenvalue errors,
and every SNR the guard accepts is within SPEC.md's 1e-4 of the float64 route."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench_guard = pytest.importorskip("bench_guard")


@pytest.mark.parametrize("solver,min_k", [("syevr", "100000"), ("syevd_2stage", "1")])
def test_error_model_bounds_the_measured_fp32_errors(tmp_path, monkeypatch, solver, min_k):
    """With each of the CPU's eigensolvers (MRRR; LAPACK's two-stage solver, which the engine uses from
    cpu_engine.TWO_STAGE_MIN_K)."""
    from spectrum_fast import cpu_engine, lapack

    if solver == "syevd_2stage" and not lapack.syevd_2stage_available(np.float32):
        pytest.skip("no LAPACKE ssyevd_2stage in this scipy's OpenBLAS")
    monkeypatch.setattr(cpu_engine, "TWO_STAGE_MIN_K", cpu_engine.TWO_STAGE_MIN_K)  # the bench sets it
    out = tmp_path / "guard.json"
    assert bench_guard.main(["--device", "cpu", "--sizes", "96", "320", "--count", "2",
                             "--cpu-two-stage-min-k", min_k, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["k"] for r in rows] == [96] * 4 + [320] * 4
    assert {r["solver"] for r in rows} == {solver}
    assert {tuple(r["shape"]) for r in rows} == {(336, 96), (96, 96), (1120, 320), (320, 320)}
    for r in rows:
        assert 0 < r["max_ratio"] < 1, r  # measured error below the modelled bound, and not zero (it measured)
        if r["guard_accepts"]:
            assert r["snr_rel_err"] <= 1e-4, r
    assert any(r["guard_accepts"] for r in rows)

"""bench/bench_cpu_eigensolver.py on tiny sizes: its rows, its crossover rule, and the end-to-end A/B on a
tiny Llama-shaped checkpoint (both scans agree; the engine's rule is restored afterwards)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench = pytest.importorskip("bench_cpu_eigensolver")
bench_scale = pytest.importorskip("bench_scale")

from spectrum_fast import cpu_engine, lapack

from .test_bench_scale import TINY

pytestmark = pytest.mark.skipif(not lapack.syevd_2stage_available("float32"),
                                reason="no LAPACKE ?syevd_2stage in this scipy's OpenBLAS")


def _row(k, dtype, speedup):
    return {"k": k, "dtype": dtype, "speedup": speedup}


def test_crossover_is_where_the_two_stage_solver_wins_from_on():
    rows = [_row(1024, "float32", 0.8), _row(1024, "float64", 0.8), _row(2048, "float32", 1.1),
            _row(2048, "float64", 0.9), _row(3072, "float32", 1.2), _row(3072, "float64", 1.8),
            _row(4096, "float32", 1.3), _row(4096, "float64", 1.6)]
    assert bench.crossover(rows) == 3072  # 2048 is a win in float32 only
    rows[-1]["speedup"] = 0.99
    assert bench.crossover(rows) is None  # a loss at the largest order: no rule from here on
    assert bench.crossover([_row(64, "float64", 1.5), _row(64, "float32", 1.01)]) == 64


def test_rows_and_end_to_end(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "Tiny.json").write_text(json.dumps(TINY))
    monkeypatch.setattr(bench_scale, "CONFIGS", folder)
    before = cpu_engine.TWO_STAGE_MIN_K
    monkeypatch.setattr(cpu_engine, "TWO_STAGE_MIN_K", 64)  # the tiny Llama's k = 64 matrices take it
    out = tmp_path / "ce.json"
    assert bench.main(["--sizes", "48", "96", "--repeat", "1", "--e2e", "Tiny", "--layers", "2",
                       "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["k"], r["dtype"]) for r in doc["rows"]] == [(48, "float32"), (48, "float64"),
                                                            (96, "float32"), (96, "float64")]
    for r in doc["rows"]:
        assert r["syevr_s"] > 0 and r["syevd_2stage_s"] > 0
        tol = 1e-4 if r["dtype"] == "float32" else 1e-12
        assert r["syevr_err"] < tol and r["syevd_2stage_err"] < tol
    e2e = doc["e2e"]
    assert e2e["matrices"] == 2 * 7 and e2e["two_stage_min_k"] == 64
    assert e2e["max_snr_rel_diff"] < 1e-4  # both scans meet SPEC's 1e-4, so they agree to 2e-4 at worst
    assert sum(e2e["syevr_only"]["methods"].values()) == sum(e2e["default"]["methods"].values()) == 14
    assert cpu_engine.TWO_STAGE_MIN_K == 64 != before

"""bench/bench_gpu.py's floor model for the two-stage route (pure arithmetic; the GPU run fills in the rates)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench_gpu = pytest.importorskip("bench_gpu")


def test_twostage_floors_on_the_mistral_shapes():
    base = {"read_page_cache_s": 3.0, "h2d_copy_s": 0.3, "eig_s_per_k": {1024: 0.01, 4096: 0.09}}
    rates = {4096: {"stage1_s_per_matrix": 0.005, "launch": 528, "stage23_launch_s": 0.4}}
    out = bench_gpu.twostage_floors(base, rates, 50e12, 4096)
    flops = 32 * (2 * 2 * 4096**3 + 3 * 2 * 14336 * 4096**2)  # q, o; gate, up, down: 2 m k^2 each
    assert math.isclose(out["gram_fp64_s"], flops * 9 / 16 / 50e12)  # the symmetric split at 3 levels
    assert math.isclose(out["stage1_s"], 160 * 0.005)  # 5 matrices with k = 4096 in each of 32 layers
    assert math.isclose(out["band_solver_s"], 0.4)  # all 160 in one launch
    assert math.isclose(out["one_stage_eig_s"], 32 * 2 * 0.01)  # k and v (1024 x 4096)
    assert math.isclose(out["compute_s"], out["gram_fp64_s"] + 0.8 + 0.4 + 0.64)
    assert out["floor_s"] == max(3.0, out["compute_s"])
    small = bench_gpu.twostage_floors(base, {4096: dict(rates[4096], launch=100)}, 50e12, 4096)
    assert math.isclose(small["band_solver_s"], 2 * 0.4)  # 160 bands in launches of 100: two
    assert "error" in bench_gpu.twostage_floors(base, {}, 50e12, 4096)
    everything = bench_gpu.twostage_floors(base, {**rates, 1024: dict(rates[4096])}, 50e12, 1024)
    assert everything["one_stage_eig_s"] == 0 and everything["stage1_s"] > out["stage1_s"]


def test_end_to_end_saves_every_measurement_before_the_next_runs(tmp_path, monkeypatch):
    """The device call may be cut at any step: each measurement is saved as soon as it exists, a failing floor
    or two-stage scan is recorded as an error, and what came before it stands (stand-ins for the GPU parts)."""
    import numpy as np

    import spectrum_fast
    from spectrum_fast.result import MatrixRecord, ScanResult

    def build(path, layers):
        path.mkdir(parents=True, exist_ok=True)
        (path / "model-00001.safetensors").write_bytes(b"x" * 64)
        return 64

    records = [MatrixRecord(f"model.layers.{i}.mlp.up_proj", "mlp.up_proj", float(i + 1)) for i in range(4)]
    monkeypatch.setattr(bench_gpu, "build_mistral", build)
    monkeypatch.setattr(spectrum_fast, "scan", lambda *a, **k: ScanResult("m", "m", records))
    loops = []

    def loop(path, fp64_svd=False, layers=None, fp64_gram=False):
        loops.append((fp64_svd, fp64_gram))
        if fp64_svd:
            raise KeyboardInterrupt  # the call's time limit, in the reference method
        return 2.0, {r.module: r.snr for r in records}

    monkeypatch.setattr(bench_gpu, "torch_loop", loop)
    saved = []
    with pytest.raises(KeyboardInterrupt):
        bench_gpu.end_to_end(tmp_path, 1, save=lambda d: saved.append(dict(d)))
    last = saved[-1]
    assert last["checkpoint_gb"] == 64e-9 and last["ours_s"] > 0 and last["torch_gram_eigvalsh_loop_s"] == 2.0
    assert last["torch_gram64_eigvalsh_loop_s"] == 2.0 and "speedup_vs_reference" not in last
    assert last["twostage"] == {"error": "not finished"} and len(saved) == 4

    monkeypatch.setattr(bench_gpu, "torch_loop", lambda *a, **k: (2.0, {r.module: r.snr for r in records}))
    monkeypatch.setattr(bench_gpu, "floors", lambda *a: 1 / 0)

    def twostage(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench_gpu, "twostage_scan", twostage)
    saved.clear()
    out = bench_gpu.end_to_end(tmp_path, 1, save=lambda d: saved.append(dict(d)))
    assert out["floors"] == {"error": "ZeroDivisionError: division by zero"}
    assert out["twostage"]["error"].startswith("RuntimeError: CUDA error: an illegal memory access")
    assert out["selections_equal_to_torch_loop"] == {"0.25": True, "0.5": True}
    assert math.isclose(out["speedup_vs_reference"], 32 * 2.0 / out["ours_s"]) and saved[-1] == out
    assert np.isfinite(out["speedup_vs_torch_loop"])


def test_bench_gram_times_both_ways_and_reports_the_flops_it_saves(tmp_path):
    """bench/bench_gram.py on the CPU, small: both timings, their ratio, and the split's share of the flops."""
    import json

    bench_gram = pytest.importorskip("bench_gram")
    out = tmp_path / "gram.json"
    assert bench_gram.main(["--device", "cpu", "--rows", "700", "--k", "600", "--repeats", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["full_s"] > 0 and doc["split_s"] > 0 and math.isclose(doc["speedup"], doc["full_s"] / doc["split_s"])
    assert doc["flops_ratio"] == (2 * 700 * 300**2 * 2 + 2 * 700 * 300 * 300) / (2 * 700 * 600**2)  # one split


def _rows(times: dict[tuple[int, int], float], diff: float = 1e-14) -> list[dict]:
    return [{"k": k, "fp64": True, "alg": alg, "s": t, "info": 0, "max_rel_diff_vs_alg0_fp64": 0.0 if alg == 0 else diff}
            for (k, alg), t in times.items()]


def test_syevd_choice_is_the_algorithm_that_wins_from_some_k_on():
    base = {(2048, 0): 0.05, (4096, 0): 0.12, (8192, 0): 0.9, (16384, 0): 4.0}
    two = {(2048, 2): 0.06, (4096, 2): 0.05, (8192, 2): 0.3, (16384, 2): 1.2}
    one = {(2048, 1): 0.05, (4096, 1): 0.12, (8192, 1): 0.9, (16384, 1): 4.0}
    assert bench_gpu.syevd_choice(_rows({**base, **two, **one})) == "2:4096"
    assert bench_gpu.syevd_choice(_rows({**base, **one})) == "0"  # no algorithm 5% faster: the default stays
    # a loss at the largest k: not a rule "from k on"
    assert bench_gpu.syevd_choice(_rows({**base, **two, (16384, 2): 4.1})) == "0"
    # inaccurate results never win; failed runs (no "s") are skipped
    assert bench_gpu.syevd_choice(_rows({**base, **two}, diff=1e-6)) == "0"
    rows = _rows(base) + [{"k": 4096, "fp64": True, "alg": 2, "error": "RuntimeError: ... INVALID_VALUE"}]
    assert bench_gpu.syevd_choice(rows) == "0"
    # fp32 rows do not count: the float64 pass is what k >= 4096 takes
    fp32 = [dict(r, fp64=False) for r in _rows({**base, **two})]
    assert bench_gpu.syevd_choice(fp32 + _rows(base)) == "0"

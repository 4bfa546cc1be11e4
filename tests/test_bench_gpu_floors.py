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
    assert math.isclose(out["gram_fp64_s"], flops / 50e12)
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

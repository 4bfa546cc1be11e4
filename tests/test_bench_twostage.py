"""bench/bench_twostage.py on the CPU (the native kernels on host threads): every bandwidth and chase variant at
the first size, only the engine's bandwidth with the fastest variant beyond it, accurate eigenvalues in each;
and bench_scale.py reads back the entry of the scan's own bandwidth and variant."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
_C = pytest.importorskip("spectrum_fast._C", reason="the native extension is not built here")
if not hasattr(_C, "band_eigenvalues_host"):
    pytest.skip("this build of the extension has no band solver", allow_module_level=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench_twostage = pytest.importorskip("bench_twostage")
bench_scale = pytest.importorskip("bench_scale")


def test_variants_at_the_first_size_then_the_fastest(tmp_path, monkeypatch):
    out = tmp_path / "twostage.json"
    assert bench_twostage.main(["--device", "cpu", "--sizes", "96", "160", "--bands", "16", "32", "--variants",
                                "0", "1", "7", "--launch", "3", "--repeats", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    first, second = doc["rows"]
    assert [(e["b"], e["variant"]) for e in first["gpu"]] == [(16, 0), (16, 1), (16, 7), (32, 0), (32, 1), (32, 7)]
    ours = [e for e in first["gpu"] if e["b"] == 32]
    best = min(ours, key=lambda e: e["s_per_matrix"])["variant"]
    assert doc["best_variant"] == best
    assert [(e["b"], e["variant"]) for e in second["gpu"]] == [(32, best)]  # the largest size: that pair alone
    for row in doc["rows"]:
        for e in row["gpu"]:
            assert 0 < e["max_err"] < 1e-12 and e["stage23_s_per_matrix"] > 0 and e["launch"] >= 3, e
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "gpu")
    for variant in ("0", "7"):
        monkeypatch.setenv("SPECTRUM_FAST_CHASE", variant)
        rates = bench_scale.twostage_rates(out)
        assert rates[96]["variant"] == int(variant) and rates[96]["b"] == 32
        assert rates[160]["variant"] == best  # the only one measured there
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "0")
    assert bench_scale.twostage_rates(out) == {}


def test_a_variant_that_fails_is_recorded_and_never_chosen(tmp_path, monkeypatch):
    real = bench_twostage.solve_bands

    def broken(storage, b, device, variant=0, threads=None):
        if variant == 1:
            raise RuntimeError("band eigensolver kernel launch failed: too many resources requested")
        w, seconds = real(storage, b, device, variant, threads)
        return (w + 1.0 if variant == 7 else w), seconds  # 7 runs but is wrong

    monkeypatch.setattr(bench_twostage, "solve_bands", broken)
    out = tmp_path / "twostage.json"
    assert bench_twostage.main(["--device", "cpu", "--sizes", "64", "96", "--bands", "32", "--variants", "0", "1",
                                "7", "--launch", "2", "--repeats", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    first = {e["variant"]: e for e in doc["rows"][0]["gpu"]}
    assert "too many resources" in first[1]["error"] and "s_per_matrix" not in first[1]
    assert first[7]["max_err"] > 1e-10 and "speedup_vs_syevd" not in first[7]
    assert doc["best_variant"] == 0 and [e["variant"] for e in doc["rows"][1]["gpu"]] == [0]


def test_every_entry_is_written_as_measured_and_a_broken_size_stops_the_run(tmp_path, monkeypatch):
    """The step's time limit may kill the bench inside any launch: the variants measured before it are in
    the JSON already. A CUDA error that outlives its variant (the reference's eigensolve at the next size
    fails) is recorded for that size and ends the run instead of crashing it."""
    real = bench_twostage.solve_bands

    def hangs_at_7(storage, b, device, variant=0, threads=None):
        if variant == 7:
            raise KeyboardInterrupt  # what the step's `timeout` does to a hung launch
        return real(storage, b, device, variant, threads)

    out = tmp_path / "cut.json"
    args = ["--device", "cpu", "--sizes", "64", "96", "--bands", "32", "--variants", "0", "1", "7", "--launch", "2",
            "--repeats", "1", "--json", str(out)]
    with monkeypatch.context() as m:
        m.setattr(bench_twostage, "solve_bands", hangs_at_7)
        with pytest.raises(KeyboardInterrupt):
            bench_twostage.main(args)
    entries = json.loads(out.read_text())["rows"][0]["gpu"]
    assert [e["variant"] for e in entries] == [0, 1] and all(e["max_err"] < 1e-12 for e in entries)

    gram = bench_twostage.gram_batch

    def poisoned(k, count, device):
        if k == 96:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return gram(k, count, device)

    monkeypatch.setattr(bench_twostage, "gram_batch", poisoned)
    assert bench_twostage.main(args[:3] + ["64", "96", "128"] + args[5:]) == 0
    doc = json.loads(out.read_text())
    assert [r["k"] for r in doc["rows"]] == [64, 96] and "illegal memory access" in doc["rows"][1]["error"]
    assert len(doc["rows"][0]["gpu"]) == 3 and "best_variant" in doc


def test_pairs_per_size_and_a_failing_band(tmp_path, monkeypatch):
    """Every pair at the first size; then the engine's band with its best variant, plus the best pair overall
    except at the largest size; a band whose stage 1 fails is recorded for each of its variants."""
    calls: list[tuple[int, int, tuple]] = []
    speed = {(32, 0): 3.0, (32, 7): 2.0, (64, 0): 1.5, (64, 7): 1.0}  # seconds per matrix: (64, 7) is best

    def fake_gpu_mode(k, b, variants, launch, device, repeats, record):
        calls.append((k, b, tuple(variants)))
        if k == 32 and b == 64:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        for v in variants:
            record({"b": b, "variant": v, "s_per_matrix": speed[b, v], "stage1_s_per_matrix": 0.1,
                    "stage23_s_per_matrix": speed[b, v] - 0.1, "max_err": 1e-15})

    monkeypatch.setattr(bench_twostage, "gpu_mode", fake_gpu_mode)
    monkeypatch.setattr(bench_twostage, "stage3_launch", lambda k, launch, device: 0.5)
    out = tmp_path / "pairs.json"
    assert bench_twostage.main(["--device", "cpu", "--sizes", "16", "24", "32", "40", "--bands", "32", "64",
                                "--variants", "0", "7", "--repeats", "1", "--json", str(out)]) == 0
    assert calls == [(16, 32, (0, 7)), (16, 64, (0, 7)),  # every pair
                     (24, 32, (7,)), (24, 64, (7,)),  # the engine's band with its best, and the best overall
                     (32, 32, (7,)), (32, 64, (7,)),
                     (40, 32, (7,))]  # the largest size: the engine's pair alone
    doc = json.loads(out.read_text())
    assert doc["best_variant"] == 7
    failed = [e for e in doc["rows"][2]["gpu"] if e["b"] == 64]
    assert len(failed) == 1 and "illegal memory access" in failed[0]["error"]
    assert all(r["stage3_launch_s"] == 0.5 for r in doc["rows"])


def test_scale_bench_never_takes_a_failed_or_inaccurate_entry(tmp_path, monkeypatch):
    doc = {"rows": [{"k": 4096, "gpu": [{"b": 32, "variant": 7, "error": "RuntimeError: launch failed"},
                                        {"b": 32, "variant": 3, "max_err": 1e-15, "stage23_launch_s": 1.0}]},
                    {"k": 8192, "gpu": [{"b": 32, "variant": 7, "max_err": 0.3, "stage23_launch_s": 2.0}]}]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "gpu")
    monkeypatch.setenv("SPECTRUM_FAST_CHASE", "7")
    assert bench_scale.twostage_rates(path) == {4096: doc["rows"][0]["gpu"][1]}  # 8192: nothing usable

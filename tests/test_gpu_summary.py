"""bench/gpu_summary.py: the verdicts of a device run, read from a results folder as gpu_check.sh leaves it
(here: bench_twostage.py's real output on the CPU, and the other files as the GPU benches write them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
gpu_summary = pytest.importorskip("gpu_summary")


def _run(folder: Path, capsys) -> str:
    assert gpu_summary.main([str(folder)]) == 0
    return capsys.readouterr().out


def test_an_empty_folder_says_what_is_missing(tmp_path, capsys):
    out = _run(tmp_path, capsys)
    for missing in ("no tests.log", "no twostage_gpu.json", "no gpu_check.json", "no scale_gpu.json", "no sanitize.log"):
        assert missing in out


def test_a_full_run_gives_verdicts_and_settings(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    _C = pytest.importorskip("spectrum_fast._C", reason="the native extension is not built here")
    if not hasattr(_C, "band_eigenvalues_host"):
        pytest.skip("this build of the extension has no band solver")
    bench_twostage = pytest.importorskip("bench_twostage")
    assert bench_twostage.main(["--device", "cpu", "--sizes", "64", "--bands", "32", "--variants", "0", "7",
                                "--launch", "2", "--repeats", "1", "--json", str(tmp_path / "twostage_gpu.json")]) == 0
    (tmp_path / "tests.log").write_text(
        "..F.\n=================================== FAILURES ===================================\n"
        "_____________ test_gpu_band_solver_twins _____________\nassert False\n"
        "FAILED tests/test_native.py::test_gpu_band_solver_twins - assert False\n"
        "1 failed, 40 passed, 2 skipped in 30.00s\n")
    e2e = {"ours_s": 20.0, "reference_svdvals_scaled_to_32_layers_s": 170.0, "torch_gram_eigvalsh_loop_s": 19.0,
           "twostage": {"s": 8.0, "max_snr_rel_diff_vs_syevd_route": 1e-12, "selections_equal": {"0.25": True},
                        "vs_floor": 1.6}}
    (tmp_path / "gpu_check.json").write_text(json.dumps({"end_to_end": e2e}))
    scale = {"rates": {"disk_sequential_Bps": 1.3e9, "disk_readahead_Bps": 2.0e9},
             "models": [{"model": "Qwen1.5-110B", "extrapolated_s": 175.0, "goal_s": 180.0, "meets_goal": True,
                         "floors": {"floor_s": 111.0}, "layers_generated": 1,
                         "e2e": {"measured_s": 3.0, "predicted_s": 3.5, "full_scan_estimate_s": 150.0,
                                 "steady": {"copies": 2, "measured_s": 5.2, "full_scan_estimate_s": 178.4}},
                         "meets_goal_with_measured_overlap": True, "meets_goal_steady": True},
                        {"model": "Llama-3.1-405B", "extrapolated_s": 950.0, "goal_s": 900.0, "meets_goal": False,
                         "floors": {"floor_s": 620.0}, "e2e": {"error": "RuntimeError: cut"}}]}
    (tmp_path / "scale_gpu.json").write_text(json.dumps(scale))
    (tmp_path / "sanitize.log").write_text(
        "== env X compute-sanitizer --tool memcheck python bench/sanitize_band.py (limit 35 s)\n"
        "========= ERROR SUMMARY: 0 errors\n== rc 0 after 20 s\n"
        "== env X compute-sanitizer --tool racecheck python bench/sanitize_band.py (limit 35 s)\n== rc 124 after 35 s\n"
        "== env X compute-sanitizer --tool racecheck python bench/sanitize_band.py (limit 35 s)\n"
        "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n== rc 0 after 30 s\n"
        "== env X compute-sanitizer --tool synccheck python bench/sanitize_band.py (limit 35 s)\n"
        "========= ERROR SUMMARY: 0 errors\n== rc 1 after 30 s\n")
    out = _run(tmp_path, capsys)
    doc = json.loads((tmp_path / "twostage_gpu.json").read_text())
    assert "tests: 1 failed, 40 passed" in out and "failed: test_gpu_band_solver_twins" in out
    assert f"fastest chase variant at b=32: {doc['best_variant']}" in out
    assert "k=64: Dsyevd" in out and "best two-stage b=32" in out
    assert "goal under 10 s: met" in out and "goal >= 20x reference (21.2x): met" in out
    assert "goal >= 2x torch loop (2.38x): met" in out
    assert "Qwen1.5-110B: extrapolated 175 s (floor 111 s), goal 180 s met" in out
    assert "3.0 s against 3.5 s predicted; the whole model at that overlap 150 s, goal met; 2x the generated " \
           "layers 5.2 s: the whole model at that rate 178 s, goal met" in out
    assert "Llama-3.1-405B: extrapolated 950 s (floor 620 s), goal 900 s NOT met; end to end: RuntimeError: cut" in out
    assert "1.54x; WARM_THREADS stays" in out
    assert "sanitizer memcheck: 0 errors\n" in out
    assert "sanitizer racecheck: 2 hazards (1 errors, 1 warnings)" in out  # the later run of the tool
    assert "sanitizer synccheck: 0 errors, exit status 1" in out  # the program failed: no pass
    settings = json.loads(out.split("settings: ", 1)[1])
    assert settings["chase_variant"] == doc["best_variant"] and settings["warm_threads_help"] is True
    assert set(settings["twostage_wins"]) == {"64"}


def test_a_sanitizer_cut_by_its_time_limit_has_no_verdict_and_one_variant_suggests_nothing(tmp_path, capsys):
    (tmp_path / "sanitize.log").write_text(
        "== env X compute-sanitizer --tool racecheck python bench/sanitize_band.py (limit 35 s)\n== rc 124 after 35 s\n")
    row = {"k": 8192, "syevd_fp64_s": 0.9, "gpu": [{"b": 32, "variant": 7, "s_per_matrix": 0.05, "max_err": 1e-15,
                                                     "stage1_s_per_matrix": 0.04, "stage23_s_per_matrix": 0.01,
                                                     "launch": 528, "stage23_launch_s": 5.3}]}
    (tmp_path / "twostage_gpu.json").write_text(json.dumps({"rows": [row], "best_variant": 7}))
    out = _run(tmp_path, capsys)
    assert "sanitizer racecheck: no verdict (out of time?)" in out
    assert "chase variant 7 at b=32 (the only one measured: no comparison)" in out
    assert "chase_variant" not in out.split("settings: ", 1)[1]


def _syevd_part(choice="2:4096", band_16384=None):
    rows = [{"k": k, "fp64": True, "alg": alg, "s": t, "info": 0, "max_rel_diff_vs_alg0_fp64": 0.0}
            for k, times in ((4096, (0.12, 0.12, 0.05)), (16384, (4.0, 4.0, 1.2))) for alg, t in enumerate(times)]
    rows.append({"k": 4096, "fp64": False, "alg": 2, "error": "RuntimeError: cusolverDnSetAdvOptions failed"})
    return {"cusolver": 12401, "cusolver_built": 12401, "rows": rows, "choice": choice}


def test_syevd_algorithms_and_the_mistral_goals_of_that_route(tmp_path, capsys):
    e2e = {"ours_s": 9.0, "syevd_alg": "2:4096", "ours_default_syevd_s": 20.0, "speedup_vs_default_syevd": 2.22,
           "max_snr_rel_diff_vs_default_syevd": 3e-9, "selections_equal_to_default_syevd": {"0.5": True},
           "reference_svdvals_scaled_to_32_layers_s": 170.0, "torch_gram_eigvalsh_loop_s": 19.0}
    (tmp_path / "gpu_check.json").write_text(json.dumps({"syevd": _syevd_part(), "end_to_end": e2e}))
    out = _run(tmp_path, capsys)
    assert "Xsyevd algorithms (cuSOLVER 12401, built with 12401):" in out
    assert "k=16384 fp64: alg 0 4.0000 s (diff 0.0e+00); alg 1 4.0000 s (diff 0.0e+00); alg 2 1.2000 s" in out
    assert "k=4096 fp32: alg 2 RuntimeError: cusolverDnSetAdvOptions failed" in out
    assert "choice: SPECTRUM_FAST_SYEVD_ALG=2:4096" in out
    assert "syevd route (SPECTRUM_FAST_SYEVD_ALG=2:4096): 9.0 s" in out and "default algorithm: 20.00 s (2.22x)" in out
    assert "goal under 10 s: met" in out and "goal >= 20x reference (18.9x): NOT met" in out
    assert "goal >= 2x torch loop (2.11x): met" in out
    assert '"syevd_alg": "2:4096"' in out  # the suggested setting
    (tmp_path / "gpu_check.json").write_text(json.dumps({"syevd": {"error": "RuntimeError: no GPU"}}))
    assert "Xsyevd algorithms: RuntimeError: no GPU" in _run(tmp_path, capsys)


def test_route_for_the_scale_stage(tmp_path, capsys):
    def band(s):
        return {"rows": [{"k": 16384, "gpu": [{"b": 32, "variant": 7, "s_per_matrix": s, "max_err": 1e-14}]}]}

    assert gpu_summary.usable(band(1.0)["rows"][0]["gpu"][0])
    assert gpu_summary.route({"syevd": _syevd_part()}, band(1.0)) == "gpu"   # the band solver is faster at 16384
    assert gpu_summary.route({"syevd": _syevd_part()}, band(1.5)) == "0"     # Xsyevd's two-stage is
    assert gpu_summary.route({"syevd": _syevd_part()}, None) == "0"          # only Xsyevd measured, and it won
    assert gpu_summary.route({"syevd": _syevd_part(choice="0")}, None) == "gpu"  # nothing measured: as before
    assert gpu_summary.route(None, None) == "gpu"
    (tmp_path / "g.json").write_text(json.dumps({"syevd": _syevd_part()}))
    (tmp_path / "t.json").write_text(json.dumps(band(1.5)))
    assert gpu_summary.main(["--route", str(tmp_path / "g.json"), str(tmp_path / "t.json")]) == 0
    assert capsys.readouterr().out == "0\n"

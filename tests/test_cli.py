"""The command lines: outputs, reuse of results, and bad input (one line, non-zero, nothing written)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from spectrum_fast.cli import freeze_main, scan_main

from .conftest import REFERENCE_RESULTS, ref_select, save_np


@pytest.fixture
def model_dir(tmp_path):
    rng = np.random.default_rng(0)
    t = {}
    for i in range(4):
        for name, shape in (("self_attn.q_proj", (32, 32)), ("mlp.down_proj", (32, 80))):
            w = rng.standard_normal(shape) + (i + 1) * np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))
            t[f"model.layers.{i}.{name}.weight"] = w.astype(np.float32)
    t["model.embed_tokens.weight"] = rng.standard_normal((100, 32)).astype(np.float32)
    t["lm_head.weight"] = rng.standard_normal((100, 32)).astype(np.float32)
    save_np(tmp_path / "tiny_model" / "model.safetensors", t)
    return tmp_path / "tiny_model"


def test_scan_writes_both_files(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert scan_main([str(model_dir), "--out", str(out)]) == 0
    ref = json.loads((out / "snr_results_tiny_model.json").read_text())
    assert len(ref) == 8 and ref["model.layers.0.mlp.down_proj"]["type"] == "mlp.down_proj"
    assert (out / "spectrum_fast_tiny_model.json").is_file()
    table = capsys.readouterr().out
    assert "mlp.down_proj" in table and "8 matrices" in table


def test_freeze_scans_then_reuses(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert freeze_main([str(model_dir), "--top", "0.5", "--out", str(out), "--quiet"]) == 0
    y = out / "snr_results_tiny_model_unfrozenparameters_50percent.yaml"
    entries = yaml.safe_load(y.read_text())["unfrozen_parameters"]
    ref = json.loads((out / "snr_results_tiny_model.json").read_text())
    expect = ref_select({m: v["snr"] for m, v in ref.items()}, {m: v["type"] for m, v in ref.items()}, 0.5)
    assert entries[:2] == ["^lm_head.weight$", "^model.embed_tokens.weight$"]
    assert set(entries[2:]) == expect
    capsys.readouterr()
    assert freeze_main([str(model_dir), "--top", "0.25", "--out", str(out)]) == 0
    err = capsys.readouterr()
    assert "(current)" in err.err and "total: 2 of 8 modules" in err.out


def test_freeze_detects_stale_result(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert scan_main([str(model_dir), "--out", str(out), "--quiet"]) == 0
    f = model_dir / "model.safetensors"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert freeze_main([str(model_dir), "--top", "0.5", "--out", str(out)]) == 0
    assert "stale" in capsys.readouterr().err


@pytest.mark.skipif(not REFERENCE_RESULTS.is_dir(), reason="../shared/reference-results not present")
def test_freeze_from_reference_file_without_weights(tmp_path, capsys):
    out = tmp_path / "model_snr_results"
    out.mkdir()
    name = "snr_results_mistralai-Mistral-7B-v0.1.json"
    shutil.copy(REFERENCE_RESULTS / name, out / name)
    assert freeze_main(["mistralai/Mistral-7B-v0.1", "--top", "0.5", "--out", str(out)]) == 0
    text = (out / "snr_results_mistralai-Mistral-7B-v0.1_unfrozenparameters_50percent.yaml").read_text()
    entries = yaml.safe_load(text)["unfrozen_parameters"]
    raw = json.loads((REFERENCE_RESULTS / name).read_text())
    expect = ref_select({m: v["snr"] for m, v in raw.items()}, {m: v["type"] for m, v in raw.items()}, 0.5)
    assert set(entries[2:]) == expect and len(expect) == 7 * 16
    assert "total: 112 of 224 modules" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["/no/such/model", "--top", "0.5"], "no such file or directory"),
    (["MODEL", "--top", "50"], r"fraction in \(0, 1\], got 50.0 \(did you mean 0.5\?\)"),
    (["MODEL", "--top", "0"], r"fraction in \(0, 1\]"),
])
def test_freeze_bad_arguments(model_dir, tmp_path, capsys, argv, match):
    import re

    argv = [str(model_dir) if a == "MODEL" else a for a in argv] + ["--out", str(tmp_path / "o")]
    assert freeze_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]) and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_truncated_shard_cli(model_dir, tmp_path, capsys):
    f = model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-50])
    out = tmp_path / "o"
    assert scan_main([str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "truncated" in err[0]
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(model_dir, tmp_path, capsys):  # pragma: no cover - CI runs as root
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    assert scan_main([str(model_dir), "--out", str(out)]) == 2
    assert "not writable" in capsys.readouterr().err


def test_output_path_is_a_file(model_dir, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert scan_main([str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0]
    assert out.read_text() == "x"


def test_failed_scan_leaves_previous_result_intact(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    assert scan_main([str(model_dir), "--out", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import spectrum_fast.scanner as sc

    calls = {"n": 0}
    real = sc.matrix_stats

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sc, "matrix_stats", interrupted)
    assert scan_main([str(model_dir), "--out", str(out), "--quiet"]) == 130
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    journal = after.pop(".spectrum_fast_tiny_model.journal")  # what the next run resumes from
    assert after == before
    assert journal.count(b"\n") >= 1 + 1  # header + what finished before Ctrl-C
    assert "interrupted" in capsys.readouterr().err


def test_python_dash_m_entry_points(model_dir, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}
    r = subprocess.run([sys.executable, "-m", "spectrum_fast.freeze", str(model_dir), "--top", "0.5",
                        "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, check=False, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert (tmp_path / "o" / "snr_results_tiny_model_unfrozenparameters_50percent.yaml").is_file()
    r = subprocess.run([sys.executable, "-m", "spectrum_fast.scan", str(tmp_path / "missing")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such file or directory" in r.stderr
    r = subprocess.run([sys.executable, "-m", "spectrum_fast"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "backend for device='auto': cpu" in r.stdout


def test_diagnostics_show_the_gpu_settings():
    def run(**env):
        return subprocess.run([sys.executable, "-m", "spectrum_fast"], capture_output=True, text=True, check=False,
                              env={**os.environ, **env}).stdout

    out = run(SPECTRUM_FAST_TWOSTAGE="0", SPECTRUM_FAST_FP64_MIN_K="8192", SPECTRUM_FAST_BATCHED_MAX_K="0")
    assert "float64 first for matrices with k >= 8192" in out
    assert "batched" not in out and "two-stage" not in out
    assert "two-stage float64 pass: SPECTRUM_FAST_TWOSTAGE must be 0, gpu or cpu" in run(SPECTRUM_FAST_TWOSTAGE="x")
    assert "cusolverDnXsyevd algorithm 0 (cuSOLVER's default)" in out and "CPU: Gram eigenvalues by LAPACK" in out
    assert "cusolverDnXsyevd algorithm 2 (two-stage) from k = 4096" in run(SPECTRUM_FAST_SYEVD_ALG="2:4096")
    assert "SPECTRUM_FAST_SYEVD_ALG must be 0, 1 or 2" in run(SPECTRUM_FAST_SYEVD_ALG="9")
    assert "CPU: memory budget: 2.5 GiB of matrices in flight at once" in run(SPECTRUM_FAST_MEMORY_GB="2.5")
    from spectrum_fast.distributed import cores_per_rank

    alone = cores_per_rank()  # no LOCAL_WORLD_SIZE in the tests' environment
    assert re.search(rf"CPU: {alone} cores? for a scan.*: [12] workers? x \d+ BLAS threads? by default", out)
    assert re.search(rf"CPU: {max(1, alone // 2)} cores? for a scan.* \(this machine's / 2 torchrun ranks\)",
                     run(LOCAL_WORLD_SIZE="2"))
    assert "CPU: memory budget: SPECTRUM_FAST_MEMORY_GB must be a positive number" in run(SPECTRUM_FAST_MEMORY_GB="x")
    if importlib.util.find_spec("torch") is not None:
        out = run(SPECTRUM_FAST_TWOSTAGE="cpu", SPECTRUM_FAST_TWOSTAGE_THREADS="3")
        assert "two-stage float64 pass, band eigenvalues on 3 threads" in out
        assert "band eigenvalues on the GPU" in run(SPECTRUM_FAST_TWOSTAGE="1")


def test_device_cuda_without_gpu_is_a_clear_error(model_dir, capsys):
    assert scan_main([str(model_dir), "--device", "cuda", "--out", str(model_dir / "o")]) == 2
    err = capsys.readouterr().err
    assert "device='cuda' is not available" in err and err.count("\n") == 1


def test_device_auto_falls_back_with_message(model_dir, capsys):
    assert scan_main([str(model_dir), "--out", str(model_dir / "o")]) == 0
    assert "spectrum_fast: using the CPU:" in capsys.readouterr().err


def test_freeze_prints_trainable_parameters_and_saving(model_dir, tmp_path, capsys):
    assert freeze_main([str(model_dir), "--top", "0.5", "--out", str(tmp_path / "o"), "--train-dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    # 2 of 4 q_proj (32x32) + 2 of 4 down_proj (32x80) + embed and head lines (100x32 each)
    trainable, total = 2 * 32 * 32 + 2 * 32 * 80 + 2 * 100 * 32, 4 * (32 * 32 + 32 * 80) + 2 * 100 * 32
    assert f"trainable: {trainable:,} of {total:,} parameters" in out
    assert "(gradients + AdamW states, fp32)" in out
    assert freeze_main([str(model_dir), "--top", "0.5", "--out", str(tmp_path / "o"), "--no-embed-head"]) == 0
    assert f"trainable: {trainable - 6400:,} of {total:,}" in capsys.readouterr().out

"""Resumable scans: killed with SIGKILL mid-scan and run again, a scan ends with the same results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import spectrum_fast
from spectrum_fast.journal import Journal

from .conftest import save_np


@pytest.fixture
def model_dir(tmp_path):
    rng = np.random.default_rng(0)
    t = {f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal((384, 256)) * (1 + i % 7)).astype(np.float32)
         for i in range(40)}
    save_np(tmp_path / "m" / "model.safetensors", t)
    return tmp_path / "m"


def _cli(model_dir, out, *extra):
    return [sys.executable, "-m", "spectrum_fast.scan", str(model_dir), "--out", str(out), "--quiet",
            "--exact", "--workers", "1", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_results(model_dir, tmp_path):
    clean = tmp_path / "clean"
    subprocess.run(_cli(model_dir, clean), check=True)
    expected = json.loads((clean / "snr_results_m.json").read_text())

    out = tmp_path / "killed"
    journal = out / ".spectrum_fast_m.journal"
    proc = subprocess.Popen(_cli(model_dir, out))
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the scan finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = journal.read_bytes().count(b"\n") - 1
    assert 5 <= done_before < 40
    assert not (out / "snr_results_m.json").exists()  # nothing that looks like a whole result

    r = subprocess.run([a for a in _cli(model_dir, out) if a != "--quiet"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert f"{done_before} matrices already done" in r.stderr
    assert json.loads((out / "snr_results_m.json").read_text()) == expected
    assert not journal.exists()  # removed once the result is saved


def test_torn_last_line_is_dropped(model_dir, tmp_path):
    journal = tmp_path / "j"
    first = spectrum_fast.scan(model_dir, progress=False, journal=journal)
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join(lines[:11]) + b"\n" + lines[11][:20])  # 10 records, then half a line
    again = spectrum_fast.scan(model_dir, progress=False, journal=journal)
    assert [(r.module, r.snr) for r in again.records] == [(r.module, r.snr) for r in first.records]
    assert journal.read_bytes().count(b"\n") == 41  # the torn line replaced, not kept


def test_journal_of_other_weights_is_not_mixed_in(model_dir, tmp_path, capsys):
    journal = tmp_path / "j"
    spectrum_fast.scan(model_dir, progress=False, journal=journal)
    rng = np.random.default_rng(1)
    new = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((384, 256)).astype(np.float32)
           for i in range(40)}
    f = save_np(model_dir / "model.safetensors", new)
    # same names and shapes, so the same header: only size + mtime tell the files apart; make sure the
    # filesystem's timestamp granularity cannot hide the rewrite
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    res = spectrum_fast.scan(model_dir, progress=True, journal=journal)
    assert "belongs to other weights or settings: starting over" in capsys.readouterr().err
    fresh = spectrum_fast.scan(model_dir, progress=False)
    assert [r.snr for r in res.records] == [r.snr for r in fresh.records]
    other = Journal(journal, {"sources": [], "settings": {}}).open()
    assert other.resumed == [] and "other weights" in other.note
    other.close()


@pytest.mark.parametrize(("setting", "before", "after"), [("TWO_STAGE_MIN_K", 1 << 62, 1), ("REVISION", 1, 2)])
def test_journal_of_another_cpu_eigensolver_is_not_mixed_in(model_dir, tmp_path, capsys, monkeypatch, setting,
                                                           before, after):
    """The CPU's eigensolvers and the way it forms Gram matrices (its revision) fix the results' last bits, so
    a journal written with others starts over."""
    from spectrum_fast import cpu_engine

    journal = tmp_path / "j"
    monkeypatch.setattr(cpu_engine, setting, before)
    spectrum_fast.scan(model_dir, progress=False, journal=journal)
    header = json.loads(journal.read_bytes().split(b"\n")[0])
    assert header["engine"]["cpu"] == cpu_engine.eigensolver()
    assert header["engine"]["cpu_revision"] == cpu_engine.REVISION
    monkeypatch.setattr(cpu_engine, setting, after)
    spectrum_fast.scan(model_dir, progress=True, journal=journal)
    err = capsys.readouterr().err
    assert "belongs to other weights or settings: starting over" in err
    header = json.loads(journal.read_bytes().split(b"\n")[0])
    assert header["engine"]["cpu"] == cpu_engine.eigensolver()
    assert header["engine"]["cpu_revision"] == cpu_engine.REVISION

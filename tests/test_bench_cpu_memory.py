"""bench/bench_cpu_memory.py on tiny shapes: the Gram rows (the blocked product equals the whole one), and the
scan A/B against a copy of this tree, which must import its own package and agree with ours."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench = pytest.importorskip("bench_cpu_memory")

ROOT = Path(__file__).resolve().parents[1]


def test_gram_rows_and_scan_against_a_baseline_tree(tmp_path):
    baseline = tmp_path / "baseline"
    shutil.copytree(ROOT / "spectrum_fast", baseline / "spectrum_fast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    out = tmp_path / "memory.json"
    assert bench.main(["--gram", "700x90", "90x700", "--scan-shape", "600x200", "--count", "2",
                       "--baseline", str(baseline), "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["shape"] for r in doc["gram"]] == [[700, 90], [90, 700]]
    assert all(r["max_rel_diff"] < 1e-13 and r["blocked_peak_mb"] > 0 for r in doc["gram"])
    scan = doc["scan"]
    assert scan["ours"]["exit"] == 0 and scan["baseline"]["exit"] == 0
    assert scan["baseline"]["imported"].startswith(str(baseline))  # the copy's package, not the installed one
    assert scan["ours"]["imported"].startswith(str(ROOT))
    assert scan["max_rel_snr_diff"] == 0.0 and scan["same_routes"]  # the same code on both sides
    assert scan["ours"]["peak_rss_gb"] > 0 and scan["peak_rss_ratio"] > 0

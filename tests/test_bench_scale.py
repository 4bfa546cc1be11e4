"""bench/bench_scale.py's bookkeeping on the CPU, on a tiny Llama-shaped config: the JSON carries each model's
timings before its end-to-end scan runs, and a model that fails is recorded without costing the others."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench_scale = pytest.importorskip("bench_scale")

TINY = {"_name_or_path": "tiny/llama", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_a_failing_end_to_end_scan_or_model_keeps_the_rest(tmp_path, monkeypatch):
    import spectrum_fast

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "Tiny.json").write_text(json.dumps(TINY))
    (configs / "Broken.json").write_text("{not json")
    monkeypatch.setattr(bench_scale, "CONFIGS", configs)
    scan = spectrum_fast.scan

    def e2e_fails(path, **kw):
        if "progress" in kw and kw.get("types") is None and Path(path).name.startswith("Tiny-"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return scan(path, **kw)

    monkeypatch.setattr(spectrum_fast, "scan", e2e_fails)
    out = tmp_path / "scale.json"
    args = ["--models", "Broken", "Tiny", "--device", "cpu", "--layers", "1", "--samples", "1",
            "--workdir", str(tmp_path / "work"), "--e2e", "--json", str(out)]
    assert bench_scale.main(args) == 0
    doc = json.loads(out.read_text())
    broken, tiny = doc["models"]
    assert broken["model"] == "Broken" and "JSONDecodeError" in broken["error"]
    assert tiny["model"] == "Tiny" and tiny["extrapolated_s"] > 0 and tiny["matrices"] == 4 * 7
    assert "illegal memory access" in tiny["e2e"]["error"] and doc["rates"]["disk_Bps"] > 0

    monkeypatch.setattr(spectrum_fast, "scan", scan)
    assert bench_scale.main(args[:1] + ["Tiny"] + args[3:]) == 0
    (tiny,) = json.loads(out.read_text())["models"]
    assert tiny["e2e"]["measured_s"] > 0 and tiny["e2e"]["ratio"] > 0
    assert tiny["e2e"]["full_scan_estimate_s"] == pytest.approx(tiny["extrapolated_s"] * tiny["e2e"]["ratio"])

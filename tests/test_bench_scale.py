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


@pytest.fixture
def configs(tmp_path, monkeypatch) -> Path:
    """bench_scale's config folder, holding the tiny Llama as ``Tiny``."""
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "Tiny.json").write_text(json.dumps(TINY))
    monkeypatch.setattr(bench_scale, "CONFIGS", folder)
    return folder


def test_a_failing_end_to_end_scan_or_model_keeps_the_rest(tmp_path, monkeypatch, configs):
    import spectrum_fast

    (configs / "Broken.json").write_text("{not json")
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


def test_replicated_layers_are_a_checkpoint_whose_copies_scan_like_the_originals(tmp_path):
    """``replicate`` copies the generated layers with shifted layer numbers (new headers, the same data):
    the copy scans as a checkpoint of twice the layers, each copy's matrices with the originals' SNRs."""
    from synth_checkpoint import write

    import spectrum_fast

    ckpt = tmp_path / "tiny"
    write(dict(TINY, num_hidden_layers=2), ckpt, 2, shard_bytes=40_000)  # several shards, layers across them
    assert len(list(ckpt.glob("*.safetensors"))) > 1
    copies = bench_scale.replicate(ckpt, 3)
    original = {r.module: r.snr for r in spectrum_fast.scan(ckpt, progress=False).records}
    result = spectrum_fast.scan(copies, progress=False)
    got = {r.module: r.snr for r in result.records}
    assert len(got) == 3 * len(original) == 3 * 2 * 7
    for j in range(3):
        for module, snr in original.items():
            assert got[bench_scale.shift_layer(module, 2 * j)] == snr
    assert json.loads((copies / "config.json").read_text())["num_hidden_layers"] == 6
    assert bench_scale.shift_layer("model.layers.12.mlp.up_proj.weight", 30) == "model.layers.42.mlp.up_proj.weight"
    assert bench_scale.shift_layer("model.norm.weight", 2) is None  # copied once, with the originals
    index = json.loads((copies / "model.safetensors.index.json").read_text())["weight_map"]
    assert list(index).count("model.norm.weight") == 1 and "model.layers.5.input_layernorm.weight" in index


def test_steady_state_estimate_from_a_longer_end_to_end_scan(tmp_path, monkeypatch, configs):
    """``--e2e-copies``: the whole-model estimate is the generated layers' scan plus the rest of the model's
    bytes at the cost per byte that the longer scan added; the copies are deleted afterwards."""
    scans = []

    def timed_scan(ckpt, device):  # 2 s for the generated layer, 2 + 3 s for three copies of it
        scans.append(ckpt)
        return 2.0 + 1.5 * (json.loads((ckpt / "config.json").read_text())["num_hidden_layers"] - 1)

    monkeypatch.setattr(bench_scale, "_scan_cold", timed_scan)
    out = tmp_path / "scale.json"
    assert bench_scale.main(["--models", "Tiny", "--device", "cpu", "--layers", "1", "--samples", "1", "--workdir",
                             str(tmp_path / "work"), "--e2e", "--e2e-copies", "3", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["models"]
    steady = row["e2e"]["steady"]
    layer_bytes = row["bytes"] / TINY["num_hidden_layers"]
    assert steady["copies"] == 3 and steady["measured_s"] == 5.0
    assert steady["s_per_gb"] == pytest.approx(3.0 / (2 * layer_bytes) * 1e9)
    assert steady["full_scan_estimate_s"] == pytest.approx(2.0 + 3 * 1.5)  # 3 more layers at 1.5 s each
    assert [p.name for p in scans] == ["Tiny-1L", "Tiny-1L-x3"] and not scans[1].exists()


def test_steady_estimate_refuses_a_longer_scan_that_was_not_slower_and_keeps_the_rest_on_failure(tmp_path,
                                                                                                 monkeypatch, configs):
    args = ["--models", "Tiny", "--device", "cpu", "--layers", "1", "--samples", "1", "--workdir",
            str(tmp_path / "work"), "--e2e", "--e2e-copies", "2", "--json", str(tmp_path / "scale.json")]
    monkeypatch.setattr(bench_scale, "_scan_cold", lambda ckpt, device: 3.0)  # both scans alike: no rate
    assert bench_scale.main(args) == 0
    (row,) = json.loads((tmp_path / "scale.json").read_text())["models"]
    assert "was not slower" in row["e2e"]["steady"]["error"] and "full_scan_estimate_s" not in row["e2e"]["steady"]
    assert "meets_goal_steady" not in row and row["e2e"]["measured_s"] == 3.0

    def no_space(ckpt, copies):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench_scale, "replicate", no_space)
    assert bench_scale.main(args) == 0
    (row,) = json.loads((tmp_path / "scale.json").read_text())["models"]
    assert "No space left" in row["e2e"]["steady"]["error"] and row["e2e"]["measured_s"] == 3.0
    assert row["e2e"]["full_scan_estimate_s"] > 0  # the one-layer estimate stands


def test_launches_left_counts_the_whole_models_extra_band_solver_launches():
    from synth_checkpoint import Spec

    def spec(m, n):
        return Spec("model.layers.0.x.weight", (m, n), "BF16", 0)

    full = [spec(4096, 4096)] * 1000 + [spec(8192, 8192)] * 10 + [spec(1024, 4096)] * 50
    bands = {4096: {"launch": 528, "stage23_launch_s": 0.4}, 8192: {"launch": 528, "stage23_launch_s": 1.5}}
    # 1000 bands of 4096: 2 launches, one more than the generated layers' scan made; 10 of 8192: none more;
    # k = 1024 is under the float64 cut-off (and has no rates)
    assert bench_scale.launches_left(full, bands, 4096) == pytest.approx(0.4)
    assert bench_scale.launches_left(full, {}, 4096) == 0

"""bench/synth_checkpoint.py: real models' tensor tables, and generated checkpoints that scan correctly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import spectrum_fast
from spectrum_fast.result import ScanResult

from .conftest import REFERENCE_RESULTS, ref_snr, rel_err

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
synth = pytest.importorskip("synth_checkpoint")
torch = pytest.importorskip("torch")


def _config(name: str) -> dict:
    return json.loads((BENCH / "configs" / f"{name}.json").read_text())


@pytest.mark.parametrize("name, billions", [
    # published parameter counts (model cards): checks every shape of the generated tables
    ("Llama-3.1-405B", 405.85), ("Qwen1.5-110B", 111.2), ("Mixtral-8x22B", 140.6), ("DeepSeek-V3", 684.5),
    ("Mistral-7B", 7.24)])
def test_parameter_counts_match_the_real_models(name, billions):
    specs = synth.tensor_list(_config(name))
    params = sum(math.prod(s.shape) for s in specs if not s.name.endswith("_scale_inv"))
    assert params / 1e9 == pytest.approx(billions, rel=2e-3)


@pytest.mark.parametrize("name, ref", [
    ("Mixtral-8x22B", "snr_results_mistralai-Mixtral-8x22B-v0.1.json"),
    ("Mistral-7B", "snr_results_mistralai-Mistral-7B-v0.1.json"),
])
def test_scanned_names_match_the_reference_scans_of_the_real_models(name, ref):
    path = REFERENCE_RESULTS / ref
    if not path.is_file():
        pytest.skip(f"{path} not present")
    from spectrum_fast.naming import wants

    mine = {s.name[: -len(".weight")] for s in synth.tensor_list(_config(name))
            if wants(s.name, s.shape, include_embeddings=False, types=None)}
    assert mine == {r.module for r in ScanResult.load(path).records}


def _dequantized(d: Path) -> dict[str, np.ndarray]:
    """Independently of spectrum_fast: torch's float8 decoding times the 128x128 block scales."""
    from safetensors.torch import load_file

    t = {}
    for f in d.glob("*.safetensors"):
        t.update(load_file(str(f)))
    out = {}
    for name, w in t.items():
        if w.ndim != 2 or not name.endswith(".weight") or ".layers." not in name:
            continue
        w = w.double()
        if name + "_scale_inv" in t:
            s = t[name + "_scale_inv"].double()
            s = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
            w = w * s
        out[name[: -len(".weight")]] = w.numpy()
    return out


def test_tiny_deepseek_v3_fp8_checkpoint_scans_against_float64(tmp_path):
    cfg = dict(_config("DeepSeek-V3"), hidden_size=320, intermediate_size=384, moe_intermediate_size=136,
               num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=3, num_attention_heads=2,
               num_key_value_heads=2, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
               v_head_dim=32, vocab_size=500)
    specs = synth.write(cfg, tmp_path / "m", layers=2, progress=False)
    assert any(s.dtype == "F8_E4M3" for s in specs) and any(s.name.endswith("_scale_inv") for s in specs)
    result = spectrum_fast.scan(tmp_path / "m", progress=False)
    want = _dequantized(tmp_path / "m")
    assert {r.module for r in result.records} == set(want)
    assert "model.layers.1.mlp.experts.2.down_proj" in want and "model.layers.0.self_attn.kv_b_proj" in want
    for r in result.records:
        assert r.dtype in ("F8_E4M3", "BF16")
        assert rel_err(r.snr, ref_snr(want[r.module])) <= 1e-4, r.module
    # realistic spectra: a bulk plus a few outliers above the noise edge, SNRs differing across matrices
    snrs = [r.snr for r in result.records if r.dtype == "F8_E4M3"]
    assert len(set(np.round(snrs, 6))) == len(snrs)


def test_layers_that_fit_respects_the_budget():
    cfg = _config("Qwen1.5-110B")
    per_layer = sum(s.nbytes for s in synth.tensor_list(cfg) if s.layer == 0)
    assert synth.layers_that_fit(cfg, free_bytes=int(per_layer * 6.5), fraction=0.5) == 3
    assert synth.layers_that_fit(cfg, free_bytes=10, fraction=0.5) == 1

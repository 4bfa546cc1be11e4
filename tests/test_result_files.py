"""File formats (SPEC.md §4): round-trips, the reference's published files, selection rule (§3)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from spectrum_fast import MatrixRecord, ResultFileError, ScanResult, load_result
from spectrum_fast.selection import percent_label, validate_top

from .conftest import REFERENCE_RESULTS, ref_select

needs_reference = pytest.mark.skipif(not REFERENCE_RESULTS.is_dir(), reason="../shared/reference-results not present")


def _result():
    recs = [MatrixRecord(f"model.layers.{i}.mlp.down_proj", "mlp.down_proj", snr, (8, 16), "BF16", "ok",
                         "gram-fp32", 2.0, 0.5, 3, False)
            for i, snr in enumerate([0.3, 0.9, 0.1, 0.9, 0.5])]
    recs.append(MatrixRecord("model.layers.5.mlp.down_proj", "mlp.down_proj", math.nan, (8, 16), "BF16", "nonfinite"))
    recs.append(MatrixRecord("model.layers.0.self_attn.q_proj", "self_attn.q_proj", math.inf, (8, 8), "BF16", "ok",
                             "gram-fp32", 1.0, 0.0, 8, True))
    return ScanResult("org/m", "org-m", recs, skipped=[{"name": "x", "reason": "unsupported dtype I8"}],
                      settings={"types": None, "include_embeddings": False}, sources=[{"path": "/x", "size": 1}],
                      embedding_names=["model.embed_tokens.weight"], head_names=["lm_head.weight"],
                      backend="cpu", elapsed_s=1.5, tool_version="0.1.0")


def test_full_file_round_trip(tmp_path):
    res = _result()
    full, ref = res.save(tmp_path)
    back = load_result(full)
    assert json.dumps(back.to_dict(), sort_keys=True) == json.dumps(res.to_dict(), sort_keys=True)
    flat = load_result(ref)
    assert flat.origin == "reference-flat"
    assert [(r.module, r.type) for r in flat.records] == [(r.module, r.type) for r in res.records]
    for a, b in zip(flat.records, res.records):
        assert a.snr == b.snr or (math.isnan(a.snr) and math.isnan(b.snr))
    assert "Infinity" in ref.read_text() and "NaN" in ref.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_binary_result_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ResultFileError, match=r"r\.json: not a text"):
        load_result(p)


def test_grouped_reference_layout(tmp_path):
    p = tmp_path / "snr_results_a-b.json"
    p.write_text('{"mlp.down_proj": {"model.layers.0.mlp.down_proj": 1.5, "model.layers.1.mlp.down_proj": Infinity}}')
    res = load_result(p)
    assert res.origin == "reference-grouped" and res.slug == "a-b"
    assert res["model.layers.1.mlp.down_proj"].snr == math.inf


def test_selection_rule():
    res = _result()
    sel = res.select(0.5)
    # 6 down_proj modules (NaN counted) -> floor(3); ties at 0.9 broken by name
    assert [r.module for r in sel.groups["mlp.down_proj"]] == [
        "model.layers.1.mlp.down_proj", "model.layers.3.mlp.down_proj", "model.layers.4.mlp.down_proj"]
    assert sel.groups["self_attn.q_proj"] == []  # floor(1 * 0.5) = 0
    assert [r.module for r in res.select(1.0).groups["self_attn.q_proj"]] == ["model.layers.0.self_attn.q_proj"]
    assert "model.layers.5.mlp.down_proj" not in res.select(1.0)  # NaN never selected


def test_yaml_round_trip(tmp_path):
    sel = _result().select(0.5)
    path = sel.save_yaml(tmp_path)
    assert path.name == "snr_results_org-m_unfrozenparameters_50percent.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["unfrozen_parameters"] == ["^lm_head.weight$", "^model.embed_tokens.weight$"] + sel.modules
    assert "# mlp.down_proj layers" in path.read_text()
    no_head = yaml.safe_load(sel.to_yaml(embed_head=False))["unfrozen_parameters"]
    assert no_head == sel.modules


def test_yaml_entries_match_like_axolotl():
    import re

    sel = _result().select(0.5)
    params = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight", "lm_head.weight",
              "model.embed_tokens.weight"]
    patterns = yaml.safe_load(sel.to_yaml())["unfrozen_parameters"]
    hit = [p for p in params if any(re.match(pat.replace(".", "\\."), p) for pat in patterns)]
    assert hit == ["model.layers.1.mlp.down_proj.weight", "lm_head.weight", "model.embed_tokens.weight"]


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, 50, float("nan"), "x"])
def test_top_validation(bad):
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        validate_top(bad)


def test_percent_labels():
    assert [percent_label(t) for t in (0.5, 0.25, 1.0, 0.125)] == ["50", "25", "100", "12.5"]


@pytest.mark.parametrize("text,match", [
    ("{oops", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("{}", "holds no modules"),
    ('{"a": {"snr": "high", "type": "t"}}', "non-numeric snr"),
    ('{"a": [1]}', "not a Spectrum result"),
    ('{"format": "spectrum_fast.scan", "format_version": 99}', "unsupported format version"),
    (('{"format": "spectrum_fast.scan", "format_version": 1, "model": "m", "slug": "m", "records": [], '
     '"settings": null}'), "field settings"),
    ('{"format": "spectrum_fast.scan", "format_version": 1, "model": "m", "slug": "../x", "records": []}',
     "field model/slug"),
    (('{"format": "spectrum_fast.scan", "format_version": 1, "model": "m", "slug": "m", '
     '"records": [{"module": "a", "type": "t", "snr": "abc"}]}'), "snr must be a number"),
    (('{"format": "spectrum_fast.scan", "format_version": 1, "model": "m", "slug": "m", '
     '"records": [{"module": "a", "type": ["t"], "snr": 1}]}'), "must be strings"),
    (('{"format": "spectrum_fast.scan", "format_version": 1, "model": "m", "slug": "m", '
     '"records": [{"module": "a", "type": "t", "snr": 1, "shape": [3]}]}'), "two non-negative integers"),
    (('{"format": "spectrum_fast.scan", "format_version": 1, "model": "m", "slug": "m", '
     '"records": [], "head_names": "lm_head.weight"}'), "field embedding_names/head_names"),
])
def test_bad_result_files(tmp_path, text, match):
    p = tmp_path / "r.json"
    p.write_text(text)
    with pytest.raises(ResultFileError, match=match):
        load_result(p)


@needs_reference
def test_every_published_reference_file_loads_and_selects():
    files = sorted(REFERENCE_RESULTS.glob("snr_results_*.json"))
    assert len(files) == 20
    for f in files:
        res = load_result(f)
        raw = json.loads(f.read_text())
        if res.origin == "reference-flat":
            snrs = {m: float(v["snr"]) for m, v in raw.items()}
            types = {m: v["type"] for m, v in raw.items()}
        else:
            snrs = {m: float(x) for g in raw.values() for m, x in g.items()}
            types = {m: t for t, g in raw.items() for m in g}
        assert len(res) == len(snrs)
        for top in (0.25, 0.5):
            assert set(res.select(top).modules) == ref_select(snrs, types, top), f.name


@needs_reference
def test_reference_scale_files():
    ds = load_result(REFERENCE_RESULTS / "snr_results_deepseek-ai-DeepSeek-V2.json")
    assert len(ds) == 28800 and len({r.type for r in ds.records}) == 491
    qwen = load_result(REFERENCE_RESULTS / "snr_results_Qwen-Qwen2-MoE-57B-A14B.json")
    assert sum(math.isinf(r.snr) for r in qwen.records) == 917
    pooled = ds.select(0.5, grouping="pooled")
    assert not any(part.isdigit() for g in pooled.groups for part in g.split("."))
    assert len(pooled.groups) < 20


@needs_reference
def test_mistral_reference_selection():
    res = load_result(REFERENCE_RESULTS / "snr_results_mistralai-Mistral-7B-v0.1.json")
    sel = res.select(0.5)
    assert len(sel.groups) == 7
    assert all(len(v) == 16 and sel.group_sizes[k] == 32 for k, v in sel.groups.items())

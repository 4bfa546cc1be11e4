"""Finding and reading checkpoints; every kind of broken input ends in a CheckpointError naming it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from spectrum_fast.checkpoint import open_checkpoint, read_matrix, slugify
from spectrum_fast.errors import CheckpointError

from .conftest import save_np, save_torch


def _two_tensors():
    rng = np.random.default_rng(0)
    return {"model.layers.0.mlp.down_proj.weight": rng.standard_normal((8, 16)).astype(np.float32),
            "model.layers.1.mlp.down_proj.weight": rng.standard_normal((8, 16)).astype(np.float32)}


def test_single_file_and_directory(tmp_path):
    t = _two_tensors()
    f = save_np(tmp_path / "m" / "model.safetensors", t)
    for target in (f, f.parent):
        ck = open_checkpoint(target)
        assert set(ck.tensors) == set(t)
        for name, arr in t.items():
            np.testing.assert_array_equal(read_matrix(ck.tensors[name]), arr)
    assert ck.slug == "m"


def test_sharded_directory_with_index(tmp_path):
    t = _two_tensors()
    names = list(t)
    save_np(tmp_path / "model-00001-of-00002.safetensors", {names[0]: t[names[0]]})
    save_np(tmp_path / "model-00002-of-00002.safetensors", {names[1]: t[names[1]]})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        names[0]: "model-00001-of-00002.safetensors", names[1]: "model-00002-of-00002.safetensors"}}))
    ck = open_checkpoint(tmp_path)
    assert len(ck.files) == 2 and set(ck.tensors) == set(names)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtypes_read_exactly(tmp_path, dtype):
    import torch

    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1)).to(getattr(torch, dtype))
    f = save_torch(tmp_path / "model.safetensors", {"h.0.attn.weight": w})
    got = read_matrix(open_checkpoint(f).tensors["h.0.attn.weight"])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, w.float().numpy())


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--org--Tiny_Model"
    snap = repo / "snapshots" / ("a" * 40)
    save_np(snap / "model.safetensors", _two_tensors())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    ck = open_checkpoint("org/Tiny_Model")
    assert len(ck.tensors) == 2
    assert ck.slug == "org-Tiny-Model"


def test_hub_id_not_cached_says_so(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        open_checkpoint("nobody/nothing-here")


def test_slugs(tmp_path, monkeypatch):
    assert slugify("mistralai/Mistral-7B-v0.1") == "mistralai-Mistral-7B-v0.1"
    assert slugify("Qwen/Qwen1.5_32B") == "Qwen-Qwen1.5-32B"
    d = tmp_path / "my_model"  # a local path: its directory's base name, as it is (SPEC §4)
    f = save_np(d / "model.safetensors", _two_tensors())
    assert slugify(str(d)) == slugify(str(f)) == "my_model"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert slugify("~/my_model") == "my_model"


# -- bad input -------------------------------------------------------------------------------------


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file or directory"):
        open_checkpoint("/nonexistent/model/dir")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path)


def test_truncated_shard(tmp_path):
    f = save_np(tmp_path / "model.safetensors", _two_tensors())
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* \(truncated or corrupt shard\)"):
        open_checkpoint(f)


def test_header_not_json(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        open_checkpoint(f)


def test_header_length_past_end(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds file size"):
        open_checkpoint(f)


def test_offsets_past_end(tmp_path):
    header = json.dumps({"a.0.w.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="'a.0.w.weight' ends at byte"):
        open_checkpoint(f)


def test_shape_does_not_match_bytes(tmp_path):
    header = json.dumps({"a.0.w.weight": {"dtype": "F32", "shape": [4, 5], "data_offsets": [0, 64]}}).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match="needs 80"):
        open_checkpoint(f)


def test_index_names_missing_shard(tmp_path):
    save_np(tmp_path / "model-00001-of-00002.safetensors", _two_tensors())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00002.safetensors'"):
        open_checkpoint(tmp_path)


def test_index_not_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("entry", [
    '{"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 1e400]}',
    '{"dtype": "F32", "shape": [1e400, 4], "data_offsets": [0, 64]}',
    '{"dtype": "F32", "shape": "44", "data_offsets": [0, 64]}',
    '{"dtype": "F32", "shape": [4.5, 4], "data_offsets": [0, 64]}',
    '{"dtype": 3, "shape": [4, 4], "data_offsets": [0, 64]}',
    '{"dtype": "F32", "shape": [4, 4], "data_offsets": [0]}',
])
def test_malformed_header_entries(tmp_path, entry):
    header = ('{"model.layers.0.w.weight": ' + entry + "}").encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match="'model.layers.0.w.weight' has a malformed header entry"):
        open_checkpoint(f)


def test_huge_shape_does_not_wrap_around(tmp_path):
    header = json.dumps({"a.0.w.weight": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="needs 73786976294838206464"):
        open_checkpoint(f)


def test_deeply_nested_header(tmp_path):
    header = b"[" * 100000
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        open_checkpoint(f)


def test_empty_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="shorter than 8 bytes"):
        open_checkpoint(Path(f))


# -- FP8 -------------------------------------------------------------------------------------------


def _deepseek_fp8(w, block=128):
    """DeepSeek-V3 layout: E4M3 values and one float32 scale_inv per block (dequant: fp8 * scale_inv)."""
    import torch

    m, n = w.shape
    sm, sn = -(-m // block), -(-n // block)
    scale = torch.zeros(sm, sn)
    q = torch.zeros(m, n, dtype=torch.float8_e4m3fn)
    for i in range(sm):
        for j in range(sn):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max() / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    deq = q.float() * scale.repeat_interleave(block, 0)[:m].repeat_interleave(block, 1)[:, :n]
    return q, scale, deq


def test_fp8_block_scaled_weights_are_dequantized(tmp_path):
    import torch

    import spectrum_fast

    from .conftest import ref_snr, rel_err

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * torch.linspace(0.1, 2.0, 200)  # blocks get different scales
    q, scale, deq = _deepseek_fp8(w)
    save_torch(tmp_path / "model.safetensors", {"model.layers.0.mlp.down_proj.weight": q,
                                                "model.layers.0.mlp.down_proj.weight_scale_inv": scale})
    info = open_checkpoint(tmp_path).tensors["model.layers.0.mlp.down_proj.weight"]
    np.testing.assert_array_equal(read_matrix(info), deq.numpy())
    res = spectrum_fast.scan(tmp_path, progress=False)
    assert [r.module for r in res.records] == ["model.layers.0.mlp.down_proj"]  # the scale is not scanned
    assert res.records[0].dtype == "F8_E4M3"
    assert rel_err(res.records[0].snr, ref_snr(deq.double().numpy())) <= 1e-4


def test_fp8_e5m2_without_scale(tmp_path):
    import torch

    w = (torch.randn(64, 48, generator=torch.Generator().manual_seed(1)) * 4).to(torch.float8_e5m2)
    save_torch(tmp_path / "model.safetensors", {"model.layers.0.attn.weight": w})
    got = read_matrix(open_checkpoint(tmp_path).tensors["model.layers.0.attn.weight"])
    np.testing.assert_array_equal(got, w.float().numpy())


def test_fp8_scale_that_does_not_fit_is_skipped_with_reason(tmp_path):
    import torch

    import spectrum_fast

    q = torch.zeros(64, 64, dtype=torch.float8_e4m3fn)
    save_torch(tmp_path / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": q,
                                                "model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(3, 5),
                                                "model.layers.1.mlp.up_proj.weight": torch.randn(8, 4)})
    info = open_checkpoint(tmp_path).tensors["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"scale 'model.layers.0.mlp.up_proj.weight_scale_inv' F32\[3, 5\] does not fit"):
        read_matrix(info)
    res = spectrum_fast.scan(tmp_path, progress=False)
    assert [r.module for r in res.records] == ["model.layers.1.mlp.up_proj"]
    assert res.skipped[0]["name"] == "model.layers.0.mlp.up_proj.weight"
    assert "does not fit [64, 64]" in res.skipped[0]["reason"]


def test_unscaled_fp8_warns(tmp_path):
    import torch

    import spectrum_fast
    from spectrum_fast.scanner import UnscaledFP8Warning

    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(2)).to(torch.float8_e4m3fn)
    save_torch(tmp_path / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": w})
    with pytest.warns(UnscaledFP8Warning, match="'model.layers.0.mlp.up_proj.weight' has no scale tensor"):
        res = spectrum_fast.scan(tmp_path, progress=False)
    assert len(res) == 1

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


def test_slugs():
    assert slugify("mistralai/Mistral-7B-v0.1") == "mistralai-Mistral-7B-v0.1"
    assert slugify("Qwen/Qwen1.5_32B") == "Qwen-Qwen1.5-32B"


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


def test_empty_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="shorter than 8 bytes"):
        open_checkpoint(Path(f))

"""Scanning straight from the Hub: a real HTTP server on loopback that answers like the Hub does
(``tests/hub_server.py``), reached through ``HF_ENDPOINT`` by the real ``huggingface_hub``: nothing of
``huggingface_hub`` is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import spectrum_fast
from spectrum_fast.errors import CheckpointError

from .conftest import ref_snr, rel_err, save_np
from .hub_server import FakeHub, Repo

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
REPO = "org/tiny-llm"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def _weights(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Three shards of a small model: two layers' matrices per shard, low-rank signal plus noise."""
    rng = np.random.default_rng(seed)
    shards: dict[str, dict[str, np.ndarray]] = {}
    for i, shard in enumerate(SHARDS):
        t = {}
        for layer in (2 * i, 2 * i + 1):
            for proj, shape in (("self_attn.q_proj", (48, 48)), ("mlp.up_proj", (96, 48))):
                w = rng.standard_normal(shape) * 0.02
                w += rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1])) * rng.uniform(0, 0.05)
                t[f"model.layers.{layer}.{proj}.weight"] = w.astype(np.float32)
            t[f"model.layers.{layer}.input_layernorm.weight"] = np.ones(48, np.float32)
        if i == 0:
            t["model.embed_tokens.weight"] = rng.standard_normal((100, 48)).astype(np.float32)
        shards[shard] = t
    return shards


def _write(d: Path, shards: dict[str, dict[str, np.ndarray]]) -> dict[str, Path]:
    files = {name: save_np(d / name, t) for name, t in shards.items()}
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: name for name, t in shards.items() for k in t}}))
    files[index.name] = index
    (d / "config.json").write_text("{}")
    return files


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Two commits of REPO on a loopback Hub (main -> B), and an empty cache, via the environment."""
    a = _write(tmp_path / "src-a", _weights(1))
    b = _write(tmp_path / "src-b", _weights(2))
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeHub({REPO: Repo({COMMIT_A: a, COMMIT_B: b}, {"main": COMMIT_B, "v1": COMMIT_A})}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.cache = cache
        server.src = {COMMIT_A: tmp_path / "src-a", COMMIT_B: tmp_path / "src-b"}
        yield server


def _shard_blobs(cache: Path) -> list[Path]:
    """Weight shards present in the cache (complete or being downloaded). The scan deletes shards while this
    looks (it runs in the test server's request handler): a file gone between listing and stat is gone."""
    blobs = cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    out = []
    for p in blobs.glob("*") if blobs.is_dir() else ():
        try:
            if p.stat().st_size > 10_000:
                out.append(p)
        except FileNotFoundError:
            continue
    return out


def _expected(src: Path) -> dict[str, float]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            if t.ndim == 2 and ".layers." in name:
                out[name[:-len(".weight")]] = ref_snr(t)
    return out


def test_scan_streams_shards_and_deletes_them(hub):
    peak = []
    hub.on_get = lambda name: name in SHARDS and peak.append(len(_shard_blobs(hub.cache)))
    result = spectrum_fast.scan(REPO, progress=False)

    want = _expected(hub.src[COMMIT_B])
    assert {r.module: r.type for r in result.records} == {m: m.split(".", 3)[3] for m in want}
    for r in result.records:
        assert rel_err(r.snr, want[r.module]) <= 1e-4
    # identical to scanning the same files from a local directory
    local = spectrum_fast.scan(hub.src[COMMIT_B], progress=False)
    assert result.snr == local.snr
    assert result.slug == "org-tiny-llm"
    assert [s["path"] for s in result.sources] == [f"hf://{REPO}@{COMMIT_B}/{s}" for s in SHARDS]

    for shard in SHARDS:
        assert len(hub.gets(shard, ranged=False)) == 1  # each shard's body fetched exactly once
        assert hub.gets(shard, ranged=True)  # its header by a range request, before any download
    first_download = min(i for i, r in enumerate(hub.log) if r.method == "GET" and r.range is None
                         and r.filename in SHARDS)
    assert all(any(r.filename == s and r.range for r in hub.log[:first_download]) for s in SHARDS)
    assert _shard_blobs(hub.cache) == []  # nothing of the model left behind
    assert max(peak) <= 1  # when a download starts, at most one other shard is on disk (lookahead 1)


def _ranges(r) -> tuple[int, int]:
    start, end = r.range[len("bytes="):].split("-")
    return int(start), int(end) + 1


def test_fetch_ranges_reads_only_the_matrices(hub):
    """fetch="ranges": no shard is downloaded whole, only the scanned matrices' bytes (plus headers) move,
    nothing is left on disk, and the result is the same as from local files."""
    result = spectrum_fast.scan(REPO, progress=False, fetch="ranges", batch_bytes=20_000)
    assert result.snr == spectrum_fast.scan(hub.src[COMMIT_B], progress=False).snr
    assert not [r for r in hub.log if r.method == "GET" and r.range is None and r.filename in SHARDS]
    from spectrum_fast.checkpoint import open_checkpoint

    tensors = open_checkpoint(hub.src[COMMIT_B]).tensors
    wanted = {(info.file.name, info.offset, info.offset + info.nbytes) for name, info in tensors.items()
              if name[: -len(".weight")] in result.snr}
    body = [(r.filename, *_ranges(r)) for r in hub.log if r.method == "GET" and r.range and r.filename in SHARDS
            and not r.range.startswith("bytes=0-")]
    assert set(body) == wanted  # exactly the matrices: no norm, no embedding
    assert not list(hub.cache.rglob("*.safetensors"))  # sparse batch files removed
    assert [p.name for p in hub.cache.iterdir() if p.name.startswith(".spectrum_fast")] == []


@pytest.mark.parametrize("kwargs, match", [
    ({"fetch": "ranges", "keep": True}, "keep applies to fetch='shards'"),
    ({"fetch": "torrent"}, "fetch must be one of shards, ranges"),
    ({"fetch": "ranges", "batch_bytes": 0}, "batch_bytes must be positive"),
    ({"lookahead": -1}, "lookahead must be 0 or more"),
])
def test_bad_hub_options(hub, kwargs, match):
    with pytest.raises(spectrum_fast.SpectrumError, match=match):
        spectrum_fast.scan(REPO, progress=False, **kwargs)
    assert not hub.log  # refused before any request


def test_cli_rejects_a_batch_size_of_zero(hub, tmp_path, capsys):
    from spectrum_fast.cli import scan_main

    out = tmp_path / "out"
    assert scan_main([REPO, "--fetch", "ranges", "--batch-gb", "0", "--out", str(out), "-q"]) == 2
    assert "batch_bytes must be positive" in capsys.readouterr().err
    assert not hub.log and not list(out.glob("*.json"))


def test_fetch_ranges_survives_a_server_error(hub):
    hub.fail_ranged_once.add(SHARDS[1])
    result = spectrum_fast.scan(REPO, progress=False, fetch="ranges")
    assert result.snr == spectrum_fast.scan(hub.src[COMMIT_B], progress=False).snr
    assert any(r.status == 500 and r.filename == SHARDS[1] for r in hub.log)


def test_header_read_failure_is_one_line(hub, monkeypatch):
    from spectrum_fast import hub as hub_mod

    monkeypatch.setattr(hub_mod, "_RETRIES", 1)
    hub.fail_always.add(SHARDS[2])
    with pytest.raises(CheckpointError, match=f"{REPO}: cannot read the shards' headers from .*HfHubHTTPError") as e:
        spectrum_fast.scan(REPO, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fetch", ["shards", "ranges"])
def test_a_failed_scan_leaves_nothing_behind(hub, monkeypatch, fetch):
    """The engine fails on the first batch while the next one is being fetched: what was fetched ahead is
    deleted too (once its download ends), and the error is the engine's."""
    import time

    from spectrum_fast import scanner

    def broken(*args, **kwargs):
        raise spectrum_fast.SpectrumError("engine broke")

    monkeypatch.setattr(scanner, "_cpu_stats", broken)
    with pytest.raises(spectrum_fast.SpectrumError, match="engine broke"):
        spectrum_fast.scan(REPO, progress=False, fetch=fetch, batch_bytes=20_000)
    deadline = time.monotonic() + 10
    while (_shard_blobs(hub.cache) or list(hub.cache.rglob("*.safetensors"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _shard_blobs(hub.cache) == [] and list(hub.cache.rglob("*.safetensors")) == []


@pytest.mark.parametrize("fetch", ["shards", "ranges"])
def test_server_without_range_support(hub, fetch):
    hub.ignore_ranges = True
    result = spectrum_fast.scan(REPO, progress=False, fetch=fetch)
    assert result.snr == spectrum_fast.scan(hub.src[COMMIT_B], progress=False).snr


@pytest.mark.parametrize("fetch", ["shards", "ranges"])
def test_shards_in_a_subfolder(hub, tmp_path, fetch):
    files = {f"weights/{name}": path for name, path in hub.repos[REPO].commits[COMMIT_B].items()
             if name.endswith(".safetensors")}
    index = json.loads((hub.src[COMMIT_B] / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: f"weights/{v}" for k, v in index["weight_map"].items()}
    (tmp_path / "index.json").write_text(json.dumps(index))
    files["model.safetensors.index.json"] = tmp_path / "index.json"
    hub.repos["org/sub"] = Repo({COMMIT_A: files}, {"main": COMMIT_A})
    result = spectrum_fast.scan("org/sub", progress=False, fetch=fetch)
    assert result.snr == spectrum_fast.scan(hub.src[COMMIT_B], progress=False).snr


def test_lookahead_zero_keeps_one_shard_on_disk(hub):
    peak = []
    hub.on_get = lambda name: name in SHARDS and peak.append(len(_shard_blobs(hub.cache)))
    spectrum_fast.scan(REPO, progress=False, lookahead=0)
    assert peak == [0, 0, 0]


def test_keep_then_cached_scan_needs_no_download(hub):
    spectrum_fast.scan(REPO, progress=False, keep=True)
    assert len(_shard_blobs(hub.cache)) == 3
    n_requests = len(hub.log)
    again = spectrum_fast.scan(REPO, progress=False)  # whole in the cache now: no network at all
    assert len(hub.log) == n_requests
    assert len(_shard_blobs(hub.cache)) == 3
    assert again.snr == spectrum_fast.scan(hub.src[COMMIT_B], progress=False).snr


def test_partly_cached_repo_downloads_only_the_rest_and_keeps_the_cached(hub):
    spectrum_fast.scan(REPO, progress=False, keep=True)
    snapshot = hub.cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_B
    gone = snapshot / SHARDS[1]
    os.unlink(os.path.realpath(gone))
    gone.unlink()
    hub.log.clear()
    result = spectrum_fast.scan(REPO, progress=False)
    assert [s for s in SHARDS if hub.gets(s, ranged=False)] == [SHARDS[1]]
    assert (snapshot / SHARDS[0]).is_file() and (snapshot / SHARDS[2]).is_file()  # cached before: kept
    assert not gone.exists()  # downloaded for this scan: deleted again
    assert result.snr == spectrum_fast.scan(hub.src[COMMIT_B], progress=False).snr


def test_dropped_connection_resumes_with_a_range_request(hub, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub keeps what it received in chunks of this size (10 MB); the test shards are ~50 KB
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    hub.cut_once.add(SHARDS[1])
    result = spectrum_fast.scan(REPO, progress=False)
    resumed = [r.range for r in hub.gets(SHARDS[1]) if r.range and not r.range.startswith("bytes=0-")]
    size = (hub.src[COMMIT_B] / SHARDS[1]).stat().st_size
    assert len(resumed) == 1 and resumed[0].endswith("-")
    assert 0 < int(resumed[0][len("bytes="):-1]) <= size // 2  # continued where the connection dropped
    assert result.snr == spectrum_fast.scan(hub.src[COMMIT_B], progress=False).snr


def test_failed_run_resumes_from_its_journal_without_downloading_scanned_shards(hub, tmp_path):
    """The last shard's download fails (HTTP 500): the scan fails with one line naming it, and the next
    run with the same journal downloads only that shard and ends with the uninterrupted result."""
    journal = tmp_path / "scan.journal"
    hub.fail_once.add(SHARDS[2])
    with pytest.raises(CheckpointError, match=f"{REPO}/{SHARDS[2]}: download failed"):
        spectrum_fast.scan(REPO, progress=False, journal=journal, lookahead=0)
    assert _shard_blobs(hub.cache) == []  # the shards scanned before the failure were deleted all the same
    hub.log.clear()
    result = spectrum_fast.scan(REPO, progress=False, journal=journal)
    assert [s for s in SHARDS if hub.gets(s, ranged=False)] == [SHARDS[2]]
    assert result.snr == spectrum_fast.scan(hub.src[COMMIT_B], progress=False).snr


def test_revision_is_pinned_and_selectable(hub):
    old = spectrum_fast.scan(REPO, progress=False, revision="v1")
    assert old.snr == spectrum_fast.scan(hub.src[COMMIT_A], progress=False).snr
    assert old.sources[0]["path"].startswith(f"hf://{REPO}@{COMMIT_A}/")
    # after resolving "v1" once, every request names the commit, never the moving ref
    assert {r.revision for r in hub.log if r.filename in SHARDS} == {COMMIT_A}
    new = spectrum_fast.scan(REPO, progress=False)
    assert old.snr != new.snr


def test_journal_resume_downloads_nothing_already_scanned(hub, tmp_path):
    journal = tmp_path / "scan.journal"
    first = spectrum_fast.scan(REPO, progress=False, journal=journal)
    hub.log.clear()
    second = spectrum_fast.scan(REPO, progress=False, journal=journal)
    assert second.snr == first.snr
    assert not [r for r in hub.log if r.method == "GET" and r.range is None and r.filename in SHARDS]


def test_single_file_repo(hub, tmp_path):
    w = {"h.0.attn.weight": np.random.default_rng(3).standard_normal((40, 24)).astype(np.float32)}
    f = save_np(tmp_path / "single" / "model.safetensors", w)
    hub.repos["org/single"] = Repo({COMMIT_A: {"model.safetensors": f}}, {"main": COMMIT_A})
    result = spectrum_fast.scan("org/single", progress=False)
    assert rel_err(result["h.0.attn"].snr, ref_snr(w["h.0.attn.weight"])) <= 1e-4


@pytest.mark.parametrize("model, kwargs, match", [
    ("org/nothing", {}, r"org/nothing: cannot read the model from http://127\.0\.0\.1:\d+: RepositoryNotFoundError"),
    (REPO, {"revision": "no-such-branch"}, r"org/tiny-llm@no-such-branch: .*RevisionNotFoundError"),
])
def test_hub_errors_are_one_line(hub, model, kwargs, match):
    with pytest.raises(CheckpointError, match=match) as e:
        spectrum_fast.scan(model, progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_repo_without_weights(hub, tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    hub.repos["org/empty"] = Repo({COMMIT_A: {"config.json": tmp_path / "cfg.json"}}, {"main": COMMIT_A})
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        spectrum_fast.scan("org/empty", progress=False)


def test_unreachable_hub(monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointError, match=f"org/x: cannot read the model from http://127.0.0.1:{port}"):
        spectrum_fast.scan("org/x", progress=False)


def test_truncated_download_is_an_error_naming_the_shard(hub, tmp_path):
    """A shard whose header promises more bytes than the Hub serves is refused before anything is scanned."""
    broken = tmp_path / "broken.safetensors"
    data = (hub.src[COMMIT_B] / SHARDS[0]).read_bytes()
    broken.write_bytes(data[: len(data) - 100])
    hub.repos[REPO].commits[COMMIT_B] = {**hub.repos[REPO].commits[COMMIT_B], SHARDS[0]: broken}
    with pytest.raises(CheckpointError, match=f"{SHARDS[0]}: tensor .* ends at byte"):
        spectrum_fast.scan(REPO, progress=False)


def test_cli_from_the_hub(hub, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    p = subprocess.run([sys.executable, "-m", "spectrum_fast.scan", REPO, "--out", str(out), "-q"],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    ref = json.loads((out / "snr_results_org-tiny-llm.json").read_text())
    want = _expected(hub.src[COMMIT_B])
    assert set(ref) == set(want)
    assert all(rel_err(ref[m]["snr"], want[m]) <= 1e-4 for m in want)
    assert _shard_blobs(hub.cache) == []
    p = subprocess.run([sys.executable, "-m", "spectrum_fast.scan", "org/missing", "--out", str(out), "-q"],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "org/missing" in p.stderr


@pytest.mark.slow
def test_torchrun_ranks_fetch_disjoint_matrices_by_range(hub, tmp_path):
    from .test_distributed_scan import _torchrun

    out = tmp_path / "out"
    p = _torchrun(2, ["-m", "spectrum_fast.scan", REPO, "--out", str(out), "-q", "--fetch", "ranges"], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    body = [(r.filename, r.range) for r in hub.log if r.method == "GET" and r.range and r.filename in SHARDS
            and not r.range.startswith("bytes=0-")]
    assert len(body) == len(set(body)) == 12  # each matrix fetched once, by one rank
    ref = json.loads((out / "snr_results_org-tiny-llm.json").read_text())
    assert {m: v["snr"] for m, v in ref.items()} == spectrum_fast.scan(hub.src[COMMIT_B], progress=False).snr


@pytest.mark.slow
def test_torchrun_ranks_download_disjoint_shards(hub, tmp_path):
    pytest.importorskip("torch")
    from .test_distributed_scan import _torchrun

    out = tmp_path / "out"
    p = _torchrun(2, ["-m", "spectrum_fast.scan", REPO, "--out", str(out), "-q"], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    for shard in SHARDS:
        assert len(hub.gets(shard, ranged=False)) == 1, shard  # never downloaded by both ranks
    ref = json.loads((out / "snr_results_org-tiny-llm.json").read_text())
    assert {m: v["snr"] for m, v in ref.items()} == spectrum_fast.scan(hub.src[COMMIT_B], progress=False).snr
    assert _shard_blobs(hub.cache) == []


def test_fetch_ranges_never_cuts_a_batched_unit(hub):
    """Range batches are cut by size, but never inside a unit of the GPU's batched solver (whose bits depend
    on the company), so a resumed range scan batches as the uninterrupted one did."""
    from spectrum_fast.checkpoint import open_checkpoint
    from spectrum_fast.scheduling import batch_units, group_units

    ckpt = open_checkpoint(REPO)
    ckpt.remote.fetch, ckpt.remote.batch_bytes, ckpt.remote.progress = "ranges", 1, False
    infos = sorted((i for n, i in ckpt.tensors.items() if "proj" in n), key=lambda i: (str(i.file), i.offset))
    units = batch_units(infos, 2048, 64)
    assert len(set(units.values())) == 6 and len(units) == 12  # q_proj and up_proj pairs, per shard
    batches = [[i.name for i in b] for b in ckpt.remote.stage([i for g in group_units(infos, units) for i in g], units)]
    assert sorted(len(b) for b in batches) == [2] * 6
    assert all(units[a] == units[b] for a, b in batches)
    assert [[i.name for i in b] for b in ckpt.remote.stage(infos[:3])] == [[i.name] for i in infos[:3]]

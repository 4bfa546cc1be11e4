"""One GPU state for a whole scan (:class:`spectrum_fast.cuda_engine.Session`): engines built once, and the GPU
band solver's bands waiting for a full launch across ``cuda_stats`` calls, as a Hub scan makes one call per
shard. Run on the CPU: the fake engine of test_cuda_orchestration, the band solver's native code on host
threads, and the loopback Hub of test_hub."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import spectrum_fast
from spectrum_fast import cuda_engine, twostage
from spectrum_fast.checkpoint import open_checkpoint, read_matrix

from .conftest import ref_snr, rel_err, save_np
from .test_cuda_orchestration import fake_gpu, needs_bands  # noqa: F401 - fixture
from .test_hub import COMMIT_B, REPO, SHARDS, _shard_blobs, hub  # noqa: F401 - fixture


def _checkpoints(tmp_path) -> tuple[list, dict]:
    """Two shards of three matrices each, and their float32 values."""
    rng = np.random.default_rng(11)
    weights = {}
    for shard in range(2):
        t = {f"model.layers.{3 * shard + i}.mlp.up_proj.weight":
             (rng.standard_normal((120, 70)) * 0.02 + 0.04 * np.outer(rng.standard_normal(120), rng.standard_normal(70))
              ).astype(np.float32) for i in range(3)}
        save_np(tmp_path / f"shard{shard}" / "model.safetensors", t)
        weights.update(t)
    shards = [sorted(open_checkpoint(tmp_path / f"shard{s}").tensors.values(), key=lambda i: i.offset)
              for s in range(2)]
    return shards, weights


@pytest.fixture
def gpu_route(fake_gpu, monkeypatch):  # noqa: F811 - the imported fixture
    """The GPU two-stage route, on the CPU; a launch holds 1000 bands (as a GPU's does, more than these
    scans have); the bands of each launch are recorded."""
    pytest.importorskip("torch")
    monkeypatch.setattr(cuda_engine, "_TORCH_DEVICE", "cpu")
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "16")
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "0")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "gpu")
    init, launch = twostage.DeviceBands.__init__, twostage.DeviceBands._launch
    launches: list[int] = []

    def full(self, device, band=32, threads=None, launch_at=None, variant=twostage.CHASE_VARIANT):
        init(self, device, band, threads, 1000, variant)

    def counted(self, n, count=None):
        launches.append(sum(len(keys) for keys, _, _ in self._kept.get(n, [])) if count is None else count)
        launch(self, n, count)

    monkeypatch.setattr(twostage.DeviceBands, "__init__", full)
    monkeypatch.setattr(twostage.DeviceBands, "_launch", counted)
    fake_gpu.launches = launches
    return fake_gpu


def test_engines_are_built_once_per_scan(fake_gpu, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "0")  # no unit: each call deals to both devices
    shards, _ = _checkpoints(tmp_path)
    got = {}
    session = cuda_engine.Session()
    for infos in shards:
        cuda_engine.cuda_stats(infos, [0, 1], lambda i, out: got.update({i.name: out}), session=session)
    session.finish(lambda i, out: got.update({i.name: out}))
    assert len(got) == 6 and sorted(d for d, _, _ in fake_gpu.syevd) == [0, 1]  # one engine per device
    fake_gpu.syevd.clear()
    for infos in shards:  # without a session: built again for every call
        cuda_engine.cuda_stats(infos, [0], lambda i, out: None)
    assert len(fake_gpu.syevd) == 2


@needs_bands
def test_bands_wait_for_a_full_launch_across_calls(gpu_route, tmp_path):
    shards, weights = _checkpoints(tmp_path)
    got = {}
    session = cuda_engine.Session()
    for infos in shards:
        cuda_engine.cuda_stats(infos, [0], lambda i, out: got.update({i.name: out}), session=session)
        assert got == {} and gpu_route.launches == []  # kept: a launch of 3 costs what one of 1000 does
    session.finish(lambda i, out: got.update({i.name: out}))
    assert gpu_route.launches == [6] and len(got) == 6  # one launch for both calls
    for name, out in got.items():
        assert out.method == "gram-fp64" and rel_err(out.snr, ref_snr(weights[name])) <= 1e-4
    alone = {}  # the same numbers, bit for bit, as one call over everything
    cuda_engine.cuda_stats(shards[0] + shards[1], [0], lambda i, out: alone.update({i.name: out.snr}))
    assert alone == {name: out.snr for name, out in got.items()}
    gpu_route.launches.clear()
    for infos in shards:  # without a session: each call launches what it has
        cuda_engine.cuda_stats(infos, [0], lambda i, out: None)
    assert gpu_route.launches == [3, 3]


@needs_bands
def test_a_band_result_the_guard_refuses_is_read_again(gpu_route, tmp_path, monkeypatch):
    """Delivered after its file is gone (a Hub scan deleted the shard): the session's reread brings its values
    back for the CPU engine."""
    shards, weights = _checkpoints(tmp_path)
    target = shards[0][1]
    judge = cuda_engine._judge
    monkeypatch.setattr(cuda_engine, "_judge", lambda info, lam, amax, code, eps: None if (
        info.name == target.name and eps == cuda_engine._EPS64) else judge(info, lam, amax, code, eps))
    kept = {target.name: read_matrix(target)}
    reread = []

    def from_elsewhere(info):
        reread.append(info.name)
        return kept[info.name]

    got = {}
    session = cuda_engine.Session(reread=from_elsewhere)
    cuda_engine.cuda_stats(shards[0], [0], lambda i, out: got.update({i.name: out}), session=session)
    (tmp_path / "shard0" / "model.safetensors").unlink()  # the Hub scan moved on to the next shard
    cuda_engine.cuda_stats(shards[1], [0], lambda i, out: got.update({i.name: out}), session=session)
    session.finish(lambda i, out: got.update({i.name: out}))
    # the CPU engine's own route on the values read again (the GPU route's would say gram-fp64)
    assert reread == [target.name] and got[target.name].method == "gram-fp32"
    assert rel_err(got[target.name].snr, ref_snr(weights[target.name])) <= 1e-4
    assert {n for n, out in got.items() if out.method == "gram-fp64"} == set(weights) - {target.name}


@needs_bands
def test_hub_scan_on_the_gpu_route_launches_once_and_rereads_by_ranges(gpu_route, hub, monkeypatch):  # noqa: F811
    """Three shards, downloaded and deleted one at a time: one engine, one band-solver launch after the last
    shard (there were three), the numbers of a scan of the same files on disk; a matrix the float64 guard
    refuses is fetched again by range requests after its shard is gone, and leaves nothing behind."""
    local = spectrum_fast.scan(hub.src[COMMIT_B], device="cuda", progress=False)
    gpu_route.launches.clear()
    gpu_route.syevd.clear()
    result = spectrum_fast.scan(REPO, device="cuda", progress=False)
    assert gpu_route.launches == [12] and len(gpu_route.syevd) == 1
    assert result.snr == local.snr and all(r.method == "gram-fp64" for r in result.records)
    assert _shard_blobs(hub.cache) == []

    target = "model.layers.0.mlp.up_proj.weight"  # in the first shard
    judge = cuda_engine._judge
    monkeypatch.setattr(cuda_engine, "_judge", lambda info, lam, amax, code, eps: None if (
        info.name == target and eps == cuda_engine._EPS64) else judge(info, lam, amax, code, eps))
    ranged_before = len(hub.gets(SHARDS[0], ranged=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warnings either
        again = spectrum_fast.scan(REPO, device="cuda", progress=False)
    by = {r.module + ".weight": r for r in again.records}
    assert by[target].method != "gram-fp64" and len(hub.gets(SHARDS[0], ranged=True)) > ranged_before
    assert rel_err(by[target].snr, local.snr[target[:-len(".weight")]]) <= 1e-4
    assert _shard_blobs(hub.cache) == [] and not list(hub.cache.rglob(".spectrum_fast-reread-*"))


@needs_bands
def test_a_failed_hub_scan_journals_the_bands_it_computed(gpu_route, hub, tmp_path):  # noqa: F811
    """The last shard's download fails while the first two shards' bands wait for a launch: they are launched
    and journaled before the error is raised, so the resumed scan downloads only the last shard."""
    journal = tmp_path / "scan.journal"
    hub.fail_once.add(SHARDS[2])
    with pytest.raises(spectrum_fast.SpectrumError, match=f"{REPO}/{SHARDS[2]}: download failed"):
        spectrum_fast.scan(REPO, device="cuda", progress=False, journal=journal, lookahead=0)
    assert gpu_route.launches == [8]  # the two shards' bands, launched on the way out
    hub.log.clear()
    result = spectrum_fast.scan(REPO, device="cuda", progress=False, journal=journal)
    assert [s for s in SHARDS if hub.gets(s, ranged=False)] == [SHARDS[2]]
    assert result.snr == spectrum_fast.scan(hub.src[COMMIT_B], device="cuda", progress=False).snr


def test_a_gpu_listed_twice_is_refused(fake_gpu, tmp_path):  # noqa: F811
    shards, _ = _checkpoints(tmp_path)
    with pytest.raises(spectrum_fast.SpectrumError, match=r"devices lists a GPU more than once: \[0, 0\]"):
        spectrum_fast.scan(tmp_path / "shard0", device="cuda", devices=[0, 0], progress=False)
    with pytest.raises(spectrum_fast.SpectrumError, match="more than once"):
        cuda_engine.cuda_stats(shards[0], [1, 1], lambda i, out: None)

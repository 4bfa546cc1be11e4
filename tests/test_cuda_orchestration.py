"""The GPU path's Python side (planning, fp32 -> fp64 -> CPU fallbacks, several devices, routing, errors),
run against a stand-in for the native engine that computes what it promises with numpy. The engine
itself is tested on a GPU by tests/test_native.py."""

from __future__ import annotations

import json
import re
import sys
import types
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import spectrum_fast
from spectrum_fast import backends, cuda_engine

from .conftest import ref_select, ref_snr, rel_err, save_np


def _native_bands() -> bool:
    try:
        from spectrum_fast import _C  # type: ignore[attr-defined]
    except ImportError:
        return False
    return hasattr(_C, "band_eigenvalues_host")


NATIVE_BANDS = _native_bands()  # before any test swaps in the fake engine
needs_bands = pytest.mark.skipif(not NATIVE_BANDS, reason="the native extension (its host band solver) is not built here")
MODES = ["cpu", pytest.param("gpu", marks=needs_bands)]

_RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class FakeEngine:
    """Same contract as spectrum_fast._C.GramEngine.run: per task (ascending Gram eigenvalues, amax, info)."""

    calls: ClassVar[list[tuple[int, int, bool]]] = []
    fail_on: str | None = None
    info_code = 0  # what cuSOLVER reports; non-zero: not converged

    def __init__(self, device: int = 0):
        self.device = device
        FakeEngine.syevd.append((device, 0, 0))

    def set_syevd_algorithm(self, alg, min_k=0):
        FakeEngine.syevd[-1] = (self.device, alg, min_k)

    def run(self, tasks, fp64=False, should_stop=None):
        out = []
        for path, offset, nbytes, dtype, rows, cols, scale in tasks:
            if FakeEngine.fail_on and FakeEngine.fail_on in path:
                raise RuntimeError("cudaMalloc failed: cudaErrorMemoryAllocation (out of memory)")
            assert rows > 0 and cols > 0, "the engine rejects empty matrices"
            w = _decode(path, offset, dtype, rows * cols).reshape(rows, cols)
            if scale is not None:  # as the engine's contract says: fp8 * scale, in float32
                spath, soff, snbytes, sdtype, layout, block, scols = scale
                s = _decode(spath, soff, sdtype, snbytes // {"F32": 4}.get(sdtype, 2))
                if layout == "scalar":
                    w = w * s[0]
                elif layout == "row":
                    w = w * s[:, None]
                else:
                    s = s.reshape(-1, scols)
                    w = w * s[np.arange(rows)[:, None] // block, np.arange(cols)[None, :] // block]
            w = w.astype(np.float64 if fp64 else np.float32)
            g = w.T @ w if rows >= cols else w @ w.T
            out.append((np.linalg.eigvalsh(g).astype(np.float64), float(np.abs(w).max()), FakeEngine.info_code))
            FakeEngine.calls.append((self.device, rows, fp64))
        return out


def _decode(path, offset, dtype, count) -> np.ndarray:
    """Stored values as float32, decoded independently of spectrum_fast (FP8 by torch)."""
    if dtype.startswith("F8"):
        import torch

        raw = np.fromfile(path, dtype=np.uint8, count=count, offset=offset)
        kind = torch.float8_e4m3fn if dtype == "F8_E4M3" else torch.float8_e5m2
        return torch.from_numpy(raw).view(kind).float().numpy()
    raw = np.fromfile(path, dtype=_RAW[dtype], count=count, offset=offset)
    return (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw.astype(np.float32)


def _fake_run_batched(self, tasks, fp64=False, batch=64, should_stop=None):
    shapes = {(t[3], t[4], t[5]) for t in tasks}
    assert len(shapes) == 1 and len(tasks) > 1, "run_batched takes two or more tasks of one shape"
    FakeEngine.batched_calls.append(len(tasks))
    return FakeEngine.run(self, tasks, fp64, should_stop)


FakeEngine.run_batched = _fake_run_batched
FakeEngine.batched_calls = []


@pytest.fixture
def fake_gpu(monkeypatch):
    fake = types.ModuleType("spectrum_fast._C")
    fake.GramEngine = FakeEngine
    fake.cusolver_version = fake.cusolver_header_version = lambda: 12401
    fake.device_count = lambda: 2
    try:  # the two-stage solver's kernels run on host threads too: the real ones where the extension is built
        from spectrum_fast import _C as real  # type: ignore[attr-defined]

        fake.band_eigenvalues_host, fake.panel_qr_host = real.band_eigenvalues_host, real.panel_qr_host
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "spectrum_fast._C", fake)
    monkeypatch.setattr(spectrum_fast, "_C", fake, raising=False)
    monkeypatch.setattr(backends, "cuda_unavailable_reason", lambda: None)
    FakeEngine.calls = []
    FakeEngine.batched_calls = []
    FakeEngine.syevd = []
    FakeEngine.fail_on = None
    FakeEngine.info_code = 0
    return FakeEngine


def _checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    t = {f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal((96, 48)) +
                                                   (i + 1) * np.outer(rng.standard_normal(96), rng.standard_normal(48))
                                                   ).astype(np.float32) for i in range(6)}
    t["model.layers.6.mlp.up_proj.weight"] = (rng.standard_normal((512, 64)) @ rng.standard_normal((64, 128))).astype(np.float32)
    t["model.layers.7.mlp.up_proj.weight"] = np.zeros((0, 48), np.float32)
    t["model.layers.8.mlp.up_proj.weight"] = np.zeros((16, 48), np.float32)
    return save_np(tmp_path / "model.safetensors", t), t


@pytest.mark.parametrize("devices", [[0], [0, 1]])
def test_gpu_path_matches_reference_and_cpu(fake_gpu, tmp_path, devices):
    path, t = _checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectrum_fast.DegenerateMatrixWarning)
        gpu = spectrum_fast.scan(path, device="cuda", devices=devices, progress=False)
        cpu = spectrum_fast.scan(path, device="cpu", progress=False)
    assert gpu.backend == "cuda"
    assert [r.module for r in gpu.records] == [r.module for r in cpu.records]
    for r in gpu.records:
        w = t[r.module + ".weight"]
        if w.size == 0 or not w.any():
            assert r.status == ("empty" if w.size == 0 else "zero")
            continue
        assert rel_err(r.snr, ref_snr(w)) <= 1e-4, r.module
    assert gpu.select(0.5).modules == cpu.select(0.5).modules
    assert {d for d, _, _ in fake_gpu.calls} == set(devices)
    assert all(rows > 0 for _, rows, _ in fake_gpu.calls)  # the empty matrix never reached the engine
    # the rank-64 matrix cannot be decided from an fp32 Gram matrix: the engine runs it again in fp64
    assert (512, True) in {(rows, fp64) for _, rows, fp64 in fake_gpu.calls}
    assert gpu["model.layers.6.mlp.up_proj"].method in ("gram-fp64", "svd-fp64")


def test_unconverged_engine_results_fall_back_to_the_cpu(fake_gpu, tmp_path):
    path, t = _checkpoint(tmp_path)
    fake_gpu.info_code = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectrum_fast.DegenerateMatrixWarning)
        res = spectrum_fast.scan(path, device="cuda", progress=False)
    assert {fp64 for _, _, fp64 in fake_gpu.calls} == {False, True}  # tried fp32, then fp64
    for r in res.records:
        w = t[r.module + ".weight"]
        if w.any():
            assert rel_err(r.snr, ref_snr(w)) <= 1e-4


def test_gpu_plan_balances_by_cost():
    from spectrum_fast.checkpoint import TensorInfo
    from spectrum_fast.scheduling import plan

    infos = [TensorInfo(f"t{i}", None, 0, 0, "BF16", shape) for i, shape in
             enumerate([(4096, 4096), (4096, 1024), (1024, 1024), (4096, 4096), (14336, 4096)])]
    a, b = plan(infos, 2)
    assert a[0].shape == (14336, 4096)  # largest first
    assert {i.name for i in a} | {i.name for i in b} == {i.name for i in infos}
    assert len(a) + len(b) == 5


def test_gpu_engine_error_is_a_user_error(fake_gpu, tmp_path):
    path, _ = _checkpoint(tmp_path)
    fake_gpu.fail_on = "model.safetensors"
    with pytest.raises(spectrum_fast.SpectrumError, match=r"CUDA engine on GPU 0 failed on model\.layers\..*out of memory"):
        spectrum_fast.scan(path, device="cuda", progress=False)


def test_fp8_with_block_scales_goes_to_the_engine(fake_gpu, tmp_path):
    """DeepSeek-V3 layout on the GPU path: the engine gets the FP8 bytes plus where its 128x128 scales
    are; the SNR matches float64 of the dequantized weights. A scale that fits no layout is skipped."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from .test_checkpoint import _deepseek_fp8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * 0.02 + torch.randn(300, 4, generator=g) @ torch.randn(4, 200, generator=g) * 0.01
    q, scale, deq = _deepseek_fp8(w)
    e5 = torch.randn(64, 32, generator=g).to(torch.float8_e5m2)
    save_file({"model.layers.0.mlp.up_proj.weight": q, "model.layers.0.mlp.up_proj.weight_scale_inv": scale,
               "model.layers.1.mlp.up_proj.weight": e5,
               "model.layers.1.mlp.up_proj.weight_scale_inv": torch.full((64,), 0.25),
               "model.layers.2.mlp.up_proj.weight": w.to(torch.float8_e4m3fn),
               "model.layers.2.mlp.up_proj.weight_scale_inv": torch.ones(3, 3)},  # fits no layout
              str(tmp_path / "model.safetensors"))
    res = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert sorted(rows for _, rows, fp64 in fake_gpu.calls if not fp64) == [64, 300]  # both FP8 on the engine
    assert rel_err(res["model.layers.0.mlp.up_proj"].snr, ref_snr(deq.double().numpy())) <= 1e-4
    assert rel_err(res["model.layers.1.mlp.up_proj"].snr, ref_snr(e5.double().numpy() * 0.25)) <= 1e-4
    assert [s["name"] for s in res.skipped] == ["model.layers.2.mlp.up_proj.weight"]


def test_same_shape_small_matrices_go_through_the_batched_solver(fake_gpu, tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    t = {f"model.layers.{i}.mlp.experts.{e}.w1.weight": rng.standard_normal((96, 64)).astype(np.float32)
         for i in range(2) for e in range(3)}
    t["model.layers.0.self_attn.q_proj.weight"] = rng.standard_normal((64, 64)).astype(np.float32)
    t["model.layers.0.mlp.big.weight"] = rng.standard_normal((600, 300)).astype(np.float32)
    save_np(tmp_path / "model.safetensors", t)
    on = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert fake_gpu.batched_calls == [6]  # on by default: the six 96x64 experts in one call; the single 64x64 not
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "0")
    off = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert fake_gpu.batched_calls == [6]  # 0 turns it off
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "32")
    spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert fake_gpu.batched_calls == [6]  # k = 64 is above 32
    assert on.snr == off.snr
    for r in on.records:
        assert rel_err(r.snr, ref_snr(t[r.module + ".weight"])) <= 1e-4
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "many")
    with pytest.raises(spectrum_fast.SpectrumError, match="SPECTRUM_FAST_BATCHED_MAX_K must be an integer"):
        spectrum_fast.scan(tmp_path, device="cuda", progress=False)


def test_large_matrices_go_straight_to_float64(fake_gpu, tmp_path, monkeypatch):
    """k >= SPECTRUM_FAST_FP64_MIN_K skips the fp32 pass; smaller ones keep it; the SNRs are within the
    contract either way, and the rule depends only on the matrix (same numbers on 1 or 2 devices)."""
    rng = np.random.default_rng(8)
    t = {f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal((512, 256)) * 0.02).astype(np.float32)
         for i in range(4)}
    t.update({f"model.layers.{i}.mlp.down_proj.weight": rng.standard_normal((96, 48)).astype(np.float32)
              for i in range(4)})
    save_np(tmp_path / "model.safetensors", t)
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "0")
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "256")
    res = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    fp32_rows = [rows for _, rows, fp64 in fake_gpu.calls if not fp64]
    fp64_rows = [rows for _, rows, fp64 in fake_gpu.calls if fp64]
    assert 512 not in fp32_rows and fp64_rows.count(512) == 4
    assert fp32_rows.count(96) == 4 and 96 not in fp64_rows
    assert {r.method for r in res.records if "up_proj" in r.module} == {"gram-fp64"}
    assert {r.method for r in res.records if "down_proj" in r.module} == {"gram-fp32"}
    for r in res.records:
        assert rel_err(r.snr, ref_snr(t[r.module + ".weight"])) <= 1e-4, r.module
    two = spectrum_fast.scan(tmp_path, device="cuda", devices=[0, 1], progress=False)
    assert two.snr == res.snr
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "0")  # off: everything tries fp32 first
    fake_gpu.calls = []
    spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert sorted(rows for _, rows, fp64 in fake_gpu.calls if not fp64) == [96] * 4 + [512] * 4
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "big")
    with pytest.raises(spectrum_fast.SpectrumError, match="SPECTRUM_FAST_FP64_MIN_K must be an integer"):
        spectrum_fast.scan(tmp_path, device="cuda", progress=False)


def test_next_chunk_is_read_ahead_while_the_engine_works(fake_gpu, tmp_path, monkeypatch):
    """Each chunk after the first has been read once (page cache) before the engine starts on it; the last
    chunk's read-ahead thread is gone when the scan returns."""
    import threading

    from spectrum_fast import cuda_engine

    rng = np.random.default_rng(2)
    t = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(5)}
    save_np(tmp_path / "model.safetensors", t)
    monkeypatch.setattr(cuda_engine, "_CHUNK_BYTES", 1)  # one matrix per chunk
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "0")  # (a batched unit is never cut)
    warmed: list[str] = []
    real_warm = cuda_engine._warm

    readers: list[int | None] = []

    def spy(infos, stop, threads=None):
        real_warm(infos, stop, threads)
        readers.append(threads)
        warmed.extend(i.name for i in infos)

    started: list[tuple[str, list[str]]] = []
    real_run = FakeEngine.run

    def run(self, tasks, fp64=False, should_stop=None):
        started.append((tasks[0][1], list(warmed)))
        return real_run(self, tasks, fp64, should_stop)

    monkeypatch.setattr(cuda_engine, "_warm", spy)
    monkeypatch.setattr(FakeEngine, "run", run)
    res = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert len(res) == 5 and len(started) == 5
    assert len(warmed) == 4  # every chunk but the first
    assert readers == [cuda_engine.warm_threads()] * 4  # the process's read-ahead threads, taken once
    offsets = [off for off, _ in started]
    assert offsets == sorted(offsets)
    for n_before, (_, seen) in enumerate(started):
        assert len(seen) >= n_before  # chunk n was warmed before the engine started on it
    assert not [th for th in threading.enumerate() if th.name == "spectrum_fast-warm"]


def test_read_ahead_stops_with_a_failing_engine(fake_gpu, tmp_path, monkeypatch):
    import threading

    from spectrum_fast import cuda_engine

    rng = np.random.default_rng(2)
    save_np(tmp_path / "model.safetensors",
            {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(3)})
    monkeypatch.setattr(cuda_engine, "_CHUNK_BYTES", 1)
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "0")
    fake_gpu.fail_on = "model.safetensors"
    with pytest.raises(spectrum_fast.SpectrumError, match="out of memory"):
        spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert not [th for th in threading.enumerate() if th.name == "spectrum_fast-warm"]


def test_warm_reads_scales_and_leaves_missing_files_to_the_engine(tmp_path):
    import threading

    from spectrum_fast import cuda_engine
    from spectrum_fast.checkpoint import TensorInfo

    f = tmp_path / "a.bin"
    f.write_bytes(bytes(range(256)) * 64)
    scale = TensorInfo("w_scale_inv", f, 0, 16, "F32", (4,))
    info = TensorInfo("w", f, 1024, 4096, "F8_E4M3", (64, 64), scale)
    assert cuda_engine._warm([info], threading.Event()) == 4096 + 16  # the matrix and its scale
    gone = TensorInfo("x", tmp_path / "missing.safetensors", 0, 16, "F32", (2, 2))
    assert cuda_engine._warm([gone, info], threading.Event()) == 4096 + 16  # skipped: the engine names it
    short = TensorInfo("y", f, 16000, 4096, "F32", (32, 32))
    assert cuda_engine._warm([short], threading.Event()) == 16384 - 16000  # a truncated file: what is there
    stop = threading.Event()
    stop.set()
    assert cuda_engine._warm([info], stop) == 0  # stopped: returns at once


def test_warm_reads_every_piece_once_with_several_threads(tmp_path, monkeypatch):
    """Pieces of _WARM_PIECE bytes, read by WARM_THREADS threads in file order: every byte of every tensor
    once, nothing past a truncated file's end, and the same total as one thread."""
    import threading

    from spectrum_fast import cuda_engine
    from spectrum_fast.checkpoint import TensorInfo

    f = tmp_path / "a.bin"
    f.write_bytes(bytes(range(256)) * 400)  # 102400 bytes
    monkeypatch.setattr(cuda_engine, "_WARM_PIECE", 1000)
    reads: list[tuple[int, int]] = []
    real = cuda_engine.os.preadv
    lock = threading.Lock()

    def spy(fd, bufs, offset):
        n = real(fd, bufs, offset)
        with lock:
            reads.append((offset, n))
        return n

    monkeypatch.setattr(cuda_engine.os, "preadv", spy)
    infos = [TensorInfo("a", f, 100, 50_000, "F32", (100, 125)), TensorInfo("b", f, 60_000, 50_000, "F32", (100, 125))]
    assert cuda_engine._warm(infos, threading.Event(), threads=3) == 50_000 + (102_400 - 60_000)
    spans = sorted(reads)
    covered = [(o, o + n) for o, n in spans if n > 0]
    assert covered[0][0] == 100 and covered[-1][1] == 102_400
    from itertools import pairwise

    assert all(a[1] <= b[0] for a, b in pairwise(covered))  # no byte twice
    assert sum(b - a for a, b in covered) == 50_000 + 42_400
    reads.clear()
    assert cuda_engine._warm(infos, threading.Event(), threads=1) == 92_400


@pytest.mark.parametrize("mode", MODES)
def test_twostage_float64_pass(fake_gpu, tmp_path, monkeypatch, mode):
    """SPECTRUM_FAST_TWOSTAGE=cpu|gpu: the float64 pass of F32/F16/BF16 matrices goes through the two-stage
    solver (run here on the CPU's torch; "gpu"'s band solver on host threads), not the engine; zero and
    non-finite matrices still reach the CPU engine."""
    pytest.importorskip("torch")
    from spectrum_fast import cuda_engine

    rng = np.random.default_rng(6)
    t = {f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal((300, 120)) * 0.02 + (i + 1) * 0.01 *
                                                   np.outer(rng.standard_normal(300), rng.standard_normal(120))
                                                   ).astype(np.float32) for i in range(3)}
    t["model.layers.3.mlp.up_proj.weight"] = np.zeros((300, 120), np.float32)
    t["model.layers.4.mlp.up_proj.weight"] = np.full((300, 120), np.nan, np.float32)
    t["model.layers.0.mlp.down_proj.weight"] = rng.standard_normal((40, 30)).astype(np.float32)  # k < 64: fp32
    save_np(tmp_path / "model.safetensors", t)
    monkeypatch.setattr(cuda_engine, "_TORCH_DEVICE", "cpu")
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "64")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", mode)
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE_THREADS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectrum_fast.DegenerateMatrixWarning)
        res = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert not [c for c in fake_gpu.calls if c[2]]  # the engine ran no float64 pass
    by = {r.module: r for r in res.records}
    for i in range(3):
        r = by[f"model.layers.{i}.mlp.up_proj"]
        assert r.method == "gram-fp64"
        assert rel_err(r.snr, ref_snr(t[r.module + ".weight"])) <= 1e-4
    assert by["model.layers.3.mlp.up_proj"].status == "zero"
    assert by["model.layers.4.mlp.up_proj"].status == "nonfinite"
    assert by["model.layers.0.mlp.down_proj"].method == "gram-fp32"


@needs_bands
@pytest.mark.parametrize("chase", ["0", "7"])
def test_gpu_twostage_on_real_weights_matches_the_cpu_engine(fake_gpu, minilm_file, tmp_path, monkeypatch, chase):
    """Real MiniLM weights through the GPU two-stage route (its torch stage 1 and native band solver, on the
    CPU here), every matrix in the float64 pass, each chase variant: the float64 SVD reference's SNRs to
    1e-9, and its selections."""
    pytest.importorskip("torch")
    import shutil

    from safetensors.numpy import load_file

    from spectrum_fast import cuda_engine

    shutil.copy(minilm_file, tmp_path / "model.safetensors")
    weights = load_file(minilm_file)
    monkeypatch.setattr(cuda_engine, "_TORCH_DEVICE", "cpu")
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "256")
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "0")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "gpu")
    monkeypatch.setenv("SPECTRUM_FAST_CHASE", chase)
    res = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert not [c for c in fake_gpu.calls if c[2]]  # the engine ran no float64 pass: the two-stage route did
    assert len(res.records) == 36
    ref = {}
    for r in res.records:
        assert r.method == "gram-fp64"
        ref[r.module] = ref_snr(weights[r.module + ".weight"].astype(np.float64))
        assert rel_err(r.snr, ref[r.module]) <= 1e-9, (r.module, r.snr, ref[r.module])
    types = {r.module: r.type for r in res.records}
    for top in (0.25, 0.5):
        assert set(res.select(top).modules) == ref_select(ref, types, top)


def test_twostage_settings_are_checked(fake_gpu, tmp_path, monkeypatch):
    from spectrum_fast import cuda_engine

    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "0")
    assert (cuda_engine.twostage_mode(), cuda_engine.twostage_threads()) == ("off", 0)
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE_THREADS", "3")
    for flag, mode in [("1", "gpu"), ("GPU", "gpu"), ("on", "gpu")]:
        monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", flag)
        assert (cuda_engine.twostage_mode(), cuda_engine.twostage_threads()) == (mode, 0)  # no CPU threads
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "cpu")
    assert (cuda_engine.twostage_mode(), cuda_engine.twostage_threads()) == ("cpu", 3)
    from spectrum_fast import twostage

    monkeypatch.delenv("SPECTRUM_FAST_CHASE", raising=False)
    assert cuda_engine.chase_variant() == twostage.CHASE_VARIANT
    for flag, variant in [(" 0", 0), ("2", 2), ("", twostage.CHASE_VARIANT)]:
        monkeypatch.setenv("SPECTRUM_FAST_CHASE", flag)
        assert cuda_engine.chase_variant() == variant
    for flag in ("8", "-1", "fast"):
        monkeypatch.setenv("SPECTRUM_FAST_CHASE", flag)
        with pytest.raises(spectrum_fast.SpectrumError, match="SPECTRUM_FAST_CHASE must be one of 0, 1, 2, 3, 4, 5, 6, 7"):
            cuda_engine.chase_variant()
    monkeypatch.delenv("SPECTRUM_FAST_CHASE")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE_THREADS", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cuda_engine.twostage_threads() == max(1, len(__import__("os").sched_getaffinity(0)) // 2)
    import importlib.util

    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else object())
        with pytest.raises(spectrum_fast.SpectrumError, match="needs PyTorch"):
            cuda_engine.twostage_mode()
    save_np(tmp_path / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": np.ones((4, 4), np.float32)})
    for name, value, match in [("SPECTRUM_FAST_TWOSTAGE", "maybe", "must be 0, gpu or cpu"),
                               ("SPECTRUM_FAST_TWOSTAGE_THREADS", "x", "must be an integer")]:
        monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "cpu")
        monkeypatch.setenv(name, value)
        with pytest.raises(spectrum_fast.SpectrumError, match=match):
            spectrum_fast.scan(tmp_path, device="cuda", progress=False)
        monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE_THREADS", "1")


@pytest.mark.parametrize("mode", MODES)
def test_twostage_failure_is_a_user_error_naming_the_tensor(fake_gpu, tmp_path, monkeypatch, mode):
    pytest.importorskip("torch")
    from spectrum_fast import cuda_engine, twostage

    def oom(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    save_np(tmp_path / "model.safetensors",
            {"model.layers.0.mlp.up_proj.weight": np.random.default_rng(1).standard_normal((200, 100)).astype(np.float32)})
    monkeypatch.setattr(cuda_engine, "_TORCH_DEVICE", "cpu")
    if mode == "cpu":
        monkeypatch.setattr(twostage, "submit", oom)
    else:
        monkeypatch.setattr(twostage.DeviceBands, "run", oom)
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "64")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", mode)
    with pytest.raises(spectrum_fast.SpectrumError,
                       match=r"two-stage eigensolver on cpu failed on model\.layers\.0\.mlp\.up_proj\.weight .*out of memory"):
        spectrum_fast.scan(tmp_path, device="cuda", progress=False)


def test_twostage_failure_names_the_failing_group_not_the_first_tensors(fake_gpu, tmp_path, monkeypatch):
    """With several stage-1 groups, the error names the group whose stage 1 failed; a band-solver launch
    that fails later (a GPU kernel's fault surfaces when its event is waited for) names its own matrices."""
    pytest.importorskip("torch")
    from spectrum_fast import cuda_engine, twostage

    rng = np.random.default_rng(2)
    # a shape each: a stage-1 group each
    save_np(tmp_path / "model.safetensors", {f"model.layers.{i}.mlp.up_proj.weight":
                                             rng.standard_normal((200 + 10 * i, 100)).astype(np.float32)
                                             for i in range(5)})
    monkeypatch.setattr(cuda_engine, "_TORCH_DEVICE", "cpu")
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "64")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "gpu")
    run = twostage.DeviceBands.run

    def fails_on_layer_3(self, keys, a):
        if any(".layers.3." in info.name for info, _ in keys):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        run(self, keys, a)

    with monkeypatch.context() as m:
        m.setattr(twostage.DeviceBands, "run", fails_on_layer_3)
        with pytest.raises(spectrum_fast.SpectrumError) as e:
            spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert re.search(r"failed on model\.layers\.3\.mlp\.up_proj\.weight \(.*out of memory", str(e.value)), str(e.value)
    assert "layers.0" not in str(e.value) and "layers.4" not in str(e.value)

    finished = twostage.DeviceBands.finished

    def launch_faults(self, wait=False):
        done = finished(self, wait)
        late = [key for key, _ in done if ".layers.2." in key[0].name]
        if late:
            raise twostage.LaunchError(late, RuntimeError("CUDA error: an illegal memory access was encountered"))
        return done

    monkeypatch.setattr(twostage.DeviceBands, "finished", launch_faults)
    with pytest.raises(spectrum_fast.SpectrumError, match=r"failed on model\.layers\.2\.mlp\.up_proj\.weight \(.*"
                                                          r"band solver launch of 1 matrices: .*illegal memory access"):
        spectrum_fast.scan(tmp_path, device="cuda", progress=False)


def test_twostage_band_that_does_not_converge_goes_to_the_cpu(fake_gpu, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from spectrum_fast import cuda_engine, twostage

    def fails(band):
        raise np.linalg.LinAlgError("dsbevd failed (info 3)")

    w = np.random.default_rng(4).standard_normal((200, 100)).astype(np.float32)
    save_np(tmp_path / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": w})
    monkeypatch.setattr(cuda_engine, "_TORCH_DEVICE", "cpu")
    monkeypatch.setattr(twostage, "band_eigenvalues", fails)
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "64")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "cpu")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE_THREADS", "2")
    on_cpu = []
    real = cuda_engine.matrix_stats
    monkeypatch.setattr(cuda_engine, "matrix_stats", lambda m: on_cpu.append(m.shape) or real(m))
    r = spectrum_fast.scan(tmp_path, device="cuda", progress=False).records[0]
    assert on_cpu == [(200, 100)]  # the CPU engine computed it
    assert rel_err(r.snr, ref_snr(w)) <= 1e-4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_twostage_widens_half_precision_on_the_device(fake_gpu, tmp_path, monkeypatch, dtype, mode):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from spectrum_fast import cuda_engine

    g = torch.Generator().manual_seed(5)
    w = (torch.randn(260, 130, generator=g) * 0.02 + 0.01 * torch.randn(260, 2, generator=g) @ torch.randn(2, 130, generator=g))
    stored = w.to(getattr(torch, dtype))
    save_file({"model.layers.0.mlp.up_proj.weight": stored}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(cuda_engine, "_TORCH_DEVICE", "cpu")
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "64")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", mode)
    r = spectrum_fast.scan(tmp_path, device="cuda", progress=False).records[0]
    assert r.method == "gram-fp64" and not [c for c in fake_gpu.calls if c[2]]
    assert rel_err(r.snr, ref_snr(stored.double().numpy())) <= 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_twostage_on_adversarial_matrices(fake_gpu, tmp_path, monkeypatch, mode):
    """Every adversarial matrix of the GPU parity test (rank-deficient, duplicated rows, 16384x16, 1x300,
    1e-30 scale, spiked) through the two-stage route, run on the CPU's torch."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from spectrum_fast import cuda_engine

    from .conftest import adversarial, assert_snr_matches

    tensors = {f"model.layers.{i}.mlp.{name}.weight": torch.from_numpy(w).to(torch.bfloat16)
               for i, (name, w) in enumerate(adversarial())}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(cuda_engine, "_TORCH_DEVICE", "cpu")
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "1")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectrum_fast.DegenerateMatrixWarning)
        res = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert not [c for c in fake_gpu.calls if c[2]] and len(res) == len(tensors)
    for r in res.records:
        assert_snr_matches(r.snr, tensors[r.module + ".weight"].double().numpy(), what=(r.module, r.method))


def test_gpu_guard_widens_the_error_model_by_what_cusolver_measured():
    """The engine's fp32 errors reached 1.72x the CPU-fitted model on an H100: a matrix the CPU guard would
    accept with a singular value that close to tau (or that sensitive) is refused on the GPU."""
    from spectrum_fast.checkpoint import TensorInfo
    from spectrum_fast.cpu_engine import stats_from_gram
    from spectrum_fast.cuda_engine import _EPS32, GPU_ERROR_SCALE, _judge

    assert GPU_ERROR_SCALE >= 1.72 * 3  # the measured worst case, with a margin like the CPU's (0.29 of the model)
    rng = np.random.default_rng(11)
    found = 0
    for seed in range(200):
        m, n = 240, 120
        w = rng.standard_normal((m, n)) + 3 * np.outer(rng.standard_normal(m), rng.standard_normal(n)) / np.sqrt(n)
        lam = np.linalg.eigvalsh(w.T @ w)
        info = TensorInfo(f"model.layers.{seed}.mlp.w.weight", Path("unused"), 0, 0, "F32", (m, n))
        cpu = stats_from_gram(lam, float(lam.sum()), _EPS32, m, n)
        gpu = _judge(info, lam, float(np.abs(w).max()), 0, _EPS32)
        wide = stats_from_gram(lam, float(lam.sum()), _EPS32 * GPU_ERROR_SCALE, m, n)
        assert (gpu is None) == (wide is None)
        if gpu is not None:
            assert cpu is not None and gpu.stats == cpu  # whatever the GPU accepts, the CPU accepts, same numbers
        elif cpu is not None:
            found += 1
    assert found > 0  # the widening changed the verdict somewhere: it is not a no-op


def test_batched_units_make_resumed_and_multi_gpu_scans_bit_identical(fake_gpu, tmp_path, monkeypatch):
    """cusolverDnXsyevBatched's last bits depend on which matrices share the call (7e-7 relative on an
    H100). Here the stand-in's do too; a scan resumed from a journal that holds half a unit, and a scan on
    two GPUs, still give bit for bit the uninterrupted one-GPU result, because the calls are fixed up front."""
    import json

    def composed(self, tasks, fp64=False, batch=64, should_stop=None):
        out = _fake_run_batched(self, tasks, fp64, batch, should_stop)
        tilt = 1 + 1e-9 * (1 + sum(t[1] for t in tasks) % 997)  # a function of the whole batch
        return [(lam * tilt, amax, code) for lam, amax, code in out]

    monkeypatch.setattr(FakeEngine, "run_batched", composed)
    rng = np.random.default_rng(6)
    t = {f"model.layers.{i}.mlp.experts.{e}.w1.weight": rng.standard_normal((96, 64)).astype(np.float32)
         for i in range(3) for e in range(3)}
    t["model.layers.0.mlp.big.weight"] = rng.standard_normal((600, 300)).astype(np.float32)
    save_np(tmp_path / "model.safetensors", t)
    journal = tmp_path / "scan.journal"
    whole = spectrum_fast.scan(tmp_path, device="cuda", progress=False, journal=journal)
    assert fake_gpu.batched_calls == [9]
    from spectrum_fast import scanner

    class Bar:
        def __init__(self, total, n, enabled):
            self.total, self.n = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, nbytes):
            self.n += nbytes

        def set_postfix_str(self, *args, **kwargs):
            pass

    bars: list[Bar] = []
    monkeypatch.setattr(scanner, "_progress", Bar)
    lines = journal.read_bytes().split(b"\n")
    experts = [ln for ln in lines[1:] if b"experts" in ln]
    journal.write_bytes(b"\n".join([lines[0], *experts[:4]]) + b"\n")  # killed after 4 of the unit's 9
    fake_gpu.batched_calls = []
    resumed = spectrum_fast.scan(tmp_path, device="cuda", progress=False, journal=journal)
    assert fake_gpu.batched_calls == [9]  # the unit again, whole
    assert resumed.snr == whole.snr
    assert bars[-1].n == bars[-1].total  # the progress bar ends full, the recomputed 4 counted once
    assert journal.read_bytes().count(b"\n") == 1 + len(t)  # the 4 kept records were not journaled twice
    assert len({json.loads(ln)["module"] for ln in journal.read_bytes().split(b"\n")[1:] if ln}) == len(t)
    assert spectrum_fast.scan(tmp_path, device="cuda", devices=[0, 1], progress=False).snr == whole.snr
    for r in whole.records:
        assert rel_err(r.snr, ref_snr(t[r.module + ".weight"])) <= 1e-4


def test_batch_units_are_fixed_per_file_shape_and_size():
    from spectrum_fast.checkpoint import TensorInfo
    from spectrum_fast.scheduling import batch_units, group_units, plan

    def info(name, shape, file="a"):
        return TensorInfo(name, Path(file), 0, 4 * shape[0] * shape[1], "F32", shape)

    infos = [info(f"e{i}", (96, 64)) for i in range(5)] + [info("big", (900, 800)), info("q", (64, 64)),
                                                           info("f0", (96, 64), "b"), info("f1", (96, 64), "b")]
    units = batch_units(infos, 512, 2)
    assert units == {"e0": 0, "e1": 0, "e2": 1, "e3": 1, "f0": 2, "f1": 2}  # e4 left alone; files apart
    assert batch_units(infos, 0, 2) == {} and batch_units(infos, 63, 2) == {}
    assert [[i.name for i in g] for g in group_units(infos[::-1], units)] == [
        ["f1", "f0"], ["q"], ["big"], ["e4"], ["e3", "e2"], ["e1", "e0"]]
    for share in plan(infos, 3, units):
        names = [i.name for i in share]
        for a, b in (("e0", "e1"), ("e2", "e3"), ("f0", "f1")):
            assert (a in names) == (b in names)  # a unit goes whole to one worker


def test_fp32_failures_in_a_unit_retry_by_a_rule_that_depends_on_the_unit_alone(fake_gpu, tmp_path, monkeypatch):
    """A unit where most matrices fail the fp32 guard goes to float64 whole, batched; one where few fail
    retries those one at a time. Either way the numbers meet the contract."""
    rng = np.random.default_rng(12)

    def low_rank(m, n, r):  # its small singular values are roundoff: fp32 cannot vouch for them
        return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n))).astype(np.float32)

    t = {f"model.layers.{i}.mlp.experts.{e}.w1.weight": low_rank(96, 64, 8) for i in range(2) for e in range(3)}
    t.update({f"model.layers.{i}.mlp.experts.{e}.w2.weight": (low_rank(80, 48, 6) if e == 0 else
                                                              rng.standard_normal((80, 48)).astype(np.float32))
              for i in range(2) for e in range(3)})
    save_np(tmp_path / "model.safetensors", t)
    res = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    batched64 = [(rows, fp64) for _, rows, fp64 in fake_gpu.calls if fp64]
    assert batched64.count((96, True)) == 6  # w1: all six failed -> the unit again, whole
    assert batched64.count((80, True)) == 2  # w2: two of six failed -> just those two
    assert sorted(fake_gpu.batched_calls) == [6, 6, 6]  # fp32 w1, fp32 w2, float64 w1
    assert {r.method for r in res.records if ".w1" in r.module} <= {"gram-fp64", "svd-fp64"}
    for r in res.records:
        assert rel_err(r.snr, ref_snr(t[r.module + ".weight"])) <= 1e-4, r.module


def test_every_rank_deals_alike_whatever_its_backend(fake_gpu, tmp_path, monkeypatch):
    """torchrun ranks deal matrices out without talking: a rank on the CPU and one on a GPU must make the
    same deal (by the same batched units), or matrices are scanned twice or never."""
    from spectrum_fast import distributed

    rng = np.random.default_rng(13)
    t = {f"model.layers.{i}.mlp.experts.{e}.w1.weight": rng.standard_normal((96, 64)).astype(np.float32)
         for i in range(4) for e in range(4)}
    t.update({f"model.layers.{i}.self_attn.o_proj.weight": rng.standard_normal((200, 150)).astype(np.float32)
              for i in range(4)})
    save_np(tmp_path / "model.safetensors", t)
    monkeypatch.setattr(distributed, "exchange", lambda ctx, records, error: records)
    shares = []
    for rank, device in ((0, "cpu"), (1, "cuda")):
        monkeypatch.setattr(distributed, "context", lambda rank=rank: distributed.Context(rank, 2, None))
        shares.append({r.module for r in spectrum_fast.scan(tmp_path, device=device, progress=False).records})
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {n[: -len(".weight")] for n in t}


def test_journal_from_another_engine_or_gpu_setting_starts_over(fake_gpu, tmp_path, monkeypatch, capsys):
    """Bit-identical resumes need the same engine and settings: a CPU scan's journal, or one written under
    another SPECTRUM_FAST_BATCHED_MAX_K, is not mixed into a GPU scan."""
    rng = np.random.default_rng(14)
    t = {f"model.layers.{i}.mlp.experts.{e}.w1.weight": rng.standard_normal((96, 64)).astype(np.float32)
         for i in range(2) for e in range(2)}
    save_np(tmp_path / "model.safetensors", t)
    journal = tmp_path / "scan.journal"
    spectrum_fast.scan(tmp_path, device="cpu", progress=False, journal=journal)
    capsys.readouterr()
    spectrum_fast.scan(tmp_path, device="cuda", progress=True, journal=journal)
    assert "starting over" in capsys.readouterr().err and len(fake_gpu.calls) == 4
    fake_gpu.calls = []
    spectrum_fast.scan(tmp_path, device="cuda", progress=True, journal=journal)
    assert "starting over" not in capsys.readouterr().err and fake_gpu.calls == []  # same settings: resumed
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "0")
    spectrum_fast.scan(tmp_path, device="cuda", progress=True, journal=journal)
    assert "starting over" in capsys.readouterr().err and len(fake_gpu.calls) == 4


@needs_bands
def test_gpu_twostage_batches_are_units_so_resumed_and_multi_gpu_scans_are_bit_identical(fake_gpu, tmp_path,
                                                                                         monkeypatch):
    """SPECTRUM_FAST_TWOSTAGE=gpu reduces same-shape matrices that go straight to float64 in stage-1 batches
    (:func:`cuda_engine.band_batch` per unit). Here the solver's results depend on the batch (a tilt that is
    a function of the whole batch, as a batched GEMM's last bits may be): a scan resumed from half a batch
    and a two-GPU scan must still give the uninterrupted scan's numbers bit for bit."""
    pytest.importorskip("torch")
    from spectrum_fast import cuda_engine, twostage

    batches: list[int] = []
    variants: set[int] = set()
    real_run = twostage.DeviceBands.run

    def tilted(self, keys, a):
        batches.append(len(keys))
        variants.add(self.variant)
        tilt = 1 + 1e-9 * (1 + int(a.sum().item() * 1e6) % 997)
        real_run(self, keys, a * tilt)

    monkeypatch.setattr(twostage.DeviceBands, "run", tilted)
    monkeypatch.setattr(cuda_engine, "_TORCH_DEVICE", "cpu")
    monkeypatch.setattr(cuda_engine, "BAND_BATCH_BYTES", 16 * 70 * 70 * 4)  # 4 per batch at k = 70
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "64")
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "0")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "gpu")
    rng = np.random.default_rng(9)
    t = {f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal((150, 70)) * 0.02 + 0.05 *
                                                   np.outer(rng.standard_normal(150), rng.standard_normal(70))
                                                   ).astype(np.float32) for i in range(6)}
    t["model.layers.0.mlp.down_proj.weight"] = rng.standard_normal((70, 90)).astype(np.float32)  # alone
    save_np(tmp_path / "model.safetensors", t)
    from spectrum_fast.checkpoint import open_checkpoint

    infos = sorted(open_checkpoint(tmp_path).tensors.values(), key=lambda i: i.offset)
    units = cuda_engine.scan_units(infos)
    ups = sorted(n for n in units if "up_proj" in n)
    assert len(ups) == 6 and len({units[n] for n in ups}) == 2  # 4 + 2, in file order; down_proj alone
    journal = tmp_path / "scan.journal"
    whole = spectrum_fast.scan(tmp_path, device="cuda", progress=False, journal=journal)
    assert sorted(batches) == [1, 2, 4]
    assert all(r.method == "gram-fp64" for r in whole.records)
    lines = journal.read_bytes().split(b"\n")
    ups_done = [ln for ln in lines[1:] if b"up_proj" in ln]
    journal.write_bytes(b"\n".join([lines[0], *ups_done[:1]]) + b"\n")  # killed after 1 of a batch
    batches.clear()
    resumed = spectrum_fast.scan(tmp_path, device="cuda", progress=False, journal=journal)
    assert resumed.snr == whole.snr
    assert sorted(batches) in ([1, 2, 4], [2, 4], [1, 4], [4])  # its batch again, whole
    assert spectrum_fast.scan(tmp_path, device="cuda", devices=[0, 1], progress=False).snr == whole.snr
    for r in whole.records:
        assert rel_err(r.snr, ref_snr(t[r.module + ".weight"])) <= 1e-4
    # the chase variant fixes the last bits too: the journal records it, and another one starts over
    import json

    assert variants == {twostage.CHASE_VARIANT}
    engine = json.loads(journal.read_text().split("\n")[0])["engine"]
    assert engine["chase"] == twostage.CHASE_VARIANT and engine["revision"] == cuda_engine.SOLVER_REVISION
    monkeypatch.setenv("SPECTRUM_FAST_CHASE", "0")
    batches.clear()
    variants.clear()
    other = spectrum_fast.scan(tmp_path, device="cuda", progress=False, journal=journal)
    assert variants == {0} and sorted(batches) == [1, 2, 4]  # everything again
    assert json.loads(journal.read_text().split("\n")[0])["engine"]["chase"] == 0
    for a, b in zip(other.records, whole.records):
        assert a.module == b.module and rel_err(a.snr, b.snr) <= 1e-9


def test_band_units_follow_the_settings(fake_gpu, monkeypatch):
    from spectrum_fast import cuda_engine
    from spectrum_fast.checkpoint import TensorInfo

    def info(name, shape, dtype="BF16"):
        return TensorInfo(name, Path("a"), 0, 2 * shape[0] * shape[1], dtype, shape)

    infos = [info(f"q{i}", (4096, 4096)) for i in range(20)] + [info("kv", (1024, 4096)), info("x", (8192, 8192)),
                                                                 info("y", (8192, 8192)), info("f8", (4096, 4096), "F8_E4M3")]
    monkeypatch.delenv("SPECTRUM_FAST_FP64_MIN_K", raising=False)
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "0")
    assert cuda_engine.scan_units(infos) == {}  # nothing batched: k > 2048, two-stage off
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", "gpu")
    units = cuda_engine.scan_units(infos)
    assert cuda_engine.band_batch(4096) == 16 and cuda_engine.band_batch(8192) == 4
    assert cuda_engine.band_batch(16384) == 1 and cuda_engine.band_batch(100) == 32
    q = [units[f"q{i}"] for i in range(20)]
    assert q[:16] == [q[0]] * 16 and q[16:] == [q[16]] * 4 and q[0] != q[16]
    assert units["x"] == units["y"] and "kv" not in units and "f8" not in units  # k < 4096; FP8 not two-stage
    # a batched solver allowed up to k = 8192 still gets none of them: its units of 64 would be one stage-1
    # batch of 20 Gram matrices (2.5 GiB at k = 4096; 32 GiB for 64 at 8192), past BAND_BATCH_BYTES
    monkeypatch.setenv("SPECTRUM_FAST_BATCHED_MAX_K", "8192")
    assert cuda_engine.scan_units(infos) == units
    monkeypatch.delenv("SPECTRUM_FAST_BATCHED_MAX_K")
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "0")
    assert cuda_engine.scan_units(infos) == {}  # nothing goes straight to float64


@pytest.mark.parametrize("shape", [(1500, 1100), (1100, 1500), (700, 513), (300, 200), (1024, 1024)])
def test_gram_is_the_float64_product_symmetric_to_the_bit(shape):
    """The two-stage route's Gram matrix (a symmetric split: lower blocks computed, upper ones mirrored) is
    x^T x to float64 rounding on either side of a wide, tall, odd or square matrix, and exactly symmetric;
    written into a batch it is the same to rounding; its products do 9/16 of a full one's flops at 3 levels."""
    torch = pytest.importorskip("torch")
    from spectrum_fast import cuda_engine

    w = torch.from_numpy(np.random.default_rng(sum(shape)).standard_normal(shape))
    x = w.numpy() if shape[0] >= shape[1] else w.numpy().T
    want = x.T @ x
    got = cuda_engine._gram(w)
    assert got.shape == want.shape and torch.equal(got, got.T)
    assert np.abs(got.numpy() - want).max() <= 1e-13 * np.abs(want).max()
    batch = torch.full((2, *want.shape), np.nan, dtype=torch.float64)
    cuda_engine._gram(w, out=batch[1])
    assert np.abs(batch[1].numpy() - want).max() <= 1e-13 * np.abs(want).max() and torch.isnan(batch[0]).all()
    rows, k = max(shape), min(shape)
    assert cuda_engine.gram_flops(rows, k, 0) == 2 * rows * k * k
    assert cuda_engine.gram_flops(14336, 4096) == 2 * 14336 * 4096**2 * 9 // 16


def test_read_ahead_keeps_order_names_a_bad_file_and_stops_when_closed(tmp_path):
    from spectrum_fast import cuda_engine
    from spectrum_fast.checkpoint import TensorInfo
    from spectrum_fast.errors import SpectrumError

    data = np.arange(40, dtype=np.float32)
    f = tmp_path / "a.bin"
    f.write_bytes(data.tobytes())
    infos = [TensorInfo(f"t{i}", f, 16 * i, 16, "F32", (2, 2)) for i in range(10)]
    got = [(i.name, raw.tolist()) for i, raw in cuda_engine._read_ahead(infos, depth=3)]
    assert got == [(f"t{i}", data[4 * i:4 * i + 4].tolist()) for i in range(10)]
    short = [*infos[:2], TensorInfo("gone", tmp_path / "missing.bin", 0, 16, "F32", (2, 2)), *infos[2:]]
    reads = cuda_engine._read_ahead(short, depth=2)
    assert [next(reads)[0].name for _ in range(2)] == ["t0", "t1"]
    with pytest.raises(SpectrumError, match="missing.bin"):
        next(reads)
    reads = cuda_engine._read_ahead(infos, depth=2)
    next(reads)
    reads.close()  # what an error or Ctrl-C in the consumer does: returns without reading the rest


def test_read_stored_into_a_buffer_is_the_plain_read(tmp_path):
    """The pinned-memory read path (a buffer the caller owns) gives the plain read's words, and a
    truncated file is the same one-line error naming the tensor."""
    from spectrum_fast.checkpoint import CheckpointError, TensorInfo, read_stored

    rng = np.random.default_rng(3)
    data = rng.standard_normal(300).astype(np.float32)
    f = tmp_path / "a.bin"
    f.write_bytes(b"\0" * 12 + data.tobytes())
    for dtype, count in (("F32", 300), ("BF16", 600), ("F16", 600)):
        info = TensorInfo("t", f, 12, 1200, dtype, (count // 10, 10))
        buf = np.empty(1200, np.uint8)
        got = read_stored(info, out=buf)
        assert got.tobytes() == read_stored(info).tobytes() and got.dtype == read_stored(info).dtype
        assert np.shares_memory(got, buf)
    short = TensorInfo("t", f, 12, 1600, "F32", (40, 10))
    with pytest.raises(CheckpointError, match="'t' is truncated"):
        read_stored(short, out=np.empty(1600, np.uint8))


def test_syevd_algorithm_setting(fake_gpu, tmp_path, monkeypatch):
    """SPECTRUM_FAST_SYEVD_ALG reaches every engine (ALG or ALG:MIN_K), is recorded in the journal, is refused
    where cuSOLVER is older than 12.3.4, and a bad value is an error naming the variable."""
    from spectrum_fast.errors import SpectrumError

    path, _ = _checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectrum_fast.DegenerateMatrixWarning)
        spectrum_fast.scan(path, device="cuda", progress=False)
        assert FakeEngine.syevd == [(0, 0, 0)]  # the default: cuSOLVER's own choice, no option set
        monkeypatch.setenv("SPECTRUM_FAST_SYEVD_ALG", "2:4096")
        FakeEngine.syevd = []
        journal = tmp_path / "j"
        spectrum_fast.scan(path, device="cuda", devices=[0, 1], progress=False, journal=journal)
        assert sorted(FakeEngine.syevd) == [(0, 2, 4096), (1, 2, 4096)]
        assert json.loads(journal.read_text().split("\n")[0])["engine"]["syevd_alg"] == [2, 4096]
        monkeypatch.setenv("SPECTRUM_FAST_SYEVD_ALG", "1")
        assert cuda_engine.syevd_algorithm() == (1, 0)
        for bad in ("3", "two", "2:-1", "2:x"):
            monkeypatch.setenv("SPECTRUM_FAST_SYEVD_ALG", bad)
            with pytest.raises(SpectrumError, match="SPECTRUM_FAST_SYEVD_ALG must be 0, 1 or 2"):
                spectrum_fast.scan(path, device="cuda", progress=False)
        monkeypatch.setenv("SPECTRUM_FAST_SYEVD_ALG", "2")
        monkeypatch.setattr(spectrum_fast._C, "cusolver_version", lambda: 12004)
        FakeEngine.syevd = []
        with pytest.raises(SpectrumError, match=r"needs cuSOLVER 12.3.4 .* this one is 12004"):
            spectrum_fast.scan(path, device="cuda", progress=False)
        assert FakeEngine.syevd == []  # refused before any engine started


def test_a_gpu_that_is_not_there_is_refused_by_name(fake_gpu, tmp_path):
    _checkpoint(tmp_path)
    with pytest.raises(spectrum_fast.SpectrumError, match=r"there is no GPU 2: 2 visible \(CUDA_VISIBLE_DEVICES="):
        spectrum_fast.scan(tmp_path, device="cuda", devices=[0, 2], progress=False)
    assert fake_gpu.calls == []  # nothing ran


def test_a_torchrun_rank_without_a_gpu_fails_every_rank_with_its_error(fake_gpu, tmp_path, monkeypatch):
    """torchrun --nproc_per_node 4 on a machine with 2 GPUs: rank 2's LOCAL_RANK names no GPU; the error goes
    through the exchange of records (here: raised as every rank would raise it) instead of a rank dying alone."""
    from spectrum_fast import distributed

    _checkpoint(tmp_path)
    exchanged = []

    def exchange(ctx, records, error):
        exchanged.append(error)
        if error is not None:
            raise spectrum_fast.SpectrumError(f"rank {ctx.rank} of {ctx.world} failed: {error}")
        return records

    monkeypatch.setattr(distributed, "context", lambda: distributed.Context(2, 4, None))
    monkeypatch.setattr(distributed, "exchange", exchange)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(spectrum_fast.SpectrumError, match=r"rank 2 of 4 failed: torchrun rank 2 \(LOCAL_RANK 2\) has "
                       r"no GPU of its own: 2 visible on this machine; start at most 2 ranks per machine"):
        spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert len(exchanged) == 1 and fake_gpu.calls == []
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank with a GPU of its own scans its share on it
    monkeypatch.setattr(distributed, "context", lambda: distributed.Context(1, 4, None))
    res = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert exchanged[-1] is None and len(res.records) > 0 and {c[0] for c in fake_gpu.calls} == {1}

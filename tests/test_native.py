"""The native CUDA engine: built where nvcc is, imports and validates arguments without a GPU; with a GPU,
matches the float64 reference (those cases skip on CPU-only machines)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import spectrum_fast
from spectrum_fast.backends import cuda_unavailable_reason, native_extension

from .conftest import adversarial as _adversarial
from .conftest import assert_snr_matches, banded, ref_snr, rel_err, save_np, to_band

_C = native_extension()
needs_ext = pytest.mark.skipif(_C is None, reason="spectrum_fast._C was not built (no nvcc / cuSOLVER here)")
needs_gpu = pytest.mark.skipif(_C is None or cuda_unavailable_reason() is not None,
                               reason=f"no usable GPU: {cuda_unavailable_reason()}")


def _cusolver_headers() -> bool:
    import sysconfig
    from pathlib import Path

    return (Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13" / "include" / "cusolverDn.h").is_file()


@pytest.mark.skipif(not (shutil.which("nvcc") and _cusolver_headers()),
                    reason="no nvcc or no cuSOLVER headers: the extension is optional here")
def test_extension_is_built_where_it_can_be():
    assert _C is not None, "nvcc and cuSOLVER are present, so `pip install` must have built spectrum_fast._C"


@needs_ext
@pytest.mark.parametrize("task,match", [
    (("m.safetensors", 0, 8, "I8", 2, 4), "unsupported dtype 'I8'"),
    (("m.safetensors", 0, 9, "BF16", 2, 2), "nbytes 9 != rows \\* cols \\* 2"),
    (("m.safetensors", -1, 8, "BF16", 2, 2), "negative offset"),
    (("m.safetensors", 0, 0, "F32", 0, 2), "rows and cols must be positive"),
    (("m.safetensors", 0, 9, "F8_E4M3", 2, 4), "nbytes 9 != rows \\* cols \\* 1"),
    (("m.safetensors", 0, 16, "F32", 2, 2, ("s", 0, 4, "F32", "scalar", 1, 1)), "scale applies to FP8 weights only"),
    (("m", 0, 256 * 300, "F8_E4M3", 256, 300, ("s", 0, 24, "F32", "block", 128, 2)), "scale_cols does not match"),
    (("m", 0, 256 * 300, "F8_E4M3", 256, 300, ("s", 0, 4, "F32", "row", 1, 1)), "does not match its layout"),
    (("m", 0, 256 * 300, "F8_E4M3", 256, 300, ("s", 0, 4, "F32", "diagonal", 1, 1)), "unknown scale layout"),
    (("m", 0, 256 * 300, "F8_E4M3", 256, 300, ("s", 0, 4, "I8", "scalar", 1, 1)), "unsupported dtype 'I8'"),
    (["m.safetensors", 0, 16, "F32", 2, 2], "a task must be a tuple"),
])
def test_engine_rejects_bad_tasks(task, match):
    with pytest.raises(ValueError, match=match):
        _C.validate_tasks([task])
    assert _C.validate_tasks([("m.safetensors", 0, 16, "F32", 2, 2)]) == 1
    assert _C.validate_tasks([("m", 0, 256 * 300, "F8_E4M3", 256, 300, ("s", 0, 24, "F32", "block", 128, 3)),
                              ("m", 0, 256 * 300, "F8_E5M2", 256, 300, ("s", 0, 512, "BF16", "row", 1, 1)),
                              ("m", 0, 256 * 300, "F8_E4M3", 256, 300, None)]) == 3


@needs_ext
def test_cusolver_versions_are_readable_without_a_gpu():
    """The library's version at run time and the headers' at build time (SPECTRUM_FAST_SYEVD_ALG needs both
    at 12.3.4 or newer); CUDA 13's cuSOLVER is 12.x."""
    loaded, built = _C.cusolver_version(), _C.cusolver_header_version()
    assert 11000 <= built < 100000 and 11000 <= loaded < 100000
    assert loaded // 1000 == built // 1000  # the same major version: the soname the extension links


@needs_ext
@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="a GPU is present")
def test_engine_without_gpu_names_the_failed_call():
    with pytest.raises(RuntimeError, match=r"cuda\w+ failed: cudaError"):
        _C.GramEngine(0)


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="a GPU is present")
def test_cuda_request_without_gpu_is_a_clear_error(tmp_path):
    save_np(tmp_path / "model.safetensors", {"h.0.attn.weight": np.ones((4, 4), np.float32)})
    with pytest.raises(spectrum_fast.SpectrumError, match="device='cuda' is not available"):
        spectrum_fast.scan(tmp_path, device="cuda", progress=False)


# -- on a GPU -------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,fp64_min_k", [("float32", "4096"), ("float16", "4096"), ("bfloat16", "4096"),
                                              ("bfloat16", "1")])
def test_gpu_parity_with_float64_reference(tmp_path, monkeypatch, dtype, fp64_min_k):
    """Every dtype through the fp32-first route; and (fp64_min_k=1) everything straight to float64, the
    route of k >= 4096 in real models."""
    import torch

    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", fp64_min_k)

    tensors = {f"model.layers.{i}.mlp.{name}.weight": torch.from_numpy(w).to(getattr(torch, dtype))
               for i, (name, w) in enumerate(_adversarial())}
    tensors["model.layers.99.mlp.zero.weight"] = torch.zeros(64, 32, dtype=getattr(torch, dtype))
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "model.safetensors"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectrum_fast.DegenerateMatrixWarning)
        gpu = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
        cpu = spectrum_fast.scan(tmp_path, device="cpu", progress=False)
    for r in gpu.records:
        stored = tensors[r.module + ".weight"].double().numpy()
        if not stored.any():
            assert r.status == "zero"
            continue
        assert_snr_matches(r.snr, stored, what=(r.module, r.method))
    assert gpu.select(0.5).modules == cpu.select(0.5).modules


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("alg", ["1", "2"])
def test_gpu_syevd_algorithms_parity_with_float64_reference(tmp_path, monkeypatch, alg):
    """cuSOLVER's one-stage and two-stage Xsyevd (SPECTRUM_FAST_SYEVD_ALG) through both engine passes, on the
    adversarial matrices in bf16: within 1e-4 of float64, the same selection as the CPU."""
    import torch
    from safetensors.torch import save_file

    from spectrum_fast.cuda_engine import SYEVD_ALG_MIN_CUSOLVER

    if min(_C.cusolver_version(), _C.cusolver_header_version()) < SYEVD_ALG_MIN_CUSOLVER:
        pytest.skip(f"cuSOLVER {_C.cusolver_version()} has no Xsyevd algorithm option (12.3.4 or newer)")
    monkeypatch.setenv("SPECTRUM_FAST_SYEVD_ALG", alg)
    tensors = {f"model.layers.{i}.mlp.{name}.weight": torch.from_numpy(w).to(torch.bfloat16)
               for i, (name, w) in enumerate(_adversarial())}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for fp64_min_k in ("4096", "1"):
        monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", fp64_min_k)
        gpu = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
        for r in gpu.records:
            assert_snr_matches(r.snr, tensors[r.module + ".weight"].double().numpy(), what=(r.module, r.method, alg))
    assert gpu.select(0.5).modules == spectrum_fast.scan(tmp_path, device="cpu", progress=False).select(0.5).modules
    # the engine itself: eigenvalues of one large Gram matrix against float64, both precisions
    w = torch.randn(1536, 1024, dtype=torch.float64).float().double()  # exactly what the file stores
    want = torch.linalg.eigvalsh(w.T @ w).numpy()
    save_file({"w": w.float()}, str(tmp_path / "big.safetensors"))
    engine = _C.GramEngine(0)
    engine.set_syevd_algorithm(int(alg), 0)
    from spectrum_fast.checkpoint import read_tensor_table
    from spectrum_fast.cuda_engine import _task

    task = _task(read_tensor_table(tmp_path / "big.safetensors")[0]["w"])
    for fp64, tol in ((False, 1e-4), (True, 1e-12)):
        ((lam, _, code),) = engine.run([task], fp64=fp64)
        assert code == 0
        np.testing.assert_allclose(np.asarray(lam), want, rtol=0, atol=tol * want.max())
    with pytest.raises(ValueError, match="must be 0, 1 or 2"):
        engine.set_syevd_algorithm(3, 0)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["cpu", "gpu"])
def test_gpu_twostage_parity_with_float64_reference(tmp_path, monkeypatch, mode):
    """SPECTRUM_FAST_TWOSTAGE=cpu|gpu with every matrix in the float64 pass: band reduction on the GPU (torch
    GEMMs; geqrf or the native panel kernel), band eigenvalues on CPU threads or the native band solver;
    the same contract as every other route."""
    import torch
    from safetensors.torch import save_file

    from spectrum_fast import twostage

    rng = np.random.default_rng(12)
    a = rng.standard_normal((700, 700))
    a = torch.from_numpy(a + a.T).cuda()
    want = np.linalg.eigvalsh(a.cpu().numpy())
    if mode == "cpu":
        band = twostage.band_reduce(a, 64).cpu().numpy()
        np.testing.assert_allclose(twostage.band_eigenvalues(band), want, rtol=0, atol=1e-12 * np.abs(want).max())
    else:
        solver = twostage.DeviceBands("cuda:0", 32)
        solver.run(["a"], a[None].clone())
        (_, got), = solver.finished(wait=True)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    tensors = {f"model.layers.{i}.mlp.{name}.weight": torch.from_numpy(w).to(torch.bfloat16)
               for i, (name, w) in enumerate(_adversarial())}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "1")
    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", mode)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectrum_fast.DegenerateMatrixWarning)
        gpu = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    for r in gpu.records:
        assert_snr_matches(r.snr, tensors[r.module + ".weight"].double().numpy(), what=(r.module, r.method))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", range(8))
def test_gpu_band_solver_matches_float64_and_depends_on_the_matrix_alone(variant):
    """The native band solver on the GPU (a thread block per matrix), each chase variant, against float64
    eigvalsh and against its host-thread run; a matrix gives the same bits alone, in a batch, and twice; with
    crews (variant & 4: a sweep per warp), the bits of one warp alone where one warp is the whole block."""
    import torch

    from spectrum_fast import twostage

    rng = np.random.default_rng(13)
    for n, b in [(1, 1), (3, 2), (100, 8), (513, 32), (1000, 64), (300, 128)]:
        mats = [(a, to_band(a, b)[0]) for a in (banded(rng, n, b) for _ in range(3))]
        bands = torch.from_numpy(np.stack([m[1] for m in mats])).cuda()

        def solve(x, b=b):
            w, _ = twostage.launch_bands(x.clone(), b, torch.cuda.current_stream(), variant=variant)
            torch.cuda.synchronize()
            return w.cpu().numpy()

        together = solve(bands)
        assert np.array_equal(together, solve(bands))
        assert np.array_equal(together[1], solve(bands[1:2])[0])
        twins = [(variant & ~2, None)]  # kBatched changes no bit (minus_product: one rounding either way)
        if variant & twostage.CREWS_BIT and b <= 32:
            twins.append((variant & 3, 32))  # crews: one warp's numbers, where one warp is the whole block
        for twin, threads in twins:
            w, _ = twostage.launch_bands(bands.clone(), b, torch.cuda.current_stream(), threads=threads, variant=twin)
            torch.cuda.synchronize()
            assert np.array_equal(together, w.cpu().numpy()), (twin, threads)
        host = _C.band_eigenvalues_host(np.stack([m[1] for m in mats]), b, 2, 1, variant)
        for i, (a, _) in enumerate(mats):
            want = np.linalg.eigvalsh(a)
            np.testing.assert_allclose(together[i], want, rtol=0, atol=1e-12 * max(1, np.abs(want).max()) * n ** 0.5)
            np.testing.assert_allclose(together[i], host[i], rtol=0, atol=1e-12 * max(1, np.abs(want).max()) * n ** 0.5)


@needs_gpu
@pytest.mark.gpu
def test_gpu_band_solver_occupancy_sets_the_launch():
    import torch

    from spectrum_fast import twostage

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for variant in twostage.CHASE_VARIANTS:
        threads = twostage.chase_threads(32, variant)
        held = _C.band_solver_occupancy(0, 32, threads, variant)
        assert held >= 1, variant
        launch = twostage.DeviceBands.full_launch("cuda:0", 32, threads, variant)
        assert launch == min(held, twostage.DeviceBands.BLOCKS_PER_SM) * sms


@needs_gpu
@pytest.mark.gpu
def test_gpu_panel_qr_is_geqrf():
    import torch

    from spectrum_fast import twostage

    rng = np.random.default_rng(14)
    for shape in [(4, 4000, 32), (2, 700, 64), (3, 40, 32), (1, 1, 1), (2, 20, 33), (1, 30, 1)]:
        p = torch.from_numpy(rng.standard_normal(shape)).cuda()
        before = p.clone()
        got_qr, got_tau = twostage.native_geqrf(p)
        assert torch.equal(p, before)  # not factored in place, even where its transpose is contiguous
        want_qr, want_tau = torch.geqrf(p)
        k = min(shape[1], shape[2])
        torch.testing.assert_close(got_qr, want_qr, rtol=0, atol=1e-12 * shape[1] ** 0.5 * 4)
        torch.testing.assert_close(got_tau[:, :k], want_tau, rtol=0, atol=1e-13)
        assert torch.equal(twostage.native_geqrf(p)[0], got_qr)  # deterministic


@needs_gpu
@pytest.mark.gpu
def test_gpu_selection_matches_cpu_on_a_llama(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    gpu = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    cpu = spectrum_fast.scan(tmp_path, device="cpu", progress=False)
    for a, b in zip(gpu.records, cpu.records):
        assert a.module == b.module and rel_err(a.snr, b.snr) <= 1e-4
    for top in (0.25, 0.5):
        assert gpu.select(top).modules == cpu.select(top).modules


@needs_gpu
@pytest.mark.gpu
@pytest.mark.skipif(_C is None or cuda_unavailable_reason() is not None or _C.device_count() < 2,
                    reason="needs two GPUs")
def test_two_gpus_match_one(tmp_path):
    rng = np.random.default_rng(3)
    save_np(tmp_path / "model.safetensors",
            {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((512, 256)).astype(np.float32)
             for i in range(8)})
    one = spectrum_fast.scan(tmp_path, device="cuda", devices=[0], progress=False)
    two = spectrum_fast.scan(tmp_path, device="cuda", devices=[0, 1], progress=False)
    assert [r.snr for r in one.records] == [r.snr for r in two.records]


@needs_gpu
@pytest.mark.gpu
def test_gpu_fp8_block_scaled_parity(tmp_path):
    """DeepSeek-V3 layout dequantized on the device: float64 reference of fp8 * scale_inv."""
    import torch
    from safetensors.torch import save_file

    from .test_checkpoint import _deepseek_fp8

    g = torch.Generator().manual_seed(1)
    tensors, want = {}, {}
    for i, (m, n) in enumerate([(1000, 300), (256, 2048), (4096, 1024)]):
        w = torch.randn(m, n, generator=g) * 0.02 + torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) * 0.01
        q, scale, deq = _deepseek_fp8(w)
        name = f"model.layers.{i}.mlp.up_proj"
        tensors[name + ".weight"], tensors[name + ".weight_scale_inv"] = q, scale
        want[name] = deq.double().numpy()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    gpu = spectrum_fast.scan(tmp_path, device="cuda", progress=False)
    assert len(gpu) == 3
    for r in gpu.records:
        assert rel_err(r.snr, ref_snr(want[r.module])) <= 1e-4, (r.module, r.method)


@needs_gpu
@pytest.mark.gpu
def test_gpu_batched_solver_matches_the_looped_one(tmp_path):
    from spectrum_fast.checkpoint import open_checkpoint

    rng = np.random.default_rng(3)
    t = {f"model.layers.{i}.mlp.experts.{e}.w1.weight": (rng.standard_normal((384, 128)) * (1 + e)).astype(np.float32)
         for i in range(2) for e in range(40)}
    save_np(tmp_path / "model.safetensors", t)
    infos = list(open_checkpoint(tmp_path).tensors.values())
    tasks = [(str(i.file), i.offset, i.nbytes, i.dtype, i.shape[0], i.shape[1]) for i in infos]
    engine = _C.GramEngine(0)
    for fp64 in (False, True):
        looped = engine.run(tasks, fp64=fp64)
        batched = engine.run_batched(tasks, fp64=fp64, batch=32)  # 80 matrices: 32 + 32 + 16
        for (a, amax_a, ia), (b, amax_b, ib) in zip(looped, batched):
            assert ia == ib == 0 and amax_a == amax_b
            np.testing.assert_allclose(b, a, rtol=0, atol=(1e-4 if not fp64 else 1e-10) * a.max())
    with pytest.raises(ValueError, match="one shape"):
        engine.run_batched(tasks[:1] + [(tasks[1][0], tasks[1][1], 4 * 64 * 2, "F32", 64, 2)])


@needs_gpu
@pytest.mark.gpu
def test_gpu_batched_result_is_fixed_by_its_batch(tmp_path):
    """The same batch gives the same bits every time; another composition moves only the last bits (an H100
    measured 7e-7 relative in fp32), which is why a scan fixes its batches up front (scheduling.batch_units)."""
    from spectrum_fast.checkpoint import open_checkpoint

    rng = np.random.default_rng(4)
    t = {f"model.layers.0.mlp.experts.{e}.w1.weight": (rng.standard_normal((700, 200)) * (1 + e)).astype(np.float32)
         for e in range(33)}
    save_np(tmp_path / "model.safetensors", t)
    infos = sorted(open_checkpoint(tmp_path).tensors.values(), key=lambda i: i.name)
    tasks = [(str(i.file), i.offset, i.nbytes, i.dtype, i.shape[0], i.shape[1]) for i in infos]
    engine = _C.GramEngine(0)
    for fp64 in (False, True):
        whole = engine.run_batched(tasks, fp64=fp64, batch=32)  # 32 + 1
        again = _C.GramEngine(0).run_batched(tasks, fp64=fp64, batch=32)
        for a, b in zip(whole, again):
            np.testing.assert_array_equal(a[0], b[0])
        parts = engine.run_batched(tasks[5:], fp64=fp64, batch=7) + engine.run_batched(tasks[:5], fp64=fp64, batch=2)
        for a, b in zip(whole, parts[-5:] + parts[:-5]):
            np.testing.assert_allclose(b[0], a[0], rtol=0, atol=(1e-5 if not fp64 else 1e-13) * a[0].max())


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("twostage", ["0", "gpu"])
def test_gpu_resumed_scans_are_bit_identical(tmp_path, monkeypatch, twostage):
    """A scan resumed from a journal holding part of a batched unit gives the uninterrupted scan's numbers bit
    for bit; with the GPU two-stage solver too (its stage-1 batches are units: here 16 of the 20 k = 512
    matrices that go straight to float64). Two GPUs: test_two_gpus_match_one; a GPU listed twice
    is refused (tests/test_gpu_session.py)."""
    from spectrum_fast import cuda_engine

    monkeypatch.setenv("SPECTRUM_FAST_TWOSTAGE", twostage)
    monkeypatch.setenv("SPECTRUM_FAST_FP64_MIN_K", "512")
    monkeypatch.setattr(cuda_engine, "BAND_BATCH_BYTES", 16 * 512 * 512 * 16)
    rng = np.random.default_rng(9)
    t = {f"model.layers.{i}.mlp.experts.{e}.w1.weight": (rng.standard_normal((384, 128)) * (1 + e)).astype(np.float32)
         for i in range(4) for e in range(20)}
    t["model.layers.0.mlp.big.weight"] = rng.standard_normal((1024, 512)).astype(np.float32)
    t.update({f"model.layers.{i}.mlp.down.weight": rng.standard_normal((1024, 512)).astype(np.float32)
              for i in range(20)})
    save_np(tmp_path / "model.safetensors", t)
    journal = tmp_path / "scan.journal"
    whole = spectrum_fast.scan(tmp_path, device="cuda", progress=False, journal=journal)
    lines = journal.read_bytes().split(b"\n")
    downs = [ln for ln in lines[1:] if b"down" in ln]
    experts = [ln for ln in lines[1:] if b"experts" in ln]
    # 30 expert records (the first unit of 64 half done) and 5 of the first 16-matrix band batch
    journal.write_bytes(b"\n".join([lines[0], *experts[:30], *downs[:5]]) + b"\n")
    assert spectrum_fast.scan(tmp_path, device="cuda", progress=False, journal=journal).snr == whole.snr


def test_no_driver_is_found_without_loading_the_cuda_libraries():
    """A CPU-only machine learns there is no GPU without mapping cuBLAS/cuSOLVER (~200 MB resident)."""
    import ctypes
    import subprocess
    import sys

    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("an NVIDIA driver is installed here")
    except OSError:
        pass
    code = ("import sys; from spectrum_fast.backends import cuda_unavailable_reason as r; "
            "print(r()); print('spectrum_fast._C' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["no usable GPU: no NVIDIA driver (libcuda.so.1 cannot be loaded)", "False"]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(14336, 1024), (700, 1537)])
def test_gpu_gram_split_is_the_float64_product(shape):
    """The two-stage route's symmetric Gram split on the GPU (cuBLAS writing into strided blocks of the
    result, the upper blocks mirrored): float64 x^T x to rounding, exactly symmetric, also into a batch."""
    import torch

    from spectrum_fast import cuda_engine

    w = np.random.default_rng(shape[1]).standard_normal(shape)
    x = w if shape[0] >= shape[1] else w.T
    want = x.T @ x
    got = cuda_engine._gram(torch.from_numpy(w).cuda())
    assert torch.equal(got, got.T)
    assert np.abs(got.cpu().numpy() - want).max() <= 1e-13 * np.abs(want).max()
    batch = torch.zeros(2, *want.shape, dtype=torch.float64, device="cuda")
    cuda_engine._gram(torch.from_numpy(w).cuda(), out=batch[1])
    assert np.abs(batch[1].cpu().numpy() - want).max() <= 1e-13 * np.abs(want).max()
    assert not batch[0].any()

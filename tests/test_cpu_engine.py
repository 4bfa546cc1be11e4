"""CPU engine against the independent float64 reference: real weights and adversarial matrices, with each
of its eigensolvers (MRRR, and LAPACK's two-stage solver that it uses from ``TWO_STAGE_MIN_K``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectrum_fast import cpu_engine, lapack
from spectrum_fast.cpu_engine import (
    METHOD_GRAM32,
    METHOD_SVD64,
    STATUS_EMPTY,
    STATUS_NONFINITE,
    STATUS_OK,
    STATUS_ZERO,
    matrix_stats,
)

from .conftest import assert_snr_matches, noise_is_roundoff, ref_snr, rel_err

TOL = 1e-4


@pytest.fixture(autouse=True, params=["syevr", "syevd_2stage"])
def eigensolver(request, monkeypatch):
    """Every test here runs with each eigensolver at every order (the test matrices are small)."""
    if request.param == "syevr":
        monkeypatch.setattr(cpu_engine, "TWO_STAGE_MIN_K", 1 << 62)
    else:
        if not (lapack.syevd_2stage_available(np.float32) and lapack.syevd_2stage_available(np.float64)):
            pytest.skip("no LAPACKE ?syevd_2stage in this scipy's OpenBLAS")
        monkeypatch.setattr(cpu_engine, "TWO_STAGE_MIN_K", 1)
    assert request.param in cpu_engine.eigensolver()
    return request.param


def _check(w: np.ndarray) -> str:
    out = matrix_stats(w)
    assert out.status == STATUS_OK
    assert_snr_matches(out.snr, w, TOL, what=(w.shape, out.method))
    return out.method


def test_minilm_weights_match_float64(minilm_file):
    from safetensors.numpy import load_file

    mats = {k: v for k, v in load_file(str(minilm_file)).items() if v.ndim == 2 and "layer." in k}
    assert len(mats) == 36
    methods = [_check(w) for w in mats.values()]
    # the fast path is what runs on real weights; the guard refines only a few
    assert methods.count(METHOD_GRAM32) >= len(methods) * 0.75


def _random_matrices():
    rng = np.random.default_rng(1234)
    for i, (m, n) in enumerate([(64, 64), (300, 97), (97, 300), (512, 256), (256, 1024), (768, 768),
                                (1024, 128), (33, 700), (2000, 40)]):
        yield f"gauss{m}x{n}", rng.standard_normal((m, n)).astype(np.float32) * 0.02
        yield f"student{m}x{n}", rng.standard_t(3, (m, n)).astype(np.float32)
        k = min(m, n)
        spikes = rng.standard_normal((m, 6)) @ np.diag([40, 20, 10, 5, 3, 2.0]) @ rng.standard_normal((6, n))
        yield f"spiked{m}x{n}", (rng.standard_normal((m, n)) + spikes / math.sqrt(max(m, n))).astype(np.float32)
        decay = rng.standard_normal((m, n)) * (np.linspace(1, 0.05, n) ** (1 + i % 3))
        yield f"decay{m}x{n}", decay.astype(np.float32)
        del k


@pytest.mark.parametrize("name,w", list(_random_matrices()), ids=lambda x: x if isinstance(x, str) else "")
def test_random_matrices_match_float64(name, w):
    _check(w)


def test_bf16_rounded_weights_match():
    import torch

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(640, 320, generator=g) * 0.02).to(torch.bfloat16).float().numpy()
    _check(w)


def test_rank_deficient_is_refined():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((2048, 128)) @ rng.standard_normal((128, 512))).astype(np.float32)
    assert _check(w) == METHOD_SVD64


def test_duplicated_rows():
    rng = np.random.default_rng(1)
    w = np.repeat(rng.standard_normal((64, 256)).astype(np.float32), 8, axis=0)
    assert _check(w) != METHOD_GRAM32


def test_only_exactly_rank_deficient_matrices_have_roundoff_noise():
    """The tests' one exemption from the 1e-4 comparison (conftest.noise_is_roundoff) covers exactly the
    matrices whose float64 reference divides by rounding error, and no numerically full-rank ones."""
    rng = np.random.default_rng(1)
    dups = np.repeat(rng.standard_normal((64, 256)).astype(np.float32), 8, axis=0)
    low_rank_rounded = (rng.standard_normal((2048, 128)) @ rng.standard_normal((128, 512))).astype(np.float32)
    assert noise_is_roundoff(dups)
    assert not noise_is_roundoff(low_rank_rounded)  # fp32 rounding made it full rank: strict comparison
    assert not noise_is_roundoff(rng.standard_normal((300, 200)))
    spiked = rng.standard_normal((512, 256))
    spiked[0, 0] = 1e15  # full rank, tiny noise values next to S[0], yet both references agree: strict
    assert not noise_is_roundoff(spiked)
    assert_snr_matches(matrix_stats(spiked).snr, spiked)
    assert_snr_matches(matrix_stats(dups * 1e3).snr, dups * 1e3)  # the exemption's bound scales with W
    from spectrum_fast.snr import snr_from_singular_values

    s = np.linalg.svd(dups.astype(np.float64), compute_uv=False)
    assert 1e12 < snr_from_singular_values(s, 512, 256).snr < 1e15


def test_value_on_threshold_is_refined():
    """A singular value within 1e-7 of tau: fp32 cannot tell its side, so the guard must refine."""
    rng = np.random.default_rng(5)
    u, _ = np.linalg.qr(rng.standard_normal((512, 256)))
    v, _ = np.linalg.qr(rng.standard_normal((256, 256)))
    s = np.sort(rng.uniform(0.2, 1.0, 256))[::-1] ** 2
    s[:4] = [9.0, 7.0, 5.0, 4.0]
    from spectrum_fast.snr import snr_from_singular_values

    tau = snr_from_singular_values(s, 512, 256).tau
    j = int(np.argmin(np.abs(s - tau)))
    s[j] = tau * (1 + 1e-8)
    w = ((u * s) @ v.T).astype(np.float32)
    s_stored = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    tau_stored = snr_from_singular_values(s_stored, 512, 256).tau
    assert np.min(np.abs(s_stored - tau_stored)) / tau_stored < 1e-5  # still on the edge after rounding
    assert _check(w) != METHOD_GRAM32


@pytest.mark.parametrize("shape", [(1, 300), (300, 1), (16384, 16), (16, 16384), (2, 2)])
def test_extreme_shapes(shape):
    rng = np.random.default_rng(2)
    _check(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_extreme_scales(scale):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 128)) * scale).astype(np.float32)
    assert np.isfinite(w).all() and (w != 0).any()
    _check(w)


def test_identity_is_noise_free():
    out = matrix_stats(np.eye(64, dtype=np.float32))
    assert out.stats.noise_free
    assert out.snr == pytest.approx(64.0, rel=1e-6)


def test_float64_input():
    rng = np.random.default_rng(4)
    _check(rng.standard_normal((200, 100)))


@pytest.mark.parametrize("bad,status", [
    (np.zeros((32, 16), np.float32), STATUS_ZERO),
    (np.full((32, 16), np.nan, np.float32), STATUS_NONFINITE),
    (np.zeros((0, 16), np.float32), STATUS_EMPTY),
])
def test_degenerate(bad, status):
    out = matrix_stats(bad)
    assert out.status == status
    assert math.isnan(out.snr)


def test_single_inf_or_nan_entry():
    rng = np.random.default_rng(6)
    for v in (np.inf, -np.inf, np.nan):
        w = rng.standard_normal((64, 32)).astype(np.float32)
        w[10, 3] = v
        assert matrix_stats(w).status == STATUS_NONFINITE


def test_exact_mode_uses_svd():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    out = matrix_stats(w, exact=True)
    assert out.method == METHOD_SVD64
    assert rel_err(out.snr, ref_snr(w)) <= 1e-12


def test_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        matrix_stats(np.ones((2, 3, 4), np.float32))


@pytest.mark.parametrize("scale", [1e-10, 2.0**40, 1e-39])
def test_noise_free_snr_does_not_depend_on_scale(scale):
    out = matrix_stats((np.eye(8) * scale).astype(np.float32))
    assert out.stats.noise_free and out.snr == pytest.approx(8.0, rel=1e-6)


def test_subnormal_float32_matrix():
    w = (np.random.default_rng(8).standard_normal((64, 32)) * 1e-39).astype(np.float32)
    _check(w)


def test_float64_near_overflow():
    w = np.random.default_rng(9).standard_normal((64, 32)) * 1e307
    # the SNR scales as 1/c with W: compare against the reference on a scaled-down copy
    assert rel_err(matrix_stats(w).snr * 1e300, ref_snr(w / 1e300)) <= 1e-4


def test_zero_noise_sum_is_infinite_like_the_reference():
    w = np.zeros((16, 8), np.float32)
    w[:, 0] = 1.0  # one nonzero singular value, seven exact zeros <= tau = 0
    out = matrix_stats(w)
    assert out.status == STATUS_OK and out.snr == math.inf and not out.stats.noise_free


@pytest.mark.parametrize("shape", [(300, 97), (97, 300), (128, 128), (1, 50), (50, 1), (1000, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_gram64_is_the_float64_product(shape, dtype, layout, monkeypatch):
    """The float64 Gram matrix summed block by block (blocks of 7 rows or columns here: the last one short)
    equals the product of the float64 matrix with itself, lower triangle, column-major, for any input
    layout."""
    k = min(shape)
    monkeypatch.setattr(cpu_engine, "GRAM64_BLOCK_BYTES", 8 * k * 7)
    rng = np.random.default_rng(7)
    if layout == "strided":
        w = rng.standard_normal((shape[0], 2 * shape[1])).astype(dtype)[:, ::2]
    else:
        w = np.asarray(rng.standard_normal(shape).astype(dtype), order=layout)
    x = w.astype(np.float64)
    want = x.T @ x if shape[0] >= shape[1] else x @ x.T
    got = cpu_engine.gram64(w)
    assert got.shape == (k, k) and got.dtype == np.float64 and got.flags.f_contiguous
    assert np.abs(np.tril(got) - np.tril(want)).max() <= 1e-13 * np.abs(want).max()
    assert not np.triu(got, 1).any()


def _peak_bytes(fn) -> int:
    """Peak of the memory numpy allocates while ``fn`` runs (tracemalloc sees numpy's arrays)."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape", [(20000, 64), (64, 20000)])
def test_float64_gram_never_copies_the_whole_matrix(shape, monkeypatch):
    """The float64 route widens one block at a time: its peak is a block and the Gram matrix, not the float64
    copy of W (8 m n bytes, 10 MB here) that it used to make."""
    monkeypatch.setattr(cpu_engine, "GRAM64_BLOCK_BYTES", 1 << 20)
    w = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    peak = _peak_bytes(lambda: cpu_engine._gram_eigenvalues(w, fp64=True))
    k = min(shape)
    assert peak <= (1 << 20) + 4 * 8 * k * k + (64 << 10), peak
    assert peak < 8 * w.size / 4


def test_float64_svd_copies_the_matrix_once():
    """The exact route's float64 SVD works in the one float64 copy it makes (LAPACK overwrites it)."""
    w = np.random.default_rng(4).standard_normal((20000, 64)).astype(np.float32)
    peak = _peak_bytes(lambda: matrix_stats(w, exact=True))
    assert 8 * w.size <= peak < 1.5 * 8 * w.size, peak


def test_working_bytes_covers_the_gram_routes(monkeypatch):
    """working_bytes (what the scan's memory budget counts per matrix beyond the matrix) is at least what the
    float32 and float64 Gram routes allocate, and with exact=True what the float64 SVD does."""
    monkeypatch.setattr(cpu_engine, "GRAM64_BLOCK_BYTES", 1 << 20)
    for shape in [(6000, 300), (300, 6000), (700, 700)]:
        w = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
        for fp64 in (False, True):
            peak = _peak_bytes(lambda w=w, fp64=fp64: cpu_engine._gram_eigenvalues(w, fp64=fp64))
            assert peak <= cpu_engine.working_bytes(*shape), (shape, fp64, peak)
        peak = _peak_bytes(lambda w=w: matrix_stats(w, exact=True))
        assert peak <= cpu_engine.working_bytes(*shape, exact=True), (shape, "exact", peak)

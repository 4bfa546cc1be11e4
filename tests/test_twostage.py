"""spectrum_fast/twostage.py (the two-stage eigensolver): its eigenvalues against float64 ``eigvalsh``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spectrum_fast import twostage


def _sym(rng, n):
    a = rng.standard_normal((n, n))
    return (a + a.T) / 2


@pytest.mark.parametrize("n,b", [(1, 4), (2, 1), (5, 2), (64, 64), (65, 64), (200, 1), (200, 7), (300, 32), (513, 64)])
def test_float64_eigenvalues_match(n, b):
    rng = np.random.default_rng(n * 100 + b)
    a = _sym(rng, n)
    want = np.linalg.eigvalsh(a)
    band = twostage.band_reduce(torch.from_numpy(a), b)
    assert band.shape == (b + 1, n)
    got = twostage.band_eigenvalues(band.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * max(1.0, np.abs(want).max()))


def test_input_is_not_modified_and_result_is_banded():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(_sym(rng, 100))
    before = a.clone()
    band = twostage.band_reduce(a, 8)
    assert torch.equal(a, before)
    # rebuild the band matrix: same eigenvalues, and nothing outside the band was kept
    full = torch.zeros(100, 100, dtype=torch.float64)
    for i in range(9):
        full += torch.diag(band[i, : 100 - i], -i) + (torch.diag(band[i, : 100 - i], i) if i else 0)
    np.testing.assert_allclose(np.linalg.eigvalsh(full.numpy()), np.linalg.eigvalsh(a.numpy()), atol=1e-12 * 20)


def test_gram_matrices_rank_deficient_zero_and_identity():
    """Gram matrices as the scan forms them, including panels that are already zero (geqrf's tau = 0)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((700, 40)) @ rng.standard_normal((40, 300))  # rank 40
    cases = [w.T @ w, np.zeros((90, 90)), np.eye(90), np.diag(np.arange(1.0, 91.0))]
    for g in cases:
        want = np.linalg.eigvalsh(g)
        got = twostage.eigenvalues(torch.from_numpy(g), b=16)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * max(1.0, np.abs(want).max()))


def test_float32_error_is_at_rounding_level():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((1500, 400)) * 0.02).astype(np.float32)
    g = w.T @ w
    want = np.linalg.eigvalsh(g.astype(np.float64))
    got = twostage.eigenvalues(torch.from_numpy(g), b=32)
    assert np.abs(got - want).max() <= 100 * np.finfo(np.float32).eps * want.max()  # measured: 18


def test_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        twostage.band_reduce(torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="bandwidth"):
        twostage.band_reduce(torch.zeros(3, 3), 0)


def test_stage2_through_lapacke_and_through_scipy_agree(monkeypatch):
    """dsbevd through ctypes (threads run at once) and scipy's eig_banded (the fallback) give the same values."""
    rng = np.random.default_rng(7)
    band = twostage.band_reduce(torch.from_numpy(_sym(rng, 300)), 16).numpy()
    fn, where = twostage._lapacke()
    got = twostage.band_eigenvalues(band)
    monkeypatch.setattr(twostage, "_lapacke", lambda: (None, "none"))
    fallback = twostage.band_eigenvalues(band)
    np.testing.assert_allclose(got, fallback, rtol=0, atol=1e-12 * np.abs(fallback).max())
    assert isinstance(twostage.stage2_backend(), str)
    if fn is None:
        pytest.skip(f"no LAPACKE here ({where}): only the fallback ran")


def test_pool_runs_stage2_in_threads():
    rng = np.random.default_rng(8)
    a = torch.from_numpy(_sym(rng, 120))
    futures = [twostage.submit(a, 8, threads=2) for _ in range(4)]
    want = np.linalg.eigvalsh(a.numpy())
    for f in futures:
        np.testing.assert_allclose(f.result(), want, rtol=0, atol=1e-12 * np.abs(want).max())
    assert twostage.pool(2) is twostage.pool(2)

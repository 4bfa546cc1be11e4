"""spectrum_fast/twostage.py (the two-stage eigensolver): its eigenvalues against float64 ``eigvalsh``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spectrum_fast import lapack, twostage


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
    fn, where = lapack.sbevd_routine()
    got = twostage.band_eigenvalues(band)
    monkeypatch.setattr(lapack, "sbevd_routine", lambda: (None, "none"))
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


def test_batched_reduction_matches_one_at_a_time():
    """A batch (batch, n, n) gives each matrix's band as reducing it alone does, to rounding; overwrite=True
    consumes the input and gives the same bands."""
    rng = np.random.default_rng(9)
    a = torch.from_numpy(np.stack([_sym(rng, 90) for _ in range(3)]))
    bands = twostage.band_reduce(a, 8)
    assert bands.shape == (3, 9, 90)
    for i in range(3):
        alone = twostage.band_reduce(a[i], 8)
        torch.testing.assert_close(bands[i], alone, rtol=0, atol=1e-12)
        np.testing.assert_allclose(twostage.band_eigenvalues(bands[i].numpy()), np.linalg.eigvalsh(a[i].numpy()),
                                   rtol=0, atol=1e-12 * 20)
    b = a.clone()
    torch.testing.assert_close(twostage.band_reduce(b, 8, overwrite=True), bands, rtol=0, atol=0)
    assert not torch.equal(a, b)  # b was worked in


def test_native_panel_qr_is_geqrf():
    """The GPU's panel kernel (run on host threads here) leaves what LAPACK's geqrf does: Q R = P with Q from
    its reflectors orthogonal, on full, rank-deficient, zero-column and wide panels; and on full-rank ones the
    same R, v and tau as geqrf up to rounding (elsewhere the reflectors of roundoff are arbitrary)."""
    _C = pytest.importorskip("spectrum_fast._C", reason="the native extension is not built here")
    if not hasattr(_C, "panel_qr_host"):
        pytest.skip("this build of the extension has no panel QR")
    rng = np.random.default_rng(10)
    full = rng.standard_normal((3, 200, 16))
    rank2 = rng.standard_normal((2, 150, 2)) @ rng.standard_normal((2, 2, 12))
    holes = rng.standard_normal((2, 60, 8))
    holes[:, :, 3] = 0
    holes[1, 5:, 0] = 0  # already reduced below the diagonal: tau = 0
    wide = rng.standard_normal((2, 5, 9))
    for p, same in ((full, True), (wide, True), (rank2, False), (holes, False), (np.zeros((1, 40, 4)), True),
                    (rng.standard_normal((1, 1, 1)), True),
                    (rng.standard_normal((1, 30, 1)), True)):  # its transpose is contiguous already
        t = torch.from_numpy(p)
        before = t.clone()
        got_qr, got_tau = twostage.native_geqrf(t)
        assert torch.equal(t, before)  # the input stays as it was
        m, nb = p.shape[1], p.shape[2]
        k = min(m, nb)
        assert not got_tau[:, k:].any()
        scale = max(1.0, float(np.abs(p).max())) * m
        q = torch.linalg.householder_product(got_qr[:, :, :k], got_tau[:, :k])  # (batch, m, k)
        torch.testing.assert_close(q @ torch.triu(got_qr[:, :k, :]), t, rtol=0, atol=1e-13 * scale)
        torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(k, dtype=t.dtype).expand(len(p), k, k),
                                   rtol=0, atol=1e-13 * m)
        if same:
            want_qr, want_tau = torch.geqrf(t)
            torch.testing.assert_close(got_qr, want_qr, rtol=0, atol=1e-13 * scale)
            torch.testing.assert_close(got_tau[:, :k], want_tau, rtol=0, atol=1e-13)


def test_batched_reduction_with_the_native_panel_qr():
    _C = pytest.importorskip("spectrum_fast._C", reason="the native extension is not built here")
    if not hasattr(_C, "panel_qr_host"):
        pytest.skip("this build of the extension has no panel QR")
    rng = np.random.default_rng(11)
    w = rng.standard_normal((2, 300, 30)) @ rng.standard_normal((2, 30, 120))  # rank 30: zero panels late on
    g = torch.from_numpy(w.transpose(0, 2, 1) @ w)
    bands = twostage.band_reduce(g, 16, qr=twostage.native_geqrf)
    for i in range(2):
        want = np.linalg.eigvalsh(g[i].numpy())
        np.testing.assert_allclose(twostage.band_eigenvalues(bands[i].numpy()), want, rtol=0, atol=1e-12 * want.max())


def test_device_bands_keep_bands_until_enough_for_a_launch():
    """DeviceBands holds reduced bands until ``launch_at`` of one size are there (one launch must fill the
    GPU's multiprocessors), launches the rest when asked to wait, and hands every key back once, with its
    own matrix's eigenvalues (run here on the CPU: the native code on host threads)."""
    _C = pytest.importorskip("spectrum_fast._C", reason="the native extension is not built here")
    if not hasattr(_C, "band_eigenvalues_host"):
        pytest.skip("this build of the extension has no band solver")
    rng = np.random.default_rng(12)
    mats = {f"m{i}": _sym(rng, 40 if i < 6 else 30) for i in range(7)}
    solver = twostage.DeviceBands("cpu", 8, launch_at=5)
    solver.run(["m0", "m1"], torch.from_numpy(np.stack([mats["m0"], mats["m1"]])))
    solver.run(["m6"], torch.from_numpy(mats["m6"][None].copy()))  # another size: kept apart
    solver.run(["m2", "m3"], torch.from_numpy(np.stack([mats["m2"], mats["m3"]])))
    assert solver.finished() == []  # 4 of size 40 kept: not yet
    solver.run(["m4", "m5"], torch.from_numpy(np.stack([mats["m4"], mats["m5"]])))
    got = dict(solver.finished())
    assert sorted(got) == ["m0", "m1", "m2", "m3", "m4"]  # 6 >= 5: 5 launched, m5 kept for the next
    got.update(solver.finished(wait=True))
    assert sorted(got) == sorted(mats) and solver.finished(wait=True) == []
    for name, a in mats.items():
        np.testing.assert_allclose(got[name], np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * np.abs(a).max() * 10)


def test_device_bands_launch_exactly_launch_at_and_keep_the_rest():
    """A launch holds exactly ``launch_at`` bands (one more than a GPU holds at once would start a second
    wave), the rest stay kept for the next one; every key still comes back once with its own eigenvalues."""
    _C = pytest.importorskip("spectrum_fast._C", reason="the native extension is not built here")
    if not hasattr(_C, "band_eigenvalues_host"):
        pytest.skip("this build of the extension has no band solver")
    rng = np.random.default_rng(13)
    mats = {f"m{i}": _sym(rng, 36) for i in range(7)}
    solver = twostage.DeviceBands("cpu", 8, launch_at=3)
    launched = []
    launch = twostage.DeviceBands._launch

    def spy(self, n, count=None):
        before = len(self._inflight)  # finished() only runs at the end here: launches are appended
        launch(self, n, count)
        launched.extend(len(item[1]) for item in self._inflight[before:])

    solver._launch = spy.__get__(solver)
    names = list(mats)
    for group in (names[:2], names[2:6], names[6:]):  # 2 kept; 6 -> two launches of 3; 1 kept
        solver.run(group, torch.from_numpy(np.stack([mats[k] for k in group])))
    assert launched == [3, 3]
    assert sum(len(k) for k, _, _ in solver._kept[36]) == 1
    got = dict(solver.finished(wait=True))
    assert launched == [3, 3, 1] and sorted(got) == sorted(mats)
    for name, a in mats.items():
        np.testing.assert_allclose(got[name], np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * np.abs(a).max() * 10)


def test_device_bands_failed_launch_names_its_keys():
    """A launch whose results cannot be read (a GPU kernel's fault surfaces there) raises LaunchError with
    that launch's keys, not a bare error."""
    _C = pytest.importorskip("spectrum_fast._C", reason="the native extension is not built here")
    if not hasattr(_C, "band_eigenvalues_host"):
        pytest.skip("this build of the extension has no band solver")

    class Faulted:
        def __mul__(self, other):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    solver = twostage.DeviceBands("cpu", 8, launch_at=2)
    solver.run(["a", "b"], torch.from_numpy(np.stack([_sym(np.random.default_rng(i), 20) for i in range(2)])))
    solver._inflight = [(None, keys, Faulted(), scales) for _, keys, _, scales in solver._inflight]
    with pytest.raises(twostage.LaunchError, match="illegal memory access") as e:
        solver.finished()
    assert e.value.keys == ["a", "b"] and solver.finished() == []


def test_native_kernels_take_float64_only():
    """The native kernels read raw doubles: anything else is refused before they see it."""
    with pytest.raises(ValueError, match="float64"):
        twostage.native_geqrf(torch.zeros(1, 4, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="float64"):
        twostage.launch_bands(torch.zeros(1, 4, 2, dtype=torch.float32), 1, None)

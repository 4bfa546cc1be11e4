"""The native band eigensolver (csrc/band_solver.h: bulge chasing to tridiagonal, then bisection), run by
teams of host threads through ``_C.band_eigenvalues_host`` with real barriers: the same code and phases a
GPU thread block runs. Every result is checked against float64 ``numpy.linalg.eigvalsh`` of the dense
matrix, on random and adversarial band matrices and on Gram matrices reduced by twostage.band_reduce."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import banded, to_band

_C = pytest.importorskip("spectrum_fast._C", reason="the native extension is not built here")
if not hasattr(_C, "band_eigenvalues_host"):
    pytest.skip("this build of the extension has no band solver", allow_module_level=True)


def check(a: np.ndarray, b: int, threads: int, ld: int | None = None, tol: float = 1e-13, lanes: int = 1,
          variant: int = 0) -> np.ndarray:
    got = _C.band_eigenvalues_host(to_band(a, b, ld), b, threads, lanes, variant)[0]
    want = np.linalg.eigvalsh(a)
    scale = max(np.abs(want).max(), np.finfo(float).tiny)
    assert np.all(np.diff(got) >= 0), "ascending"
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale * max(1, a.shape[0]) ** 0.5)
    return got


@pytest.mark.parametrize("n,b,threads", [(1, 1, 1), (2, 1, 2), (2, 2, 1), (3, 2, 3), (5, 4, 2), (10, 3, 1),
                                         (10, 3, 4), (17, 4, 3), (64, 8, 8), (100, 16, 5), (50, 49, 4),
                                         (200, 32, 4), (33, 1, 2), (130, 128, 3), (300, 7, 2)])
@pytest.mark.parametrize("variant", [0, 3])
def test_random_band_matrices(n, b, threads, variant):
    check(banded(np.random.default_rng(n * 1000 + b), n, b), b, threads, variant=variant)


@pytest.mark.parametrize("variant", [0, 1, 3, 4, 7])  # 2, 5 and 6 are bit-identical twins (the test below)
@pytest.mark.parametrize("n,b,lanes", [(101, 32, 32), (137, 64, 32), (60, 8, 4)])
def test_gpu_block_partition(n, b, lanes, variant):
    """A GPU block's partition of the work (twostage.chase_threads): band_threads(b) threads in warps of 32 lanes
    whose sums are group sums (one warp at b = 32, two at 64), or CREWS warps with kCrews, for every chase
    variant; and groups of 4 lanes."""
    from spectrum_fast import twostage

    threads = twostage.chase_threads(b, variant) * lanes // 32
    check(banded(np.random.default_rng(n + b + variant), n, b), b, threads, lanes=lanes, variant=variant)


@pytest.mark.parametrize("n,b,lanes,crews", [(200, 8, 4, 4), (150, 16, 8, 3), (97, 5, 1, 8), (60, 3, 2, 5),
                                             (2, 1, 1, 2), (5, 4, 1, 3), (40, 39, 2, 2)])
def test_crews_give_one_crews_numbers_bit_for_bit(n, b, lanes, crews):
    """kCrews: each group chases its own sweep, three steps behind the one before; the numbers are those of a
    team of one group (the same steps, in an order that changes no entry's sequence of updates)."""
    a = banded(np.random.default_rng(n * b + crews), n, b)
    for v in (0, 1, 3):
        one = check(a, b, lanes, lanes=lanes, variant=v)
        many = check(a, b, lanes * crews, lanes=lanes, variant=v | 4)
        assert np.array_equal(one, many), v


def test_chase_variants_agree_and_batching_changes_no_bit():
    a = to_band(banded(np.random.default_rng(5), 75, 12), 12)
    out = [_C.band_eigenvalues_host(a, 12, 4, 2, v)[0] for v in range(4)]
    assert np.array_equal(out[0], out[2]) and np.array_equal(out[1], out[3])  # kBatched: the same arithmetic
    np.testing.assert_allclose(out[1], out[0], rtol=0, atol=1e-13 * np.abs(out[0]).max())


def test_wider_storage_than_needed():
    a = banded(np.random.default_rng(1), 80, 6)
    check(a, 6, 3, ld=20)


@pytest.mark.parametrize("variant", [0, 3])
def test_adversarial_band_matrices(variant):
    rng = np.random.default_rng(2)
    n, b = 120, 8
    zero = np.zeros((n, n))
    assert not _C.band_eigenvalues_host(to_band(zero, b), b, 2, 1, variant).any()
    check(np.diag(rng.standard_normal(n)), b, 3, variant=variant)  # already diagonal: every reflector is I
    tri = np.diag(rng.standard_normal(n)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)
    check(tri, b, 2, variant=variant)  # already tridiagonal
    x = rng.standard_normal((n, 3))
    low_rank = np.tril(np.triu(x @ x.T, -b), b)
    check(low_rank, b, 2, variant=variant)
    cluster = np.eye(n) + 1e-9 * banded(rng, n, b)  # one tight cluster
    check(cluster, b, 3, variant=variant)
    graded = np.diag(np.logspace(0, -14, n)) + np.tril(np.triu(1e-15 * banded(rng, n, b), -b), b)
    check(graded, b, 2, variant=variant)  # eigenvalues over 14 decades: absolute accuracy against the largest
    wilkinson = np.diag(np.abs(np.arange(n) - n // 2).astype(float)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)
    check(wilkinson, b, 2, variant=variant)  # pairs of nearly equal eigenvalues
    holes = banded(rng, n, b)
    holes[:, 40:60] = 0
    holes[40:60, :] = 0  # a decoupled zero block in the middle: zero columns inside sweeps
    check(holes, b, 4, lanes=2, variant=variant)


@pytest.mark.parametrize("n,b", [(300, 16), (513, 32), (256, 64)])
def test_gram_matrices_after_stage_1(n, b):
    """The whole two-stage route as the GPU scan runs it: Gram matrix, twostage.band_reduce, band solver."""
    torch = pytest.importorskip("torch")
    from spectrum_fast import twostage

    rng = np.random.default_rng(n + b)
    for w in (rng.standard_normal((2 * n, n)),  # full rank
              rng.standard_normal((2 * n, 40)) @ rng.standard_normal((40, n)),  # rank 40: a zero tail
              np.repeat(rng.standard_normal((n // 8, n)), 8, axis=0)):  # duplicated rows
        g = w.T @ w
        band = twostage.band_storage(twostage.band_reduce(torch.from_numpy(g / np.abs(g).max()), b), 2 * b)
        got = _C.band_eigenvalues_host(band.numpy()[None], b, 2)[0] * np.abs(g).max()
        want = np.linalg.eigvalsh(g)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * want.max())


def test_batch_results_do_not_depend_on_the_batch_and_repeat_bit_for_bit():
    rng = np.random.default_rng(3)
    mats = [banded(rng, 90, 5) for _ in range(3)]
    batch = np.concatenate([to_band(a, 5) for a in mats])
    together = _C.band_eigenvalues_host(batch, 5, 3)
    assert np.array_equal(together, _C.band_eigenvalues_host(batch, 5, 3))
    for i, a in enumerate(mats):
        assert np.array_equal(together[i], _C.band_eigenvalues_host(to_band(a, 5), 5, 3)[0])
        np.testing.assert_allclose(together[i], np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * np.abs(together[i]).max())


def test_input_array_is_not_modified():
    band = to_band(banded(np.random.default_rng(4), 40, 4), 4)
    before = band.copy()
    _C.band_eigenvalues_host(band, 4, 2)
    assert np.array_equal(band, before)


def test_bad_arguments_are_value_errors():
    good = to_band(np.eye(8), 2)
    for args, match in [((good[0], 2, 1), "batch, n, ld"), ((good, 0, 1), "bandwidth"), ((good, 200, 1), "bandwidth"),
                        ((good, 3, 1), "ld must be at least 2"), ((good, 2, 0), "threads"),
                        ((np.zeros((0, 8, 4)), 2, 1), "batch"), ((good, 2, 6, 4), "lanes must divide"),
                        ((good, 2, 4, 0), "lanes must divide"), ((good, 2, 1, 1, 9), "variant"),
                        ((good, 2, 1, 1, -1), "variant"), ((good, 2, 1, 1, 8), "variant"),
                        ((good, 2, 9, 1, 4), "at most 8 crews")]:
        with pytest.raises(ValueError, match=match):
            _C.band_eigenvalues_host(*args)


def test_cuda_entry_point_checks_arguments_before_any_cuda_call():
    """Bad shapes are ValueErrors before the GPU is touched; good ones on a machine without a GPU fail with
    the CUDA call named (never a crash: the pointers are not dereferenced on the host)."""
    with pytest.raises(ValueError, match="ld must be at least 2"):
        _C.band_eigenvalues_cuda(0, 0, 1, 64, 8, 4, 4, 0, 0, 0, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.band_eigenvalues_cuda(0, 0, 1, 64, 8, 4, 8, 0, 0, 0, 48)
    with pytest.raises(ValueError, match="up to 256"):
        _C.band_eigenvalues_cuda(0, 0, 1, 64, 8, 4, 8, 0, 0, 0, 512)
    with pytest.raises(ValueError, match="variant"):
        _C.band_eigenvalues_cuda(0, 0, 1, 64, 8, 4, 8, 0, 0, 0, 64, 8)
    with pytest.raises(ValueError, match="stride"):
        _C.band_eigenvalues_cuda(0, 0, 2, 10, 8, 4, 8, 0, 0, 0, 64)
    try:
        gpus = _C.device_count()
    except RuntimeError:
        gpus = 0
    for args, match in [((0, 0, 128, 7), "bandwidth"), ((0, 32, 48, 7), "multiple of 32"), ((0, 32, 128, 8), "variant")]:
        with pytest.raises(ValueError, match=match):
            _C.band_solver_occupancy(*args)
    if gpus == 0:
        with pytest.raises(RuntimeError, match="cudaGetDevice|cudaSetDevice"):
            _C.band_eigenvalues_cuda(0, 0, 1, 64, 8, 4, 8, 0, 0, 0, 64)
        with pytest.raises(RuntimeError, match="cudaGetDevice|cudaSetDevice"):
            _C.band_solver_occupancy(0, 32, 128, 7)


def test_panel_qr_bad_arguments_are_value_errors_before_any_cuda_call():
    good = np.zeros((1, 4, 8))  # (batch, nb, lda): 4 columns of up to 8 rows
    for args, match in [((good[0], 8, 1), "batch, nb, lda"), ((good, 0, 1), "must not be empty"),
                        ((good, 9, 1), "lda must be at least m"), ((good, 8, 0), "threads"),
                        ((np.zeros((0, 4, 8)), 8, 1), "batch"), ((good, 8, 4, 3), "lanes must divide")]:
        with pytest.raises(ValueError, match=match):
            _C.panel_qr_host(*args)
    out, tau = _C.panel_qr_host(good, 8, 1)  # a zero panel: nothing to reflect
    assert not out.any() and not tau.any()
    with pytest.raises(ValueError, match="stride must be at least"):
        _C.panel_qr_cuda(0, 0, 2, 10, 8, 4, 8, 0, 0, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.panel_qr_cuda(0, 0, 1, 32, 8, 4, 8, 0, 0, 48)


def test_panel_qr_with_a_gpu_block_partition_matches_one_lane_groups():
    """The panel kernel's warps (a group of 32 lanes per trailing column, group sums) leave what groups of one
    thread leave (which tests/test_twostage.py checks against geqrf)."""
    rng = np.random.default_rng(6)
    panels = rng.standard_normal((2, 16, 300))  # (batch, nb, lda): column-major 300 x 16 panels
    warps, warps_tau = _C.panel_qr_host(panels, 300, 64, 32)
    ones, ones_tau = _C.panel_qr_host(panels, 300, 4, 1)
    np.testing.assert_allclose(warps, ones, rtol=0, atol=1e-13 * 300)
    np.testing.assert_allclose(warps_tau, ones_tau, rtol=0, atol=1e-13)
    assert np.abs(warps - panels).max() > 1  # it did factor

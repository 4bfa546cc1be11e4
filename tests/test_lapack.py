"""LAPACK's two-stage eigensolver through ctypes (spectrum_fast.lapack) against float64 references computed
by numpy's own LAPACK, on random and adversarial symmetric matrices."""

from __future__ import annotations

import numpy as np
import pytest

from spectrum_fast import cpu_engine, lapack

needs_2stage = pytest.mark.skipif(not lapack.syevd_2stage_available(np.float64)
                                  or not lapack.syevd_2stage_available(np.float32),
                                  reason="no LAPACKE ?syevd_2stage in this scipy's OpenBLAS")


def _gram(rng, m, n, scale=1.0):
    x = rng.standard_normal((m, n)) * scale
    return x.T @ x


def _cases():
    rng = np.random.default_rng(3)
    yield "gram", _gram(rng, 700, 500)
    a = rng.standard_normal((300, 300))
    yield "indefinite", a + a.T
    yield "rank8", _gram(rng, 8, 400)  # 392 zero eigenvalues
    yield "zero", np.zeros((130, 130))
    yield "identity", np.eye(200)
    q = np.linalg.qr(rng.standard_normal((257, 257)))[0]
    yield "clustered", q @ np.diag(1 + 1e-12 * np.arange(257)) @ q.T
    d = np.logspace(0, -6, 300)
    yield "graded", d[:, None] * _gram(rng, 300, 300) * d[None, :]
    yield "one", np.array([[2.5]])
    yield "two", np.array([[1.0, 2.0], [2.0, -1.0]])


@needs_2stage
@pytest.mark.parametrize("name,a", list(_cases()), ids=[c[0] for c in _cases()])
def test_float64_eigenvalues_match_numpy(name, a):
    want = np.linalg.eigvalsh(a)
    got = lapack.syevd_2stage(a.copy())
    assert got.dtype == np.float64 and got.shape == want.shape
    assert np.all(np.diff(got) >= 0), "ascending"
    scale = max(np.abs(want).max(), 1e-300)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * scale * max(1, a.shape[0] / 100))


@needs_2stage
def test_float32_eigenvalues_are_float32_accurate():
    a = _gram(np.random.default_rng(5), 900, 600)
    want = np.linalg.eigvalsh(a)
    got = lapack.syevd_2stage(a.astype(np.float32))
    assert got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - want).max() / want.max()
    assert 1e-9 < err < 600 * np.finfo(np.float32).eps  # float32 work (not float64), backward stable


@needs_2stage
def test_reads_one_triangle_of_any_layout():
    """A C-ordered, Fortran-ordered or strided symmetric matrix gives the same values; a matrix that is not
    square is refused."""
    a = _gram(np.random.default_rng(6), 300, 200)
    want = lapack.syevd_2stage(a.copy())
    assert np.array_equal(lapack.syevd_2stage(np.asfortranarray(a)), want)
    big = np.zeros((400, 400))
    big[::2, ::2] = a
    assert np.array_equal(lapack.syevd_2stage(big[::2, ::2]), want)
    with pytest.raises(ValueError, match="square"):
        lapack.syevd_2stage(np.zeros((3, 4)))


def test_missing_routine_falls_back_to_mrrr(monkeypatch):
    """Where LAPACKE has no two-stage routine, the CPU engine uses scipy's syevr at every order."""
    monkeypatch.setattr(lapack, "_syevd_2stage", lambda dtype: (None, "none here"))
    monkeypatch.setattr(cpu_engine, "TWO_STAGE_MIN_K", 1)
    assert lapack.syevd_2stage(np.eye(3)) is None
    assert cpu_engine.eigensolver() == "syevr"
    a = _gram(np.random.default_rng(8), 120, 80)
    np.testing.assert_allclose(cpu_engine.eigvalsh(a.copy()), np.linalg.eigvalsh(a), rtol=0,
                               atol=1e-12 * np.abs(a).max())


@needs_2stage
def test_engine_switches_solver_at_its_order(monkeypatch):
    """Below TWO_STAGE_MIN_K the engine's eigenvalues are syevr's bit for bit, from it syevd_2stage's."""
    import scipy.linalg

    a = _gram(np.random.default_rng(9), 260, 250)
    mrrr = scipy.linalg.eigh(a, eigvals_only=True, driver="evr")
    two = lapack.syevd_2stage(a.copy())
    assert not np.array_equal(mrrr, two)  # the two solvers round differently: the switch is visible
    monkeypatch.setattr(cpu_engine, "TWO_STAGE_MIN_K", 251)
    assert np.array_equal(cpu_engine.eigvalsh(a.copy()), mrrr)
    monkeypatch.setattr(cpu_engine, "TWO_STAGE_MIN_K", 250)
    assert np.array_equal(cpu_engine.eigvalsh(a.copy()), two)
    assert cpu_engine.eigensolver() == "syevr below k=250, syevd_2stage from it"


@needs_2stage
def test_threads_run_at_once():
    """Calls from several threads (the CPU engine's workers) give each thread's own matrix its values."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(10)
    mats = [_gram(rng, 300, 220) * (i + 1) for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda a: lapack.syevd_2stage(a.copy()), mats))
    for a, g in zip(mats, got):
        assert np.array_equal(g, lapack.syevd_2stage(a.copy()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,a", list(_cases()), ids=[c[0] for c in _cases()])
def test_syevr_is_scipys_bit_for_bit(name, a, dtype):
    """The ctypes MRRR call computes what scipy's eigh(driver="evr") does, to the bit, from either layout."""
    import scipy.linalg

    a = ((a + a.T) / 2).astype(dtype)  # exactly symmetric: either layout's lower triangle is the same
    want = scipy.linalg.eigh(a, eigvals_only=True, driver="evr")
    for layout in (np.ascontiguousarray, np.asfortranarray):
        got = lapack.syevr(layout(a.copy()))
        assert got.dtype == dtype and np.array_equal(got, want), layout


def test_missing_syevr_falls_back_to_scipy(monkeypatch):
    import scipy.linalg

    a = _gram(np.random.default_rng(12), 90, 60)
    monkeypatch.setattr(lapack, "_syevr", lambda dtype: (None, "none here"))
    monkeypatch.setattr(cpu_engine, "TWO_STAGE_MIN_K", 1 << 62)
    assert lapack.syevr(a.copy()) is None
    assert np.array_equal(cpu_engine.eigvalsh(a.copy()), scipy.linalg.eigh(a, eigvals_only=True, driver="evr"))


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float64, 1e-15)])
def test_syrk_lower_accumulates_into_the_lower_triangle(dtype, tol):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((70, 40)).astype(dtype)
    c = np.asfortranarray(np.tril(np.ones((40, 40), dtype)))  # added to, not overwritten
    assert lapack.syrk_lower(c, x.T, trans=False)  # x.T is 40 x 70 column-major: c += xᵀx
    want = np.tril(np.ones((40, 40))) + x.T.astype(np.float64) @ x.astype(np.float64)
    assert np.abs(np.tril(c) - np.tril(want)).max() <= tol * np.abs(want).max() and not np.triu(c, 1).any()
    y = rng.standard_normal((40, 90)).astype(dtype)
    c = np.zeros((40, 40), dtype, order="F")
    assert lapack.syrk_lower(c, y.T, trans=True)  # y.T is 90 x 40 column-major: c += y yᵀ
    want = y.astype(np.float64) @ y.T.astype(np.float64)
    assert np.abs(np.tril(c) - np.tril(want)).max() <= tol * np.abs(want).max()
    with pytest.raises(ValueError, match="column-major"):
        lapack.syrk_lower(np.zeros((40, 40), dtype), x.T, trans=False)  # c row-major
    with pytest.raises(ValueError, match="gives 70 x 70"):
        lapack.syrk_lower(np.zeros((40, 40), dtype, order="F"), np.asfortranarray(x), trans=False)


@pytest.mark.parametrize("shape", [(300, 80), (80, 300), (1, 7), (7, 1), (120, 120)])
def test_gesdd_is_scipys_bit_for_bit(shape):
    import scipy.linalg

    w = np.asfortranarray(np.random.default_rng(14).standard_normal(shape))
    want = scipy.linalg.svdvals(w, check_finite=False)
    assert np.array_equal(lapack.gesdd(w.copy(order="F")), want)
    with pytest.raises(ValueError, match="column-major"):
        lapack.gesdd(np.ascontiguousarray(np.ones((3, 4))))


def _python_ran_during(fn) -> bool:
    """Whether this thread ran Python while another was inside ``fn``: it sleeps 50 ms after the other starts
    and wakes, which needs the GIL, before ``fn`` returns only if ``fn`` released the GIL."""
    import threading
    import time

    times = {}

    def work():
        times["start"] = time.perf_counter()
        fn()
        times["end"] = time.perf_counter()

    t = threading.Thread(target=work)
    t.start()
    while "start" not in times:
        time.sleep(0.001)
    time.sleep(0.05)
    woke = time.perf_counter()
    t.join()
    assert times["end"] - times["start"] > 0.15, "the call must take longer than the sleep to tell"
    return woke < times["end"]


@pytest.mark.parametrize("call", ["syevr", "syevd_2stage", "syrk_lower", "gesdd"])
def test_calls_release_the_gil(call):
    """While one thread is inside the LAPACK/BLAS call, another runs Python: the CPU engine's workers compute
    at once. (scipy's own dsyrk wrapper holds the GIL: two workers took turns, 18.9 s for two float64 Gram
    matrices that took 9.6 s each, against 9.2 s through ctypes.)"""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(15)
    a = _gram(rng, 2000, 1600)
    x = np.asfortranarray(rng.standard_normal((1600, 10000)))
    run = {"syevr": lambda: lapack.syevr(a.copy()), "syevd_2stage": lambda: lapack.syevd_2stage(a.copy()),
           "syrk_lower": lambda: lapack.syrk_lower(np.zeros((1600, 1600), order="F"), x, trans=False),
           "gesdd": lambda: lapack.gesdd(np.asfortranarray(x[:, :2000]))}[call]
    if run() is None:
        pytest.skip(f"no {call} in this scipy's OpenBLAS")
    with threadpool_limits(1):  # one BLAS thread, as each engine worker has
        assert _python_ran_during(run)

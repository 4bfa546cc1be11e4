"""Eigenvalues of a symmetric matrix by a two-stage reduction: stage 1 on the GPU, stages 2 and 3 on the GPU
(:class:`DeviceBands`, the ``_C`` band solver) or on CPU cores (:func:`submit`, LAPACK).

Opt-in for the GPU scan's float64 pass (``SPECTRUM_FAST_TWOSTAGE=gpu`` or ``cpu``, see
:func:`spectrum_fast.cuda_engine.twostage_mode`) until a lent GPU shows it beats ``syevd``
(bench/bench_twostage.py, bench/NOTES-gpu.md), and cuSOLVER's own two-stage ``Xsyevd`` (12.3.4 and newer,
:func:`spectrum_fast.cuda_engine.syevd_algorithm`), which the device call measures beside it. The CPU stage 2 lost on an H100's host (run 3: 0.52x at
k = 4096): LAPACK's band reduction takes 2 s per matrix and core there. The GPU one (csrc/band_solver.h)
chases the bulges of many matrices at once, one thread block each, and finds the eigenvalues of the
tridiagonal matrices by bisection, one thread per eigenvalue.

Why: on an H100 the one-stage eigensolver (``cusolverDnXsyevd``) is the floor of every scan (14.5 s of the
Mistral-7B-shaped scan's 21 s; 193 s of Qwen1.5-110B's 210 s floor). Its tridiagonal reduction is half
matrix-vector products, bound by memory bandwidth. A two-stage reduction does the O(k^3) part as matrix
products (dense to band, bandwidth ``b``: QR of a k x b panel, then a rank-2b update of the trailing
matrix) and leaves an O(k^2 b) part (band to tridiagonal, LAPACK ``dsbevd`` by bulge chasing), which runs
on the CPU cores, one matrix per thread, many at once (called through ctypes, which releases the GIL).

Stage 1 (:func:`band_reduce`) is plain torch, so it runs on the CPU too (the tests), in float32 or float64.
For ``Q = I - V T V^T`` from ``geqrf``'s reflectors, ``T^{-1} = striu(V^T V) + diag(1 / tau)`` (Joffrain et
al., "Accumulating Householder transformations, revisited", 2006), and with ``X = A V T`` the two-sided
update is ``A - V Z^T - Z V^T``, ``Z = X - V (T^T V^T X) / 2``.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np


def band_reduce(a, b: int, qr=None, overwrite: bool = False):
    """Lower band storage ``(b + 1, n)`` (row ``i`` holds the ``i``-th subdiagonal, as LAPACK's ``?sbevd``
    and ``scipy.linalg.eig_banded(lower=True)`` take it) of a band matrix orthogonally similar to the
    symmetric torch tensor ``a`` (only ``a``'s values are used, both triangles; ``a`` is not modified).

    ``a`` may be a batch ``(batch, n, n)``; the bands are then ``(batch, b + 1, n)``. ``qr`` factors the
    batch's panels ``(batch, m, b)`` as ``torch.geqrf`` does (the default); the GPU path passes
    :func:`native_geqrf`, one thread block per panel. Everything else is per matrix (``torch.matmul``
    over a batch runs the same kernel for each matrix), so a matrix's band does not depend on its batch
    as long as ``qr``'s result does not. ``overwrite``: work in ``a`` itself (it is destroyed) instead of a
    copy, which halves the memory a batch needs."""
    import torch

    if a.ndim not in (2, 3) or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"expected a square matrix or a batch of them, got shape {tuple(a.shape)}")
    if b < 1:
        raise ValueError(f"bandwidth must be at least 1, got {b}")
    single = a.ndim == 2
    a = a[None] if single else a
    if not overwrite:
        a = a.clone()
    geqrf = qr or torch.geqrf
    batch, n = a.shape[0], a.shape[-1]
    for j in range(0, n, b):
        m = n - j - b  # rows below the band in this panel's columns
        if m < 2:
            break  # a single row below the band is already inside it after this panel
        qr_, tau = geqrf(a[:, j + b:, j:j + b])
        kk = min(m, b)
        tau = tau[:, :kk]
        v = torch.tril(qr_[:, :, :kk], -1)
        v.diagonal(dim1=-2, dim2=-1).fill_(1)
        # geqrf's "nothing to do" reflector (tau = 0, H = I): a zero column of V with T's diagonal 1 is the
        # same; done without a branch, which would wait for the GPU once per panel
        zero = tau == 0
        v = v * ~zero[:, None, :]
        tau = torch.where(zero, torch.ones_like(tau), tau)
        a[:, j + b:, j:j + b] = 0
        a[:, j + b:j + b + kk, j:j + b] = torch.triu(qr_[:, :kk, :])
        a[:, j:j + b, j + b:] = a[:, j + b:, j:j + b].transpose(1, 2)
        vt = v.transpose(1, 2)
        t_inv = torch.triu(vt @ v, 1) + torch.diag_embed(1 / tau)
        eye = torch.eye(kk, dtype=a.dtype, device=a.device).expand(batch, kk, kk)
        t = torch.linalg.solve_triangular(t_inv, eye, upper=True)
        a22 = a[:, j + b:, j + b:]
        x = a22 @ (v @ t)
        z = x - 0.5 * (v @ (t.transpose(1, 2) @ (vt @ x)))
        a22.baddbmm_(v, z.transpose(1, 2), alpha=-1).baddbmm_(z, vt, alpha=-1)  # no m x m temporaries
    band = torch.zeros(batch, b + 1, n, dtype=a.dtype, device=a.device)
    for i in range(min(b, n - 1) + 1):
        band[:, i, : n - i] = torch.diagonal(a, offset=-i, dim1=-2, dim2=-1)
    return band[0] if single else band


def native_geqrf(panels):
    """``torch.geqrf`` of a batch of float64 panels ``(batch, m, nb)`` by the native panel kernel
    (csrc/band_solver.h ``panel_qr``): one thread block per panel on a GPU, host threads on a CPU."""
    import torch

    if panels.dtype != torch.float64 or panels.ndim != 3:
        raise ValueError(f"panels must be a float64 (batch, m, nb) tensor, got {panels.dtype} {tuple(panels.shape)}")
    batch, m, nb = panels.shape
    # (batch, nb, m): column-major panels, lda = m; a copy even where the transpose is contiguous already (the
    # kernel factors in place, and the input is not to change)
    cols = panels.transpose(1, 2).clone(memory_format=torch.contiguous_format)
    if cols.device.type == "cuda":
        tau = torch.empty(batch, nb, dtype=cols.dtype, device=cols.device)
        _native().panel_qr_cuda(cols.device.index or 0, cols.data_ptr(), batch, nb * m, m, nb, m, tau.data_ptr(),
                                torch.cuda.current_stream(cols.device).cuda_stream, 1024 if m > 512 else 256)
    else:
        out, tau_np = _native().panel_qr_host(cols.numpy(), m, 2)
        cols, tau = torch.from_numpy(out), torch.from_numpy(tau_np)
    return cols.transpose(1, 2), tau


def stage2_backend() -> str:
    """What computes stage 2 here (for benchmarks and diagnostics)."""
    from . import lapack

    fn, where = lapack.sbevd_routine()
    return where if fn is not None else f"{where}: scipy's eig_banded, one at a time"


def band_eigenvalues(band: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of a symmetric band matrix in lower band storage (stage 2: LAPACK ``dsbevd``,
    values only, on the CPU). Raises ``numpy.linalg.LinAlgError`` if it does not converge."""
    from . import lapack

    w = lapack.sbevd(band)
    if w is None:
        from scipy.linalg import eig_banded

        return eig_banded(np.ascontiguousarray(band, dtype=np.float64), lower=True, eigvals_only=True,
                          overwrite_a_band=True, check_finite=False)
    return w


def eigenvalues(a, b: int = 64) -> np.ndarray:
    """Both stages in this thread: ascending eigenvalues of the symmetric torch tensor ``a``."""
    return band_eigenvalues(band_reduce(a, b).cpu().numpy())


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def pool(threads: int) -> ThreadPoolExecutor:
    """The threads that run stage 2 (``dsbevd`` through ctypes releases the GIL, so they run at once)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != threads:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(threads, thread_name_prefix="spectrum_fast-band")
            _POOL_SIZE = threads
        return _POOL


def submit(a, b: int, threads: int) -> Future:
    """Stage 1 here (on ``a``'s device), stage 2 in the pool: a future of the ascending eigenvalues."""
    band = band_reduce(a, b).to("cpu", copy=True).numpy()
    return pool(threads).submit(band_eigenvalues, band)


def band_storage(bands, ld: int):
    """The band solver's layout (csrc/band_solver.h) of lower bands ``(..., b + 1, n)`` from
    :func:`band_reduce`: ``(..., n, ld)``, row ``q`` holding column ``q`` from the diagonal down, zero beyond."""
    out = bands.new_zeros(*bands.shape[:-2], bands.shape[-1], ld)
    out[..., : bands.shape[-2]] = bands.transpose(-1, -2)
    return out


def _native():
    from . import _C  # type: ignore[attr-defined]

    return _C


def band_threads(b: int) -> int:
    """Threads per bulge-chasing block: one per row of a reflector, whole warps (32 for b <= 32: a single
    warp, whose barriers cost next to nothing)."""
    return 32 * max(1, -(-b // 32))


#: The bulge chasing's variant (csrc/band_solver.h), bit flags: 1 = kLaneDot (the left update's dot products a
#: thread per column, no chain of warp reductions), 2 = kBatched (four loads in flight per thread in the
#: updates), 4 = kCrews (each warp of a block chases its own sweep, :data:`CREWS` at once, three steps apart:
#: a chase takes a quarter of the steps, with the numbers of one warp alone). ``bench/bench_twostage.py``
#: times them; ``SPECTRUM_FAST_CHASE`` overrides this (:func:`spectrum_fast.cuda_engine.chase_variant`).
CHASE_VARIANT = 7
CHASE_VARIANTS = tuple(range(8))
CREWS_BIT = 4  # kCrews
CREWS = 4  # warps per block with kCrews


def chase_threads(b: int, variant: int) -> int:
    """Threads per block of the band solver: :data:`CREWS` warps with kCrews, else :func:`band_threads`."""
    return 32 * CREWS if variant & CREWS_BIT else band_threads(b)


def launch_bands(storage, b: int, stream, threads: int | None = None, variant: int = CHASE_VARIANT):
    """Queue the native band solver on ``stream`` (after what the current stream has queued) for band matrices
    in its layout ``(batch, n, ld)`` on a GPU (overwritten); returns ``(eigenvalues (batch, n), work area)``,
    allocated on ``stream``: read the eigenvalues once it is done. Dropping ``storage`` or the work area
    early is safe (``record_stream``, and stream-ordered reuse on ``stream``). ``variant``: the chase's
    (:data:`CHASE_VARIANT`)."""
    import torch

    if storage.dtype != torch.float64 or not storage.is_contiguous() or storage.ndim != 3:
        raise ValueError(f"bands must be a contiguous float64 (batch, n, ld) tensor, got {storage.dtype} "
                         f"{tuple(storage.shape)}")
    batch, n, ld = storage.shape
    stream.wait_stream(torch.cuda.current_stream(storage.device))  # storage is written on the current stream
    storage.record_stream(stream)  # not reused before the kernels are done, even if dropped sooner
    with torch.cuda.stream(stream):
        work = torch.empty(batch, 2 * n, dtype=torch.float64, device=storage.device)
        w = torch.empty(batch, n, dtype=torch.float64, device=storage.device)
        _native().band_eigenvalues_cuda(storage.device.index or 0, storage.data_ptr(), batch, n * ld, n, b, ld,
                                        work.data_ptr(), w.data_ptr(), stream.cuda_stream,
                                        threads or chase_threads(b, variant), variant)
    return w, work


class DeviceBands:
    """Stages 1 to 3 on the GPU: :meth:`run` reduces a batch of same-size matrices to bands now (stage 1:
    torch matrix products and the native panel QR) and keeps the bands; once ``launch_at`` bands of one
    size are kept (by default four per multiprocessor), the band solver (stages 2 and 3) is queued for
    exactly that many on a side stream and :meth:`run` returns at once; :meth:`finished` hands back what is done
    (``wait=True`` launches the rest too and waits). Each band's bulge chasing is a long chain of small
    steps in one thread block, so the solver needs many bands in one launch to fill the GPU, and runs
    beside the next matrices' reading and stage 1. A matrix's eigenvalues depend on it and its stage-1
    batch alone, never on what shares a solver launch. On a CPU torch device (the tests) the same native
    code runs on host threads, at once."""

    STREAMS = 4
    BLOCKS_PER_SM = 4  # a chase is latency-bound: several share a multiprocessor

    def __init__(self, device, band: int = 32, threads: int | None = None, launch_at: int | None = None,
                 variant: int = CHASE_VARIANT):
        import torch

        self.device = torch.device(device)
        self.band = band
        self.variant = variant
        self.threads = threads or chase_threads(band, variant)
        on_gpu = self.device.type == "cuda"
        if launch_at is None:
            launch_at = self.full_launch(self.device, band, self.threads, variant) if on_gpu else 1
        self.launch_at = max(1, launch_at)
        self._kept: dict[int, list[tuple[list, object, object]]] = {}  # n -> [(keys, storage, scales)]
        self._inflight: list[tuple[object, list, object, object]] = []  # (event, keys, w, scales)
        self._streams = [torch.cuda.Stream(self.device) for _ in range(self.STREAMS)] if on_gpu else []
        self._next = 0

    @classmethod
    def full_launch(cls, device, band: int, threads: int, variant: int) -> int:
        """Bands per launch on a GPU: :attr:`BLOCKS_PER_SM` per multiprocessor, or as many as it holds at once
        if that is fewer (a second wave would double the launch's time)."""
        import torch

        device = torch.device(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        held = _native().band_solver_occupancy(index, band, threads, variant)
        return max(1, min(cls.BLOCKS_PER_SM, held)) * torch.cuda.get_device_properties(index).multi_processor_count

    def run(self, keys: list, a) -> None:
        """Stage 1 of the symmetric float64 matrices ``a`` ``(batch, n, n)`` on this device now (``a`` is
        consumed); ``keys[i]`` comes back with ``a[i]``'s eigenvalues from :meth:`finished`. A zero or
        non-finite matrix comes back as NaN (the caller judges those by their own largest entry)."""
        import torch

        scales = torch.maximum(a.amax(dim=(1, 2)), -a.amin(dim=(1, 2)))  # entries of order one; no |a| copy
        a /= scales[:, None, None]
        storage = band_storage(band_reduce(a, self.band, qr=native_geqrf, overwrite=True), 2 * self.band)
        del a
        n = storage.shape[1]
        kept = self._kept.setdefault(n, [])
        kept.append((keys, storage, scales))
        while sum(len(k) for k, _, _ in self._kept.get(n, [])) >= self.launch_at:
            self._launch(n, self.launch_at)

    def _launch(self, n: int, count: int | None = None) -> None:
        """Queue the solver for the first ``count`` kept bands of size ``n`` (all by default); the rest stay
        kept. Exactly ``launch_at`` per launch on a GPU: one band more than it holds at once would start a
        second wave and double the launch's time."""
        import torch

        kept = self._kept.pop(n, [])
        if not kept:
            return
        keys = [k for ks, _, _ in kept for k in ks]
        storage = torch.cat([s for _, s, _ in kept]) if len(kept) > 1 else kept[0][1]
        scales = torch.cat([c for _, _, c in kept])
        del kept
        if count is not None and count < len(keys):
            # the remainder is copied: a view would keep the whole concatenation alive after the launch
            self._kept[n] = [(keys[count:], storage[count:].clone(), scales[count:].clone())]
            keys, storage, scales = keys[:count], storage[:count], scales[:count]
        if self.device.type != "cuda":
            w = torch.from_numpy(_native().band_eigenvalues_host(storage.numpy(), self.band, 2, 1, self.variant))
            self._inflight.append((None, keys, w, scales))
            return
        stream = self._streams[self._next % len(self._streams)]
        self._next += 1
        w, _ = launch_bands(storage, self.band, stream, self.threads, self.variant)  # safe to drop the bands
        event = torch.cuda.Event()
        event.record(stream)
        self._inflight.append((event, keys, w, scales))

    def launch_kept(self) -> None:
        """Launch every band still kept, however few (a scan's end)."""
        for n in list(self._kept):
            self._launch(n)

    def finished(self, wait: bool = False) -> list[tuple[object, np.ndarray]]:
        """``(key, ascending eigenvalues)`` of every launch that is done; with ``wait``, the kept bands are
        launched too and everything is waited for."""
        if wait:
            self.launch_kept()
        out, still = [], []
        for item in self._inflight:
            event, keys, w, scales = item
            try:
                if event is not None and not wait and not event.query():
                    still.append(item)
                    continue
                if event is not None:
                    event.synchronize()
                lam = (w * scales[:, None]).cpu().numpy()
            except RuntimeError as e:  # a kernel's fault surfaces here, asynchronously: say whose launch it was
                self._inflight = []
                raise LaunchError(keys, e) from None
            out.extend(zip(keys, lam))
        self._inflight = still
        return out


class LaunchError(RuntimeError):
    """A band-solver launch failed; ``keys`` are the keys :meth:`DeviceBands.run` was given for its bands."""

    def __init__(self, keys: list, error: Exception):
        super().__init__(f"band solver launch of {len(keys)} matrices: {error}")
        self.keys = keys

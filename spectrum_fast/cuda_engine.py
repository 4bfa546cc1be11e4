"""The GPU path of ``scan()``: the native engine (``spectrum_fast._C``) computes Gram eigenvalues, Python
applies the same accuracy guard as on the CPU (:func:`spectrum_fast.cpu_engine.stats_from_gram`).

Per matrix: fp32 Gram + ``cusolverDnXsyevd`` on the GPU; if the guard cannot vouch for the result, the
matrix goes through the engine again in float64; if that fails too, the CPU computes its float64 SVD.
Large matrices (``k >= 4096`` by default, :func:`fp64_min_k`) skip the fp32 attempt and go straight to
float64: on an H100 nearly all of them failed the fp32 guard, and the attempt then only adds its cost.
Matrices whose largest entry lies outside the range where an fp32 Gram matrix is safe from overflow and
underflow, or that are all zero or not finite, are handed to the CPU engine, which handles them.

Several GPUs: one engine and one thread per device, matrices dealt out by :mod:`spectrum_fast.scheduling`.
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from .checkpoint import TensorInfo, read_matrix, read_stored, scale_layout
from .cpu_engine import (
    _SAFE_EXP,
    METHOD_GRAM32,
    METHOD_GRAM64,
    STATUS_OK,
    MatrixStats,
    matrix_stats,
    stats_from_gram,
)
from .errors import SpectrumError
from .scheduling import band_units, batch_units, group_units, plan

_EPS32 = float(np.finfo(np.float32).eps)
_EPS64 = float(np.finfo(np.float64).eps)
#: The guard's error model (:func:`~spectrum_fast.cpu_engine.stats_from_gram`) was fitted to LAPACK on the
#: CPU, whose largest measured eigenvalue error is 0.29 of it. cuBLAS + cuSOLVER on an H100 reached 1.72 of
#: it (square bf16 matrices at k = 1024, 4096 and 8192, bench/results/guard_gpu.json), so on the GPU the
#: model is widened 6x: the CPU's 3.4x margin again. Cheap where it bites: at k = 1024 the float64 pass
#: costs what the fp32 one does on an H100, and from k = 4096 on matrices go to float64 first anyway.
GPU_ERROR_SCALE = 6.0
# Tasks per engine call: progress is reported between calls, the engine pipelines within one.
_CHUNK_BYTES = 1 << 30
#: Stored dtypes the native engine widens itself (FP8 times its scalar, per-row or block scale); F64
#: goes through the CPU.
ENGINE_DTYPES = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_SCALE_DTYPES = ("F32", "F16", "BF16")


def engine_takes(info: TensorInfo) -> bool:
    """Whether the native engine computes this matrix (else the CPU engine does: empty ones, which get
    their status there, F64, and FP8 whose scale does not fit)."""
    if info.dtype not in ENGINE_DTYPES or min(info.shape) == 0:
        return False
    return info.scale is None or (info.scale.dtype in _SCALE_DTYPES and scale_layout(info) is not None)


def _task(info: TensorInfo) -> tuple:
    """The engine's work item: where the bytes are, what they are, and for FP8 how to scale them."""
    scale = None
    if info.scale is not None:
        layout = scale_layout(info)
        assert layout is not None  # engine_takes() checked it
        kind, block = layout
        sc = info.scale
        scale_cols = -(-info.shape[1] // block) if kind == "block" else 1
        scale = (str(sc.file), sc.offset, sc.nbytes, sc.dtype, kind, block, scale_cols)
    return (str(info.file), info.offset, info.nbytes, info.dtype, info.shape[0], info.shape[1], scale)


def _chunks(infos: list[TensorInfo], units: dict[str, int]) -> list[list[TensorInfo]]:
    """Engine calls of about ``_CHUNK_BYTES``; a unit is never cut."""
    chunks: list[list[TensorInfo]] = [[]]
    size = 0
    for group in group_units(infos, units):
        nbytes = sum(i.nbytes for i in group)
        if chunks[-1] and size + nbytes > _CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].extend(group)
        size += nbytes
    return [c for c in chunks if c]


def _for_cpu(amax: float) -> bool:
    """A matrix whose largest entry is this is zero, not finite, or scaled outside the range where a Gram
    matrix is safe from overflow and underflow: the CPU engine has the exact handling."""
    return not math.isfinite(amax) or amax == 0.0 or abs(math.frexp(amax)[1]) > _SAFE_EXP


def _judge(info: TensorInfo, lam: np.ndarray, amax: float, info_code: int, eps: float) -> MatrixStats | None:
    """Statistics from engine output if they can be trusted, else None (recompute elsewhere)."""
    if _for_cpu(amax) or info_code != 0:
        return None
    m, n = info.shape
    stats = stats_from_gram(lam, float(lam.sum()), eps * GPU_ERROR_SCALE, m, n)
    if stats is None:
        return None
    return MatrixStats(STATUS_OK, METHOD_GRAM32 if eps == _EPS32 else METHOD_GRAM64, stats)


def fp64_min_k() -> int:
    """Matrices with ``k = min(m, n)`` at least this go straight to the float64 engine pass.

    fp32 first costs ``t32 + p * t64`` against ``t64`` for float64 alone, where ``p`` is the share of
    matrices whose fp32 result the guard cannot vouch for. Measured on an H100 (bench/results/): ``t32 / t64``
    is 0.85 at k = 4096 and 8192 and 0.67 at 16384, so float64 alone wins once ``p`` passes 0.15 to 0.33;
    ``p`` was 159 of 160 at k = 4096 (Mistral-7B shapes, bf16) and every matrix at k = 8192 and 16384
    (Qwen1.5-110B and Llama-3.1-405B shapes), against none at k = 1024. A fixed rule, not one learned
    during the scan, so which route a matrix takes never depends on which matrices came before it (as in a
    resumed or multi-GPU scan). ``SPECTRUM_FAST_FP64_MIN_K`` overrides it; 0 turns it off."""
    try:
        k = int(os.environ.get("SPECTRUM_FAST_FP64_MIN_K", "4096"))
    except ValueError:
        raise SpectrumError("SPECTRUM_FAST_FP64_MIN_K must be an integer") from None
    return max(0, k)


#: The first cuSOLVER with ``CUSOLVERDN_SYEVD`` algorithm options (CUDA 13.4 Update 1).
SYEVD_ALG_MIN_CUSOLVER = 12304


def syevd_algorithm() -> tuple[int, int]:
    """``(alg, min_k)``: the algorithm ``cusolverDnXsyevd`` runs for matrices with ``k >= min_k``
    (``SPECTRUM_FAST_SYEVD_ALG``: ``ALG`` or ``ALG:MIN_K``; default ``0``, cuSOLVER's own choice).

    ``1`` is the one-stage tridiagonal reduction, memory-bound (run 3 on an H100 measured ``Dsyevd`` at
    0.118 s for k = 4096); ``2`` the two-stage one, dense to band with GEMMs, then band to tridiagonal, which
    cuSOLVER offers from 12.3.4 (CUDA 13.4 Update 1), where ``0`` becomes its own choice by size and
    architecture. Both change the last bits of the eigenvalues, so a journal records the setting. Off by
    default until ``bench/bench_gpu.py`` measures them on a GPU (``per_matrix_syevd_alg``)."""
    flag = os.environ.get("SPECTRUM_FAST_SYEVD_ALG", "0").strip()
    alg_text, _, min_k_text = flag.partition(":")
    try:
        alg, min_k = int(alg_text or "0"), int(min_k_text or "0")
    except ValueError:
        alg, min_k = -1, 0
    if alg not in (0, 1, 2) or min_k < 0:
        raise SpectrumError(f"SPECTRUM_FAST_SYEVD_ALG must be 0, 1 or 2, optionally with :MIN_K (as 2:4096), "
                            f"got {flag!r}")
    return alg, min_k


def _check_syevd(syevd: tuple[int, int]) -> None:
    """Refuse an ``Xsyevd`` algorithm this cuSOLVER does not offer, before any engine starts."""
    from . import _C  # type: ignore[attr-defined]

    if syevd[0]:
        built, loaded = _C.cusolver_header_version(), _C.cusolver_version()
        if min(built, loaded) < SYEVD_ALG_MIN_CUSOLVER:
            raise SpectrumError(f"SPECTRUM_FAST_SYEVD_ALG={syevd[0]} needs cuSOLVER 12.3.4 (CUDA 13.4 Update 1) or "
                                f"newer; this one is {loaded} (the extension was built with {built})")


def _engine(device: int, syevd: tuple[int, int]):
    """The native engine on ``device``, its ``Xsyevd`` algorithm set (:func:`syevd_algorithm`)."""
    from . import _C  # type: ignore[attr-defined]

    engine = _C.GramEngine(device)
    if syevd[0]:
        engine.set_syevd_algorithm(*syevd)
    return engine


def twostage_mode() -> str:
    """Which eigensolver takes the float64 pass of F32/F16/BF16 matrices: ``"off"`` (the engine's ``Dsyevd``,
    the default), ``"gpu"`` or ``"cpu"`` (:mod:`spectrum_fast.twostage`).

    ``SPECTRUM_FAST_TWOSTAGE=gpu`` (or ``1``): the float64 Gram matrix, its reduction to a band (torch) and
    the band's eigenvalues (the ``_C`` band solver: bulge chasing and bisection, many matrices at once), all
    on the GPU. ``=cpu``: the band's eigenvalues by LAPACK on the CPU cores instead (one thread per core,
    divided among the ranks of a torchrun job; ``SPECTRUM_FAST_TWOSTAGE_THREADS`` sets the count); on an
    H100's host it was 0.52x ``Dsyevd`` at k = 4096 (bench/NOTES-gpu.md, run 3). Off until a GPU
    measurement shows one faster (bench/bench_twostage.py)."""
    flag = os.environ.get("SPECTRUM_FAST_TWOSTAGE", "0").strip().lower()
    if flag in ("", "0", "off", "no", "false"):
        return "off"
    mode = {"1": "gpu", "on": "gpu", "yes": "gpu", "true": "gpu", "gpu": "gpu", "cpu": "cpu"}.get(flag)
    if mode is None:
        raise SpectrumError(f"SPECTRUM_FAST_TWOSTAGE must be 0, gpu or cpu (1 means gpu), got {flag!r}")
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise SpectrumError("SPECTRUM_FAST_TWOSTAGE needs PyTorch (its band reduction runs in torch)")
    return mode


def chase_variant() -> int:
    """The GPU band solver's bulge-chasing variant (:data:`spectrum_fast.twostage.CHASE_VARIANT`, csrc/band_solver.h);
    ``SPECTRUM_FAST_CHASE`` (0-7) picks another, for benchmarks. Variants differ in speed and in the last bits of
    the numbers, so a journal records it."""
    from .twostage import CHASE_VARIANT, CHASE_VARIANTS

    flag = os.environ.get("SPECTRUM_FAST_CHASE", "").strip()
    if not flag:
        return CHASE_VARIANT
    if flag not in {str(v) for v in CHASE_VARIANTS}:
        raise SpectrumError(f"SPECTRUM_FAST_CHASE must be one of {', '.join(map(str, CHASE_VARIANTS))}, got {flag!r}")
    return int(flag)


def twostage_threads() -> int:
    """CPU threads for ``SPECTRUM_FAST_TWOSTAGE=cpu``'s band eigenvalues, 0 in the other modes."""
    if twostage_mode() != "cpu":
        return 0
    try:
        threads = int(os.environ.get("SPECTRUM_FAST_TWOSTAGE_THREADS", "0"))
    except ValueError:
        raise SpectrumError("SPECTRUM_FAST_TWOSTAGE_THREADS must be an integer") from None
    if threads <= 0:
        from .distributed import cores_per_rank

        threads = cores_per_rank()
    return threads


_TWOSTAGE_BAND = 64  # the CPU stage 2's bandwidth (run 3)
_DEVICE_BAND = 32  # the GPU band solver's: its steps cost ~b^2 each, n^2 / 2b of them in a row
#: Raised whenever a change moves the last bits of any GPU result (a kernel's rounding, how matrices are
#: grouped into batched calls): a scan journal written before it then starts over instead of mixing both.
#: 2: the band solver's explicit roundings (rank2_entry), two-stage units kept out of batched units, and the
#: two-stage route's symmetric Gram split (:func:`_gram`).
SOLVER_REVISION = 2

#: Float64 bytes the GPU two-stage solver reduces at once: Gram matrices of one unit and stage 1's copy.
BAND_BATCH_BYTES = 4 << 30


def band_batch(k: int) -> int:
    """Matrices of size ``k`` per stage-1 batch of the GPU two-stage solver (16 at k = 4096, 4 at 8192,
    1 from 11586 on): enough to amortize stage 1's per-panel launches, bounded in memory."""
    return max(1, min(32, BAND_BATCH_BYTES // (16 * k * k)))


def scan_units(infos: Sequence[TensorInfo]) -> dict[str, int]:
    """The GPU's batched calls for a whole scan, from the checkpoint and the settings alone (every rank deals
    by them): the batched solver's (:func:`batch_units`) and, with ``SPECTRUM_FAST_TWOSTAGE=gpu``, the two-stage
    solver's stage-1 batches of the matrices that go straight to float64 (:func:`band_units`)."""
    infos = [i for i in infos if engine_takes(i)]
    big = fp64_min_k()
    straight: list[TensorInfo] = []
    if big and twostage_mode() == "gpu":  # these never meet the batched solver, whatever its size limit
        straight = [i for i in infos if min(i.shape) >= big and _twostage_takes(i)]
        taken = {i.name for i in straight}
        infos = [i for i in infos if i.name not in taken]
    units = batch_units(infos, batched_max_k(), BATCH)
    units.update(band_units(straight, band_batch, first=max(units.values(), default=-1) + 1))
    return units


_TWOSTAGE_DTYPES = ("F32", "F16", "BF16")
_TORCH_DEVICE: str | None = None  # tests run the two-stage path on the CPU; None: the engine's GPU


def _twostage_takes(info: TensorInfo) -> bool:
    return info.dtype in _TWOSTAGE_DTYPES and info.scale is None


def _read_host(info: TensorInfo, pin: bool):
    """The stored values in host memory: a numpy array, or with ``pin`` a pinned uint8 tensor (its copy to
    the GPU then needs no wait: a pageable one waits for everything queued before it)."""
    if not pin:
        return read_stored(info)
    import torch

    buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True)
    read_stored(info, out=buf.numpy())
    return buf


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _device_matrix(info: TensorInfo, dev, raw=None):
    """The stored F32/F16/BF16 values (``raw`` from :func:`_read_host`, read here if not given) on the
    device, widened to float64 there (not on the CPU)."""
    import torch

    raw = read_stored(info) if raw is None else raw
    if not isinstance(raw, torch.Tensor):
        raw = torch.from_numpy(raw.view(np.uint8))
    # the bytes, reinterpreted as the stored dtype; from pinned memory the copy does not wait
    t = raw.view(getattr(torch, _TORCH_DTYPES[info.dtype])).to(dev, non_blocking=True)
    return t.to(torch.float64).reshape(info.shape)


#: Levels of the symmetric split in :func:`_gram`: each halves the columns of the diagonal blocks, whose
#: upper halves are then mirrored instead of computed; 3 levels do 9/16 of a full product's flops.
GRAM_LEVELS = 3
_GRAM_MIN_COLUMNS = 256  # narrower blocks are one product: a GEMM that small runs far below peak


def _gram(w, out=None):
    """The Gram matrix on ``w``'s smaller side (into ``out`` when given), symmetric to the bit: the diagonal
    blocks recursively (:data:`GRAM_LEVELS`), each lower off-diagonal block by one matrix product and
    mirrored into the upper one (the smallest diagonal blocks too). Every entry is still one dot product of
    two columns, as in ``w.T @ w``; torch has no SYRK, and this does 9/16 of its flops."""
    import torch

    x = w if w.shape[0] >= w.shape[1] else w.T  # G = x^T x, x tall
    k = x.shape[1]
    g = out if out is not None else torch.empty(k, k, dtype=w.dtype, device=w.device)
    _gram_into(x, g, GRAM_LEVELS)
    return g


def _gram_split(k: int, levels: int) -> int:
    """Where :func:`_gram` splits ``k`` columns at this level: the width of the first half, 0 for one product."""
    return 0 if levels <= 0 or k < 2 * _GRAM_MIN_COLUMNS else k // 2


def gram_flops(rows: int, k: int, levels: int | None = None) -> int:
    """Floating-point operations of :func:`_gram`'s products for a ``rows x k`` (tall) matrix: ``2 rows k^2``
    for a plain product, 9/16 of it at 3 levels once k is wide enough."""
    levels = GRAM_LEVELS if levels is None else levels
    h = _gram_split(k, levels)
    if not h:
        return 2 * rows * k * k
    return gram_flops(rows, h, levels - 1) + gram_flops(rows, k - h, levels - 1) + 2 * rows * h * (k - h)


def _gram_into(x, g, levels: int) -> None:
    import torch

    h = _gram_split(x.shape[1], levels)
    if not h:
        torch.matmul(x.T, x, out=g)
        g.copy_(torch.tril(g) + torch.tril(g, -1).mT)  # a GEMM's x^T x need not be symmetric to the bit
        return
    _gram_into(x[:, :h], g[:h, :h], levels - 1)
    _gram_into(x[:, h:], g[h:, h:], levels - 1)
    torch.matmul(x[:, h:].T, x[:, :h], out=g[h:, :h])
    g[:h, h:].copy_(g[h:, :h].T)


def _amax(w):
    """Largest ``|w|`` as a device scalar, without a copy of ``|w|`` (NaN and Inf come through)."""
    import torch

    return torch.maximum(w.amax(), -w.amin())


def _which(infos: Sequence[TensorInfo]) -> str:
    """The first few of these tensors and their file, for error messages."""
    names = ", ".join(i.name for i in infos[:3]) + (" ..." if len(infos) > 3 else "")
    return f"{names} ({infos[0].file})"


def _twostage_run(device: int, infos: list[TensorInfo], threads: int) -> list:
    """The engine's float64 output, ``(ascending Gram eigenvalues, amax, info)`` per matrix, by the two-stage
    solver: each matrix's stage 1 on the GPU while the CPU threads work on the ones before it. A band that
    LAPACK cannot solve gets info 1, like a non-converged ``Dsyevd``: the CPU's float64 SVD takes it."""
    import torch

    from . import twostage

    dev = torch.device(_TORCH_DEVICE) if _TORCH_DEVICE else torch.device("cuda", device)
    pending: list = []
    try:
        for info in infos:
            if _STOP.is_set():
                raise KeyboardInterrupt
            w = _device_matrix(info, dev)
            amax = float(_amax(w))
            k = min(info.shape)
            if _for_cpu(amax):
                pending.append((None, k, amax))  # _judge hands it to the CPU engine
                continue
            g = _gram(w)
            del w
            pending.append((twostage.submit(g, _TWOSTAGE_BAND, threads), k, amax))
        out = []
        for f, k, amax in pending:
            try:
                out.append((np.asarray(f.result(), dtype=np.float64), amax, 0) if f is not None
                           else (np.zeros(k), amax, 0))
            except np.linalg.LinAlgError:
                out.append((np.zeros(k), amax, 1))
        return out
    except RuntimeError as e:  # CUDA errors
        raise SpectrumError(f"two-stage eigensolver on {dev} failed on {_which(infos)}: {e}") from None
    finally:
        for f, _, _ in pending:
            if f is not None:
                f.cancel()  # no-op for the finished ones; on errors and Ctrl-C, the queued ones do not run


def _read_ahead(infos: Sequence[TensorInfo], depth: int = 3, threads: int = 2, pin: bool = False):
    """``(info, stored values)`` in order (:func:`_read_host`), the next ``depth`` read by ``threads``
    background threads (file reads release the GIL; one thread copies a page-cached file at only a few
    GB/s) while the caller works on the GPU."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="spectrum_fast-read") as pool:
        ahead = deque(pool.submit(_read_host, i, pin) for i in infos[:depth])
        try:
            for index, info in enumerate(infos):
                raw = ahead.popleft().result()
                if index + depth < len(infos):
                    ahead.append(pool.submit(_read_host, infos[index + depth], pin))
                yield info, raw
        finally:
            for f in ahead:
                f.cancel()


def _bands_submit(solver, infos: list[TensorInfo], units: dict[str, int]) -> None:
    """Reduce these matrices' float64 Gram matrices to bands on the GPU and queue the band solver, a unit
    (:func:`scan_units`) per batch; :func:`_bands_done` delivers them."""
    import torch

    groups = group_units(infos, units)
    # nothing here waits for the GPU: pinned reads copy asynchronously, and each matrix's largest entry
    # stays on the device until its eigenvalues are delivered (a zero, non-finite or out-of-range matrix
    # gives NaN or garbage there, and :func:`_judge` sends it to the CPU engine by that largest entry)
    reads = _read_ahead([i for g in groups for i in g], pin=solver.device.type == "cuda")
    group = infos
    try:
        for group in groups:
            k = min(group[0].shape)  # a unit's members share a shape
            grams = torch.empty(len(group), k, k, dtype=torch.float64, device=solver.device)
            keys = []
            for index, (info, raw) in enumerate(next(reads) for _ in group):
                if _STOP.is_set():
                    raise KeyboardInterrupt
                w = _device_matrix(info, solver.device, raw)
                del raw
                _gram(w, out=grams[index])
                keys.append((info, _amax(w)))
                del w
            solver.run(keys, grams)
            del grams
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        # a band-solver launch queued earlier may be what failed (its kernels run asynchronously)
        raise SpectrumError(f"two-stage eigensolver on {solver.device} failed on {_which(group)}"
                            f" (or on a band-solver launch still running): {e}") from None
    finally:
        reads.close()  # stops the read-ahead on errors and Ctrl-C


def _bands_done(solver, done: Callable[[TensorInfo, MatrixStats], None], wait: bool,
                reread: Callable[[TensorInfo], np.ndarray] = read_matrix) -> None:
    """Deliver the band solver's finished matrices (all of them when ``wait``); one the float64 guard cannot
    vouch for goes to the CPU engine, its values read again by ``reread`` (its file may be gone: a Hub scan
    deletes a shard once scanned, and a band may finish shards later, see :class:`Session`)."""
    from .twostage import LaunchError

    try:
        finished = [(info, lam, float(amax)) for (info, amax), lam in solver.finished(wait)]
    except LaunchError as e:  # a CUDA fault is sticky: the first launch waited for reports it, whoever caused it
        raise SpectrumError(f"two-stage eigensolver on {solver.device} failed on "
                            f"{_which([info for info, _ in e.keys])} (or on GPU work queued before it): {e}") from None
    except RuntimeError as e:
        raise SpectrumError(f"two-stage eigensolver on {solver.device} failed: {e}") from None
    for info, lam, amax in finished:
        out = _judge(info, lam, amax, 0, _EPS64)
        done(info, out if out is not None else matrix_stats(reread(info)))


#: Matrices per batched solver call (a unit of :func:`~spectrum_fast.scheduling.batch_units`).
BATCH = 64
_STOP = threading.Event()  # set when the main thread is interrupted: the device threads stop too


def batched_max_k() -> int:
    """Same-shape matrices with ``k`` up to this go through ``run_batched`` (strided-batched GEMM and
    ``cusolverDnXsyevBatched``), the rest through ``run``. Default 2048: on an H100, 32 same-shape bf16
    matrices went 9x faster batched at k = 256, 3.3x at 512, 2.3x at 1024 and 1.2x at 2048
    (bench/results/gpu_check.json). ``SPECTRUM_FAST_BATCHED_MAX_K`` overrides it; 0 turns batching off."""
    try:
        return max(0, int(os.environ.get("SPECTRUM_FAST_BATCHED_MAX_K", "2048")))
    except ValueError:
        raise SpectrumError("SPECTRUM_FAST_BATCHED_MAX_K must be an integer") from None


def _engine_run(engine, infos: list[TensorInfo], fp64: bool, units: dict[str, int]) -> list:
    """The engine's results, with its errors (CUDA, cuSOLVER, short reads) as user errors naming tensors."""
    try:
        groups = group_units(infos, units)
        out: dict[str, tuple] = {}
        for group in (g for g in groups if len(g) > 1):
            out.update(zip((i.name for i in group), engine.run_batched(
                [_task(i) for i in group], fp64=fp64, batch=BATCH, should_stop=_STOP.is_set)))
        rest = [g[0] for g in groups if len(g) == 1]  # alone, or the one member of its unit in ``infos``
        if rest:
            out.update(zip((i.name for i in rest), engine.run([_task(i) for i in rest], fp64=fp64,
                                                              should_stop=_STOP.is_set)))
        return [out[i.name] for i in infos]
    except RuntimeError as e:
        raise SpectrumError(f"CUDA engine on GPU {engine.device} failed on {_which(infos)}: {e}") from None


#: Most threads and the piece size of the read-ahead into the page cache (:func:`_warm`): one sequential
#: stream leaves a drive's queue nearly empty; a few pieces in flight, in file order, keep it busy.
WARM_THREADS = 4
_WARM_PIECE = 32 << 20


def warm_threads() -> int:
    """The read-ahead's threads in this process: a quarter of its cores (:func:`distributed.cores_per_rank`:
    affinity, cgroup quota, shared among the torchrun ranks of the machine), 1 to :data:`WARM_THREADS`. One
    on small machines, where readers compete with the rest of the scan for cores: on the 2-core dev machine 4
    threads were 0.94x one (bench/bench_readahead.py); a 16-core GPU host alone gets 4 (bench_scale.py
    measures the disk both ways), 8 ranks there 1 each, still 8 pieces in flight on the shared drive."""
    from .distributed import cores_per_rank

    return max(1, min(WARM_THREADS, cores_per_rank() // 4))


def _warm(infos: list[TensorInfo], stop: threading.Event, threads: int | None = None) -> int:
    """Read these tensors' bytes (and their scales') once and drop them, so that the engine finds them in
    the page cache; returns the bytes read. The engine overlaps reading with compute only inside one
    ``run`` call; this carries the overlap across calls (a 100B model's matrices are one per call). Pieces
    of ``_WARM_PIECE`` bytes are read by ``threads`` (:func:`warm_threads`) threads, taken in file order. A
    tensor that cannot be read is skipped: the engine reports it."""
    from concurrent.futures import ThreadPoolExecutor

    pieces = [(t.file, off, min(_WARM_PIECE, t.offset + t.nbytes - off))
              for info in infos for t in ((info, info.scale) if info.scale is not None else (info,))
              for off in range(t.offset, t.offset + t.nbytes, _WARM_PIECE)]
    local = threading.local()

    def read(piece: tuple) -> int:
        path, offset, left = piece
        if stop.is_set() or _STOP.is_set():
            return 0
        if not hasattr(local, "buf"):
            local.buf = memoryview(bytearray(min(_WARM_PIECE, 16 << 20)))
        done = 0
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return 0
        try:
            while left > 0 and not (stop.is_set() or _STOP.is_set()):
                n = os.preadv(fd, [local.buf[: min(left, len(local.buf))]], offset + done)
                if n <= 0:
                    break  # a truncated file: what is there
                left -= n
                done += n
        except OSError:
            pass
        finally:
            os.close(fd)
        return done

    workers = max(1, threads or warm_threads())
    if workers == 1 or len(pieces) < 2:
        return sum(read(piece) for piece in pieces)
    with ThreadPoolExecutor(workers, thread_name_prefix="spectrum_fast-warm") as pool:
        return sum(pool.map(read, pieces))


def _run_device(engine, infos: list[TensorInfo], done: Callable[[TensorInfo, MatrixStats], None],
                big: int, units: dict[str, int], threads: int = 0, solver=None,
                reread: Callable[[TensorInfo], np.ndarray] = read_matrix) -> None:
    """One device's share: fp32 first below ``k = big``, then float64, then the CPU's float64 SVD; while the
    engine works on one chunk, the next one is read into the page cache (:func:`_warm`). With the GPU
    two-stage solver (``solver``, a :class:`~spectrum_fast.twostage.DeviceBands`) the float64 pass of a chunk
    is queued on the GPU and delivered as it finishes, while the next chunks go on; bands still waiting for a
    full launch at the end stay queued (:meth:`Session.finish` delivers them)."""
    chunks = _chunks(infos, units)
    stop = threading.Event()
    readers = warm_threads()  # once per share: it reads the CPU affinity and the cgroup files
    warmer: threading.Thread | None = None
    try:
        for index, chunk in enumerate(chunks):
            if warmer is not None:
                warmer.join()  # this chunk is in the page cache (or being read as fast as the disk allows)
                warmer = None
            if index + 1 < len(chunks):
                thread = threading.Thread(target=_warm, args=(chunks[index + 1], stop, readers), daemon=True,
                                          name="spectrum_fast-warm")
                thread.start()
                warmer = thread  # only a started thread is joined below
            _run_chunk(engine, chunk, done, big, units, threads, solver)
            if solver is not None:
                _bands_done(solver, done, wait=False, reread=reread)
    finally:
        stop.set()
        if warmer is not None:
            warmer.join()


class Session:
    """A scan's GPU state across :func:`cuda_stats` calls: one engine per device (streams, handles, pinned
    buffers and workspaces, which grow to the largest matrix) and, with the GPU two-stage solver, one
    :class:`~spectrum_fast.twostage.DeviceBands` per device, whose bands wait for a full launch across calls.

    A Hub scan calls :func:`cuda_stats` once per shard. Without a session each call built its engines anew and
    ended by launching the band solver on whatever bands it had: a launch takes as long for a few bands as for
    a full one (each band is one long chain of steps), so a 191-shard Llama-3.1-405B paid some 190 launches
    instead of 2. :meth:`finish` launches and delivers what is left, at the scan's end. ``reread`` reads a
    matrix again for the rare band result the float64 guard refuses, whose shard may be gone by then. Bands
    waiting for a launch are not in the scan's journal until delivered: a scan killed before the launch
    computes them again when resumed (one that fails with an error delivers them first, see ``scan``)."""

    def __init__(self, reread: Callable[[TensorInfo], np.ndarray] = read_matrix):
        self.reread = reread
        self._engines: dict[tuple[int, tuple[int, int]], object] = {}
        self._solvers: dict[int, object] = {}
        self._lock = threading.Lock()

    def engine(self, device: int, syevd: tuple[int, int]):
        """The engine on ``device`` with this ``Xsyevd`` algorithm, built on first use."""
        key = (device, syevd)
        with self._lock:
            engine = self._engines.get(key)
        if engine is None:
            engine = _engine(device, syevd)  # outside the lock: devices build theirs at once
            with self._lock:
                engine = self._engines.setdefault(key, engine)
        return engine

    def solver(self, device: int, chase: int):
        """The GPU band solver's queue on ``device``, made on first use."""
        from .twostage import DeviceBands

        with self._lock:
            if device not in self._solvers:
                self._solvers[device] = DeviceBands(_TORCH_DEVICE or f"cuda:{device}", _DEVICE_BAND, variant=chase)
            return self._solvers[device]

    def finish(self, done: Callable[[TensorInfo, MatrixStats], None]) -> None:
        """Launch the bands still kept on every device, then wait for them and deliver them."""
        solvers = list(self._solvers.values())
        for solver in solvers:
            solver.launch_kept()  # every device's last launch queued before any is waited for
        for solver in solvers:
            _bands_done(solver, done, wait=True, reread=self.reread)


def _split(infos: list[TensorInfo], test: Callable[[TensorInfo], bool]) -> tuple[list, list]:
    """``(those that pass, the rest)``, each in order."""
    yes, no = [], []
    for i in infos:
        (yes if test(i) else no).append(i)
    return yes, no


def _run_chunk(engine, chunk: list[TensorInfo], done: Callable[[TensorInfo, MatrixStats], None], big: int,
               units: dict[str, int], threads: int = 0, solver=None) -> None:
    first, straight = _split(chunk, lambda i: not big or min(i.shape) < big)  # straight to float64
    failed = []
    for info, (lam, amax, code) in zip(first, _engine_run(engine, first, False, units) if first else ()):
        out = _judge(info, lam, amax, code, _EPS32)
        if out is None:
            failed.append(info)
        else:
            done(info, out)
    two: list[TensorInfo] = []
    if threads or solver is not None:
        two, straight = _split(straight, _twostage_takes)
        two_failed, failed = _split(failed, _twostage_takes)
        two += two_failed
    # fp32 failures of a batched unit: the whole unit again in float64 when at least half of it failed,
    # else those one at a time; either way a matrix's numbers depend on its unit alone, never on which
    # other matrices happened to fail (a batch of just those would).
    members: dict[int, list[TensorInfo]] = {}
    for info in first:
        if info.name in units:
            members.setdefault(units[info.name], []).append(info)
    missed = Counter(units[i.name] for i in failed if i.name in units)
    whole = {u for u, n in missed.items() if 2 * n >= len(members[u])}
    again = [i for u in whole for i in members[u]]
    single = [i for i in failed if units.get(i.name) not in whole]
    wanted = {i.name for i in failed}
    if solver is not None and two:  # queued on the GPU; :func:`_run_device` delivers them as they finish
        _bands_submit(solver, two, units)
        two = []
    passes = [(two, lambda: _twostage_run(engine.device, two, threads)),
              (straight, lambda: _engine_run(engine, straight, True, units)),
              (again, lambda: _engine_run(engine, again, True, units)),
              (single, lambda: _engine_run(engine, single, True, {}))]
    for part, compute in passes:
        for info, (lam, amax, code) in zip(part, compute() if part else ()):
            if part is again and info.name not in wanted:
                continue  # its fp32 result stood
            out = _judge(info, lam, amax, code, _EPS64)
            done(info, out if out is not None else matrix_stats(read_matrix(info)))


def check_devices(devices: Sequence[int], visible: int | None = None) -> None:
    """Refuses a GPU listed twice (two threads would drive its one engine, :class:`Session`) and, given how many
    GPUs are ``visible``, one that is not there."""
    if len(set(devices)) != len(devices):
        raise SpectrumError(f"devices lists a GPU more than once: {list(devices)}")
    missing = [d for d in devices if visible is not None and not 0 <= d < visible]
    if missing:
        raise SpectrumError(f"there is no GPU {missing[0]}: {visible} visible (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'not set')})")


def cuda_stats(infos: Sequence[TensorInfo], devices: Sequence[int],
               done: Callable[[TensorInfo, MatrixStats], None], units: dict[str, int] | None = None,
               session: Session | None = None) -> None:
    """Compute every matrix on the GPUs; ``done`` is called (under a lock) as each one finishes. ``units``:
    the batched solver's calls (:func:`~spectrum_fast.scheduling.batch_units`), fixed by the caller for
    the whole scan, each one whole in ``infos``; by default formed from ``infos``. ``session``: the engines and
    band-solver queues of a scan that calls this more than once (:class:`Session`); matrices whose bands
    wait for a full launch are then delivered by a later call or by the session's :meth:`~Session.finish`.
    Without one, everything is delivered before this returns."""
    lock = threading.Lock()

    def report(info: TensorInfo, out: MatrixStats) -> None:
        with lock:
            done(info, out)

    _STOP.clear()  # a stop from an earlier, interrupted scan in this process does not carry over
    check_devices(devices)
    unfit = [i.name for i in infos if not engine_takes(i)]
    if unfit:
        raise ValueError(f"the CUDA engine does not take {unfit[0]}; route it to the CPU engine")
    # settings errors up front (scan_units reads the batching ones)
    big, mode, band_threads = fp64_min_k(), twostage_mode(), twostage_threads()
    chase = chase_variant() if mode == "gpu" else 0
    syevd = syevd_algorithm()
    _check_syevd(syevd)
    if units is None:
        units = scan_units(infos)
    own = session is None
    run = session if session is not None else Session()
    work = plan(infos, len(devices), units)

    def on(device: int, items: list[TensorInfo]) -> None:
        solver = run.solver(device, chase) if mode == "gpu" else None
        _run_device(run.engine(device, syevd), items, report, big, units, band_threads, solver, run.reread)

    if len(devices) == 1:
        on(devices[0], work[0])
        if own:
            run.finish(report)
        return
    errors: list[BaseException] = []

    def worker(device: int, items: list[TensorInfo]) -> None:
        try:
            on(device, items)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(d, w), name=f"spectrum_fast-cuda{d}")
               for d, w in zip(devices, work) if w]
    _STOP.clear()
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.2)  # a plain join() would not let Ctrl-C in
    except KeyboardInterrupt:
        _STOP.set()  # each device thread stops after its current matrix
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]
    if own:
        run.finish(report)

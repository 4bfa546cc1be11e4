"""``scan()``: stream a checkpoint's matrices through an engine and collect their SNR records.

A reader thread reads the next tensors from disk while the engine works on the current one (LAPACK and
``pread`` both release the GIL), so disk and math overlap on the CPU path. At most ``_PREFETCH``
tensors wait in memory, and a tensor is read only when what it will take fits in the memory budget beside
those in flight (:mod:`spectrum_fast.memory`): a model too big for two matrices at once is scanned one at a
time.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from threadpoolctl import threadpool_limits

from . import __version__, cpu_engine, distributed
from .checkpoint import TensorInfo, dtype_supported, fp8_problem, is_unscaled_fp8, open_checkpoint, read_matrix
from .cpu_engine import STATUS_OK, MatrixStats, eigensolver, matrix_stats
from .errors import SpectrumError
from .journal import Journal
from .memory import Budget, MemoryBudgetWarning, available_bytes
from .naming import is_embedding, is_head, module_name, module_type, wants
from .result import MatrixRecord, ScanResult
from .scheduling import group_units, plan, plan_files

_PREFETCH = 2
DEVICES = ("auto", "cpu", "cuda")


class UnscaledFP8Warning(UserWarning):
    """An FP8 weight without a scale tensor: scanned as stored, its SNR off by the scale."""


class DegenerateMatrixWarning(UserWarning):
    """A matrix is all zeros or holds NaN/Inf: it gets no SNR and is never selected."""


def _resolve_device(device: str, devices: Sequence[int] | None) -> tuple[str, str | None]:
    """The backend that will run, and why it is the CPU when ``auto`` could not use a GPU."""
    if device not in DEVICES:
        raise SpectrumError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    reason = None
    if device != "cpu":
        from .backends import cuda_unavailable_reason

        reason = cuda_unavailable_reason()
    if devices is not None:  # up front, before anything is read; whether they exist where a GPU scan can run
        from .cuda_engine import check_devices

        check_devices(devices, _visible_gpus() if device != "cpu" and reason is None else None)
    if device == "cpu":
        return "cpu", None
    if reason is None:
        return "cuda", None
    if device == "cuda" or devices:
        raise SpectrumError(f"device='cuda' is not available: {reason} (see `python -m spectrum_fast`)")
    return "cpu", f"using the CPU: {reason}"


def _matrix_bytes(info: TensorInfo, exact: bool = False) -> int:
    """Memory one matrix takes from when it is read until its statistics are done: its float32 values (float64
    if stored so) and, on top, the larger of what reading it needs (the stored bytes, and a second copy for
    an FP8 scale) and what computing it needs (:func:`~spectrum_fast.cpu_engine.working_bytes`)."""
    m, n = info.shape
    held = m * n * (8 if info.dtype == "F64" else 4)
    reading = info.nbytes + (held if info.scale is not None else 0)
    return held + max(reading, cpu_engine.working_bytes(m, n, exact))


def _prefetch(infos: Sequence[TensorInfo], stop: threading.Event, budget: Budget,
              cost: Callable[[TensorInfo], int]) -> Iterator[tuple[TensorInfo, object]]:
    """Yield ``(info, array or exception)`` read by a background thread, in order; each matrix's ``cost`` is
    taken from the ``budget`` before the matrix is read, and the consumer gives it back."""
    q: queue.Queue = queue.Queue(maxsize=_PREFETCH)

    def reader() -> None:
        for info in infos:
            if stop.is_set():
                return
            if not budget.acquire(cost(info), stop):
                return
            try:
                item: object = read_matrix(info)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                item = e
            while not stop.is_set():
                try:
                    q.put((info, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    t = threading.Thread(target=reader, name="spectrum_fast-reader", daemon=True)
    t.start()
    try:
        for _ in infos:
            info, item = q.get()
            yield info, item
            if isinstance(item, BaseException):
                return
    finally:
        stop.set()
        t.join()


def _progress(total_bytes: int, n: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="scanning",
                disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {postfix} [{elapsed}<{remaining}, {rate_fmt}]",
                postfix=f"0/{n} tensors")


def _tensors_to_scan(tensors: Iterable[TensorInfo], types: list[str] | None, include_embeddings: bool,
                     routers: bool) -> tuple[list[TensorInfo], list[dict[str, str]]]:
    """The tensors a scan with these settings covers, and those it must skip (with the reason)."""
    chosen: list[TensorInfo] = []
    skipped: list[dict[str, str]] = []
    for info in tensors:
        if not wants(info.name, info.shape, include_embeddings=include_embeddings, types=types, routers=routers):
            continue
        if not dtype_supported(info.dtype):
            skipped.append({"name": info.name, "reason": f"unsupported dtype {info.dtype}"})
            continue
        problem = fp8_problem(info)
        if problem:
            skipped.append({"name": info.name, "reason": problem})
            continue
        if is_unscaled_fp8(info):
            warnings.warn(f"{info.file.name}: FP8 tensor '{info.name}' has no scale tensor; scanned as stored "
                          "(its SNR is off by the missing scale)", UnscaledFP8Warning, stacklevel=3)
        chosen.append(info)
    return chosen, skipped


def scan(model: str | os.PathLike, *, device: str = "auto", types: Sequence[str] | None = None,
         include_embeddings: bool = False, progress: bool = True, exact: bool = False,
         workers: int | None = None, devices: Sequence[int] | None = None,
         journal: str | os.PathLike | None = None, routers: bool = True, revision: str | None = None,
         token: str | bool | None = None, keep: bool = False, lookahead: int = 1, fetch: str = "shards",
         batch_bytes: int = 2**30) -> ScanResult:
    """Spectrum SNR of every weight matrix of a safetensors checkpoint, streamed one tensor at a time.

    ``model``: a directory (single or sharded safetensors), a ``.safetensors`` file, a Hugging Face repo
    id present in the local cache, or ``"demo"``. ``types``: module types to scan (shell-style patterns
    such as ``"mlp.*"``); default all. ``include_embeddings`` adds embeddings and ``lm_head``.
    ``exact=True`` computes every matrix with the float64 SVD (slow; the reference definition).
    ``workers``: matrices computed at once on the CPU (default: 2, or 1 on one core); the cores are
    shared among them as BLAS threads. Memory stays bounded: at most ``workers`` matrices in flight
    plus two read ahead. ``devices``: GPU indices for ``device="cuda"`` (default: GPU 0); matrices are
    spread over them, largest first. Launched by ``torchrun``, every rank scans its share and all
    return the whole result (see :mod:`spectrum_fast.distributed`). ``journal``: a file where every
    finished matrix is recorded as it completes; a scan killed at any point and started again with the
    same journal resumes from it (the journal is kept: remove it once the result is saved).
    ``routers=False`` leaves mixture-of-experts routers (``mlp.gate``) out; the reference scans them.

    A Hub repo id that is not (completely) in the local cache is scanned from the Hub at ``revision``
    (default: the main branch, pinned to one commit for the whole scan) with ``token``: shards are
    downloaded one at a time, ``lookahead`` of them ahead of the one being scanned, and each is deleted
    once scanned unless it was cached before or ``keep=True``. ``fetch="ranges"`` fetches only the
    matrices' bytes by HTTP range requests, ``batch_bytes`` at a time, and keeps nothing (see
    :mod:`spectrum_fast.hub`).
    """
    t0 = time.perf_counter()
    backend, backend_note = _resolve_device(device, devices)
    if lookahead < 0:
        raise SpectrumError(f"lookahead must be 0 or more, got {lookahead}")
    from .hub import FETCHES

    if fetch not in FETCHES:
        raise SpectrumError(f"fetch must be one of {', '.join(FETCHES)}, got {fetch!r}")
    if batch_bytes < 1:
        raise SpectrumError(f"batch_bytes must be positive, got {batch_bytes}")
    if keep and fetch == "ranges":
        raise SpectrumError("keep applies to fetch='shards' (whole shards in the cache); fetch='ranges' keeps nothing")
    available_bytes()  # a bad SPECTRUM_FAST_MEMORY_GB fails here, before anything is read
    ckpt = open_checkpoint(model, revision=revision, token=token)
    if ckpt.remote is not None:
        ckpt.remote.keep, ckpt.remote.lookahead = keep, lookahead
        ckpt.remote.fetch, ckpt.remote.batch_bytes = fetch, batch_bytes
        ckpt.remote.progress = progress and distributed.rank() == 0
    types = list(types) if types else None
    chosen, skipped = _tensors_to_scan(ckpt.tensors.values(), types, include_embeddings, routers)
    if not chosen:
        what = f" of types {', '.join(types)}" if types else ""
        raise SpectrumError(f"{model}: no 2-D weight matrices{what} to scan"
                            + (f" ({len(skipped)} skipped for their dtype)" if skipped else ""))
    chosen.sort(key=lambda i: (str(i.file), i.offset))  # sequential reads
    if backend_note and progress:
        print(f"spectrum_fast: {backend_note}", file=sys.stderr)

    settings = {"types": types, "include_embeddings": include_embeddings, "exact": exact, "routers": routers}
    # The GPU's batched solver calls, fixed here for the whole scan. From the checkpoint alone, whatever the
    # backend: every rank deals by them, and a rank without a GPU must deal as the others do.
    from .cuda_engine import batched_max_k, engine_takes, scan_units

    max_k = batched_max_k()
    units = scan_units(chosen)
    on_gpu = backend == "cuda" and not exact
    gpu_units = units if on_gpu else {}
    ctx = distributed.context()
    rank_gpu = False  # the GPU is this torchrun rank's LOCAL_RANK
    if ctx is not None:
        # the same deal on every rank; whole shards when they are downloaded, so each is downloaded once
        whole_shards = ckpt.remote is not None and fetch == "shards"
        deal = plan_files(chosen, ctx.world) if whole_shards else plan(chosen, ctx.world, units)
        chosen_here = deal[ctx.rank]
        progress = progress and ctx.rank == 0
        if backend == "cuda" and not devices:
            devices = [distributed.local_rank()]  # one GPU per rank
            rank_gpu = on_gpu  # (an exact scan computes on the CPU)
    else:
        chosen_here = chosen
    records: list[MatrixRecord] = []
    log = None
    if journal is not None:
        # what fixes the numbers' last bits too: a journal from another backend or GPU setting starts over
        # (the CPU's eigensolvers too: the GPU route sends some matrices there)
        engine: dict = {"backend": "cuda" if on_gpu else "cpu", "cpu": eigensolver(),
                        "cpu_revision": cpu_engine.REVISION}
        if on_gpu:
            from . import _C  # type: ignore[attr-defined]
            from .cuda_engine import SOLVER_REVISION, chase_variant, fp64_min_k, syevd_algorithm, twostage_mode

            engine.update(revision=SOLVER_REVISION, batched_max_k=max_k, fp64_min_k=fp64_min_k(),
                          twostage=twostage_mode(), syevd_alg=list(syevd_algorithm()), cusolver=_C.cusolver_version())
            if engine["twostage"] == "gpu":
                engine["chase"] = chase_variant()
        header = {"sources": [s.to_json() for s in ckpt.sources], "settings": settings, "engine": engine}
        log = Journal(distributed.rank_journal(Path(journal)), header).open()
        if log.note and progress:
            print(f"spectrum_fast: {log.note}", file=sys.stderr)
        finished = {r.module + ".weight": r for r in log.resumed}
        records = [finished[i.name] for i in chosen_here if i.name in finished]
    resumed = {r.module + ".weight" for r in records}
    # a unit with a matrix left to do is computed whole, so that its batch is the uninterrupted scan's
    open_units = {gpu_units[i.name] for i in chosen_here if i.name not in resumed and i.name in gpu_units}
    todo = [i for g in group_units(chosen_here, gpu_units) for i in g
            if i.name not in resumed or gpu_units.get(i.name) in open_units]
    if ckpt.remote is not None and progress:
        if fetch == "ranges":
            fate = "only the matrices' bytes, by range requests, nothing kept"
        else:
            fate = "kept in the cache" if keep else "each deleted once scanned unless it was cached before"
        print(f"spectrum_fast: reading {ckpt.model} at commit {ckpt.remote.commit[:12]} from "
              f"{ckpt.remote.endpoint}: {len(ckpt.remote.shards)} shards, {fate}", file=sys.stderr)
    error: BaseException | None = None
    with _progress(sum(i.nbytes for i in chosen_here), len(chosen_here), progress) as bar:
        bar.update(sum(i.nbytes for i in chosen_here if i.name in resumed))

        def done(info: TensorInfo, out: MatrixStats) -> None:
            if info.name in resumed:
                return  # recomputed with its unit; the journal's record stands
            rec = _record(info, out)
            if log is not None:
                log.append(rec)
            records.append(rec)
            bar.update(info.nbytes)
            bar.set_postfix_str(f"{len(records)}/{len(chosen_here)} tensors", refresh=False)

        session = None
        if on_gpu:  # one for the whole scan: a Hub scan calls the GPU path once per shard
            from .cuda_engine import Session

            session = Session(reread=_rereader(ckpt))

        def compute(batch: list[TensorInfo]) -> None:
            on_cpu = batch
            if on_gpu:
                from .cuda_engine import cuda_stats

                cuda_stats([i for i in batch if engine_takes(i)], list(devices) if devices else [0], done, gpu_units,
                           session)
                on_cpu = [i for i in batch if not engine_takes(i)]
            if on_cpu:
                _cpu_stats(on_cpu, workers, exact, done)

        try:
            if rank_gpu:  # in here, so that every rank fails with this one's error
                _check_rank_gpu(ctx.rank, devices[0])
            if ckpt.remote is not None:
                for batch in ckpt.remote.stage(todo, gpu_units):
                    compute(batch)
            else:
                compute(todo)
            if session is not None:
                session.finish(done)  # the GPU band solver's last launches
        except BaseException as e:
            if session is not None and log is not None and not isinstance(e, KeyboardInterrupt):
                # bands computed but waiting for a full launch: into the journal, so that a resumed scan
                # keeps them (Ctrl-C stops at once instead; those are computed again on resuming)
                with contextlib.suppress(BaseException):  # the first error is the one to report
                    session.finish(done)
            if ctx is None:
                raise
            error = e
        finally:
            if log is not None:
                log.close()
    if ctx is not None:
        records = distributed.exchange(ctx, records, error)

    order = {info.name: i for i, info in enumerate(ckpt.tensors.values())}
    records.sort(key=lambda r: order.get(r.module + ".weight", 0))
    names = list(ckpt.tensors)
    return ScanResult(
        model=ckpt.model, slug=ckpt.slug, records=records, skipped=skipped,
        settings={**settings, "device": device, "backend_note": backend_note},
        sources=[s.to_json() for s in ckpt.sources],
        embedding_names=[n for n in names if is_embedding(n)],
        head_names=[n for n in names if is_head(n)],
        backend=backend, elapsed_s=round(time.perf_counter() - t0, 3), tool_version=__version__)


def _visible_gpus() -> int:
    """GPUs the native extension sees (only where :func:`backends.cuda_unavailable_reason` found one)."""
    from .backends import native_extension

    return int(native_extension().device_count())


def _check_rank_gpu(rank: int, local_rank: int) -> None:
    """The GPU a torchrun rank took by its LOCAL_RANK exists."""
    visible = _visible_gpus()
    if local_rank >= visible:
        raise SpectrumError(f"torchrun rank {rank} (LOCAL_RANK {local_rank}) has no GPU of its own: {visible} "
                            f"visible on this machine; start at most {visible} ranks per machine "
                            "(--nproc_per_node), or scan with --device cpu")


def _rereader(ckpt) -> Callable[[TensorInfo], object]:
    """How the GPU path reads a matrix again after its results came back (:class:`~spectrum_fast.cuda_engine.
    Session`): from its file, or, when the Hub scan has deleted that shard since, by range requests."""

    def reread(info: TensorInfo):
        if ckpt.remote is None or info.file.exists() and (info.scale is None or info.scale.file.exists()):
            return read_matrix(info)
        return ckpt.remote.read_matrix(ckpt.tensors[info.name])

    return reread


def _cpu_stats(chosen: Sequence[TensorInfo], workers: int | None, exact: bool,
               done: Callable[[TensorInfo, MatrixStats], None], budget: Budget | None = None) -> None:
    """Compute every matrix on the CPU: read ahead in one thread, ``workers`` matrices at once, as many as
    the memory ``budget`` holds (by default :func:`~spectrum_fast.memory.available_bytes`)."""
    n_workers, blas_threads = _parallelism(workers)
    if budget is None:
        budget = Budget(available_bytes())

    def cost(info: TensorInfo) -> int:
        return _matrix_bytes(info, exact)

    if budget.limit is not None and chosen:
        big = max(chosen, key=cost)
        if cost(big) > budget.limit:
            warnings.warn(f"{big.file.name}: tensor '{big.name}' {tuple(big.shape)} needs about "
                          f"{cost(big) / 2**30:.1f} GiB to scan, more than the "
                          f"{budget.limit / 2**30:.1f} GiB available (SPECTRUM_FAST_MEMORY_GB sets it): "
                          "such matrices are scanned one at a time", MemoryBudgetWarning, stacklevel=2)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="spectrum_fast-engine")
    in_flight: dict[Future, TensorInfo] = {}

    def compute(box: list, cost: int) -> MatrixStats:
        try:
            return matrix_stats(box.pop(), exact=exact)  # the matrix is freed when this returns ...
        finally:
            budget.release(cost)  # ... and its bytes go back to the budget

    def collect(block_until: int) -> None:
        # wait for whichever matrix finishes first: waiting for the oldest would idle a core
        # behind one slow matrix while a quick one is already done
        while len(in_flight) > block_until:
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                done(in_flight.pop(future), future.result())

    try:
        with threadpool_limits(blas_threads):
            for info, item in _prefetch(chosen, stop, budget, cost):
                if isinstance(item, BaseException):
                    budget.release(cost(info))
                    raise item
                in_flight[pool.submit(compute, [item], cost(info))] = info
                del item
                collect(n_workers - 1)  # at most n_workers matrices in flight
            collect(0)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _parallelism(workers: int | None) -> tuple[int, int]:
    """Matrices computed at once, and BLAS threads for each.

    Two single-threaded workers beat one two-threaded worker on 2 cores (the tridiagonal reduction
    scales poorly with threads): 8.4 s against 12.7 s for the bench checkpoint's 28 matrices, now that
    LAPACK is called without holding the GIL (11.9 s against 13.1 s before, when the workers took turns).
    The cores are this process's share (:func:`distributed.cores_per_rank`): under torchrun, the ranks on one
    machine split them instead of each running a BLAS thread per core of the machine.
    """
    cores = distributed.cores_per_rank()
    n = min(2, cores) if workers is None else int(workers)
    if n < 1:
        raise SpectrumError(f"workers must be at least 1, got {workers}")
    return n, max(1, cores // n)


def _record(info: TensorInfo, out: MatrixStats) -> MatrixRecord:
    """The record of one finished matrix; warns (in the calling thread) when it is degenerate."""
    mod = module_name(info.name)
    st = out.stats
    if out.status != STATUS_OK:
        warnings.warn(f"{info.file.name}: tensor '{info.name}' is {_describe(out.status)}: "
                      "no SNR, never selected", DegenerateMatrixWarning, stacklevel=4)
    return MatrixRecord(
        module=mod, type=module_type(mod), snr=out.snr, shape=(info.shape[0], info.shape[1]),
        dtype=info.dtype, status=out.status, method=out.method,
        sigma_max=st.sigma_max if st else None, tau=st.tau if st else None,
        n_signal=st.n_signal if st else None, noise_free=st.noise_free if st else None)


def _describe(status: str) -> str:
    return {"zero": "all zeros", "nonfinite": "not finite (NaN or Inf)", "empty": "empty"}.get(status, status)

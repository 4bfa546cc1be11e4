"""Scanning a model straight from the Hugging Face Hub, without keeping it on disk.

``scan("org/model")`` for a repo that is not (completely) in the local cache:

1. The revision is pinned to one commit (so a push during a long scan cannot mix two versions), and the
   index and every shard's size and ETag are fetched with HEAD requests.
2. Every shard's safetensors header is read with HTTP range requests (a few KB each), so the whole
   tensor table is known, validated and dealt out (also across ``torchrun`` ranks) before any weights
   move.
@@DOC3@@

Everything huggingface_hub reads from the environment is honoured, read when the scan starts:
``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from .checkpoint import SourceFile, TensorInfo, parse_header_prefix, read_header, read_matrix, tensor_table
from .errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HEAD_PROBE = 64 * 1024  # first range request; most headers fit (a 405B shard's is ~20 KB)
_DISK_MARGIN = 64 * 1024 * 1024


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def cache_dir() -> str:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class RemoteShard:
    filename: str
    size: int
    etag: str
    #: its path in the local cache if it was there before the scan (then used in place, never deleted)
    cached: str | None


FETCHES = ("shards", "ranges")
_RANGE_CHUNK = 64 * 2**20  # bytes per range request in "ranges" mode
_RANGE_STREAMS = 4  # range requests in flight at once
_RETRIES = 5
_COUNTER_LOCK = threading.Lock()


@dataclass
class HubRepo:
    """One pinned revision of a Hub repo, and how to bring its shards to disk and take them away."""

    repo_id: str
    commit: str
    endpoint: str
    cache_dir: str
    token: str | bool | None
    shards: dict[str, RemoteShard]
    keep: bool = False
    lookahead: int = 1
    progress: bool = True
    fetch: str = "shards"
    batch_bytes: int = 2**30
    #: shards downloaded whole by this scan
    downloaded: list[str] = field(default_factory=list)
    #: bytes fetched by range requests in "ranges" mode
    fetched_bytes: int = 0

    def placeholder(self, filename: str) -> Path:
        """Where tensors of a shard not yet on disk say they live (replaced once it is downloaded)."""
        return Path(f"hf://{self.repo_id}@{self.commit}") / filename

    def _shard_of(self, path: Path) -> str | None:
        """The shard (its name in the repo, subfolders included) a placeholder path stands for, else None."""
        try:
            name = path.relative_to(self.placeholder("x").parent).as_posix()
        except ValueError:
            return None
        return name if name in self.shards else None

    # -- staging ---------------------------------------------------------------------------------------

    def stage(self, infos: Sequence[TensorInfo], units: dict[str, int] | None = None) -> Iterator[list[TensorInfo]]:
        """Yield ``infos`` in batches, each pointing at local files that exist while the batch is used.

        ``fetch="shards"``: one batch per shard; the next shards download in the background while the
        caller works on the current one, and are deleted once no later batch needs them (unless
        ``keep``). ``fetch="ranges"``: batches of at most ``batch_bytes`` whose bytes alone are fetched,
        never cutting one of ``units`` (matrix name -> unit, members listed together; a unit lies in one
        shard), so a batch can exceed ``batch_bytes`` by up to one unit (64 same-shape matrices).
        """
        if self.fetch == "ranges":
            yield from self._stage_ranges(infos, units or {})
            return
        batches: dict[str, list[TensorInfo]] = {}
        for info in infos:
            batches.setdefault(self._shard_of(info.file) or "", []).append(info)
        order = list(batches)
        needs = [self._needed(batches[b]) for b in order]
        local: dict[str, Path] = {}
        pending: dict[str, _Background] = {}

        def start(i: int) -> None:
            for name in needs[i]:
                if name not in local and name not in pending:
                    pending[name] = _Background(functools.partial(self.download, name), f"download-{name}",
                                                on_abandon=functools.partial(self._discard, name))

        try:
            for i, b in enumerate(order):
                for j in range(i, min(len(order), i + 1 + self.lookahead)):
                    start(j)
                for name in needs[i]:
                    if name not in local:
                        local[name] = pending.pop(name).result()
                yield [self._localize(info, local) for info in batches[b]]
                later = set().union(*needs[i + 1:]) if i + 1 < len(order) else set()
                for name in [n for n in local if n not in later]:
                    self._discard(name, local.pop(name))
        finally:
            for name, path in local.items():
                self._discard(name, path)
            for job in pending.values():  # look-ahead downloads: deleted when (or as soon as) they finish
                job.abandon()

    def _stage_ranges(self, infos: Sequence[TensorInfo], units: dict[str, int]) -> Iterator[list[TensorInfo]]:
        batches: list[list[TensorInfo]] = [[]]
        size = 0
        for info in infos:
            need = info.nbytes + (info.scale.nbytes if info.scale is not None else 0)
            unit = units.get(info.name)
            inside = unit is not None and batches[-1] and unit == units.get(batches[-1][-1].name)
            if batches[-1] and size + need > self.batch_bytes and not inside:
                batches.append([])
                size = 0
            batches[-1].append(info)
            size += need
        batches = [b for b in batches if b]
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix=".spectrum_fast-ranges-", dir=self.cache_dir))
        except OSError as e:
            raise CheckpointError(f"{self.cache_dir}: cannot create a work directory ({e.strerror or e})") from None
        stop = threading.Event()  # set when the scan ends early: fetches still queued do not start
        pending: dict[int, _Background] = {}
        try:
            for i, batch in enumerate(batches):
                for j in range(i, min(len(batches), i + 1 + self.lookahead)):
                    if j not in pending:
                        job = functools.partial(self._fetch_batch, batches[j], workdir / str(j), stop)
                        pending[j] = _Background(job, f"ranges-{j}")
                local = pending.pop(i).result()
                yield [self._localize(info, local) for info in batch]
                shutil.rmtree(workdir / str(i), ignore_errors=True)
        finally:
            stop.set()
            shutil.rmtree(workdir, ignore_errors=True)

    def read_matrix(self, info: TensorInfo):
        """One tensor's values (:func:`~spectrum_fast.checkpoint.read_matrix`) fetched by range requests into a
        temporary sparse file, removed before this returns: for a matrix needed again after its shard was
        deleted (the GPU band solver's results can come back shards later)."""
        os.makedirs(self.cache_dir, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=".spectrum_fast-reread-", dir=self.cache_dir))
        try:
            local = self._fetch_batch([info], workdir / "0", threading.Event(), ahead=0)
            return read_matrix(self._localize(info, local))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _fetch_batch(self, batch: Sequence[TensorInfo], where: Path, stop: threading.Event,
                     ahead: int | None = None) -> dict[str, Path]:
        """The bytes of ``batch``'s tensors (and scales) written at their own offsets into sparse copies of
        their shards under ``where``; returns shard name -> sparse file. Stops early once ``stop`` is set.
        ``ahead``: batches fetched beside this one, that the disk must also hold (default ``lookahead``)."""
        ahead = self.lookahead if ahead is None else ahead
        pieces: list[tuple[str, int, int]] = []
        for info in batch:
            for t in (info, info.scale):
                name = self._shard_of(t.file) if t is not None else None
                if name:
                    pieces += [(name, o, min(o + _RANGE_CHUNK, t.offset + t.nbytes))
                               for o in range(t.offset, t.offset + t.nbytes, _RANGE_CHUNK)]
        need = sum(end - start for _, start, end in pieces)
        local: dict[str, Path] = {}
        fds: dict[str, int] = {}
        pool = ThreadPoolExecutor(max_workers=_RANGE_STREAMS, thread_name_prefix="spectrum_fast-range")
        try:
            where.mkdir()  # not parents: the scan may have ended and removed the work directory
            free = shutil.disk_usage(where).free
            if free < need * (1 + ahead) + _DISK_MARGIN:
                raise CheckpointError(f"{self.repo_id}: {need / 2**30:.1f} GiB of matrices per batch (and "
                                      f"{ahead} more batch(es) fetched ahead) but {where.parent} has "
                                      f"{free / 2**30:.1f} GiB free (lower batch_bytes)")
            for name in sorted({p[0] for p in pieces}):
                local[name] = where / name
                local[name].parent.mkdir(parents=True, exist_ok=True)
                with open(local[name], "wb") as f:
                    f.truncate(self.shards[name].size)  # sparse: only the fetched ranges take space
                fds[name] = os.open(local[name], os.O_WRONLY)

            def get(piece: tuple[str, int, int]) -> int:
                name, start, end = piece
                if stop.is_set():
                    raise CheckpointError("stopped")
                try:
                    data = _range(self, name, start, end, retries=_RETRIES)
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001 - network or HTTP failure: one line naming the shard
                    raise CheckpointError(f"{self.repo_id}/{name}: range request for bytes {start}-{end - 1} "
                                          f"failed: {_reason(e)}") from None
                if len(data) != end - start:
                    raise CheckpointError(f"{self.repo_id}/{name}: asked for bytes {start}-{end - 1}, got {len(data)}")
                view = memoryview(data)
                while view:
                    n = os.pwrite(fds[name], view, start)
                    view, start = view[n:], start + n
                return len(data)

            got = sum(pool.map(get, pieces))
            with _COUNTER_LOCK:  # batches fetch on their own threads
                self.fetched_bytes += got
            return local
        except OSError as e:
            raise CheckpointError(f"{where}: cannot write fetched matrices ({e.strerror or e})") from None
        finally:
            # on an error the queued requests never start; the few in flight finish before their files close
            pool.shutdown(wait=True, cancel_futures=True)
            for fd in fds.values():
                os.close(fd)
            if stop.is_set():
                shutil.rmtree(where, ignore_errors=True)

    def _needed(self, infos: Sequence[TensorInfo]) -> list[str]:
        names: list[str] = []
        for info in infos:
            for f in (info.file, info.scale.file if info.scale else None):
                name = self._shard_of(f) if f is not None else None
                if name and name not in names:
                    names.append(name)
        return names

    def _localize(self, info: TensorInfo, local: dict[str, Path]) -> TensorInfo:
        name = self._shard_of(info.file)
        out = replace(info, file=local[name]) if name else info
        if info.scale is not None:
            sname = self._shard_of(info.scale.file)
            if sname:
                out = replace(out, scale=replace(info.scale, file=local[sname]))
        return out

    def _discard(self, name: str, path: Path) -> None:
        if self.keep or self.shards[name].cached:
            return
        blob = Path(os.path.realpath(path))
        for p in {path, blob}:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                print(f"spectrum_fast: could not delete {p} after scanning it: {e.strerror or e}", file=sys.stderr)

    def download(self, name: str) -> Path:
        """One shard into the cache (resuming a partial download); its local path."""
        from huggingface_hub import hf_hub_download

        shard = self.shards[name]
        if shard.cached and Path(shard.cached).is_file():
            return Path(shard.cached)
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            free = shutil.disk_usage(self.cache_dir).free
        except OSError as e:
            raise CheckpointError(f"{self.cache_dir}: cannot use the cache directory ({e.strerror or e})") from None
        if free < shard.size + _DISK_MARGIN:
            raise CheckpointError(
                f"{self.repo_id}/{name}: needs {shard.size / 2**30:.1f} GiB but {self.cache_dir} has "
                f"{free / 2**30:.1f} GiB free (set HF_HUB_CACHE to a larger disk, or lookahead=0 to keep one "
                "shard at a time)")
        kwargs = {}
        if not self.progress and "tqdm_class" in inspect.signature(hf_hub_download).parameters:
            kwargs["tqdm_class"] = _silent_tqdm()
        try:
            path = hf_hub_download(self.repo_id, name, revision=self.commit, cache_dir=self.cache_dir,
                                   token=self.token, endpoint=self.endpoint, **kwargs)
        except Exception as e:  # noqa: BLE001 - every download failure becomes one line naming the shard
            raise CheckpointError(f"{self.repo_id}/{name}: download failed: {_reason(e)}") from None
        self.downloaded.append(name)
        got = Path(path)
        if got.stat().st_size != shard.size:
            size = got.stat().st_size
            self._discard(name, got)
            raise CheckpointError(f"{self.repo_id}/{name}: downloaded {size} bytes, the Hub announced {shard.size}")
        return got


class _Background:
    """A download on a daemon thread: an interrupted scan does not wait for it. An abandoned job hands its
    result to ``on_abandon`` (to delete what it downloaded) when it finishes, or at once if it has."""

    def __init__(self, fn, what: str, on_abandon=None) -> None:
        self._result = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        self._on_abandon = on_abandon
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name=f"spectrum_fast-{what}")
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting scan, which raises it
            self._result = e
        finally:
            with self._lock:
                self._done.set()
                abandoned = self._abandoned
            if abandoned:
                self._clean_up()

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            finished = self._done.is_set()
        if finished:
            self._clean_up()

    def _clean_up(self) -> None:
        if self._on_abandon is not None and not isinstance(self._result, BaseException) and self._result is not None:
            self._on_abandon(self._result)

    def result(self):
        self._done.wait()
        if isinstance(self._result, BaseException):
            raise self._result
        assert self._result is not None
        return self._result


def _silent_tqdm():
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- resolving a repo ----------------------------------------------------------------------------------


def open_remote(repo_id: str, *, revision: str | None = None, token: str | bool | None = None
                ) -> tuple[HubRepo, dict[str, TensorInfo], list[SourceFile]]:
    """Pin ``revision`` of ``repo_id`` on the Hub and read all its shards' headers by range requests."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    ep, cdir = endpoint(), cache_dir()
    where = f"{repo_id}" + (f"@{revision}" if revision else "")

    def meta(filename: str, rev: str | None):
        url = hf_hub_url(repo_id, filename, revision=rev, endpoint=ep)
        return get_hf_file_metadata(url, token=token, endpoint=ep)

    try:
        try:
            index_meta = meta(INDEX, revision)
            commit = _commit(index_meta, where)
            index_path = hf_hub_download(repo_id, INDEX, revision=commit, cache_dir=cdir, token=token, endpoint=ep)
            try:
                weight_map = json.loads(Path(index_path).read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{where}/{INDEX}: not a valid safetensors index (needs a 'weight_map')"
                                      ) from None
        except EntryNotFoundError:
            commit = _commit(meta(SINGLE, revision), where)
            names = [SINGLE]
        with ThreadPoolExecutor(max_workers=8) as pool:
            metas = list(pool.map(lambda n: meta(n, commit), names))
    except CheckpointError:
        raise
    except EntryNotFoundError:
        raise CheckpointError(f"{where}: the repo has neither {INDEX} nor {SINGLE}") from None
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo or revision: one line for the user
        raise CheckpointError(f"{where}: cannot read the model from {ep}: {_reason(e)}") from None

    _remember_ref(cdir, repo_id, revision or "main", commit)
    shards: dict[str, RemoteShard] = {}
    for name, m in zip(names, metas):
        if m.size is None or m.etag is None:
            raise CheckpointError(f"{where}/{name}: the Hub did not say the file's size and ETag")
        cached = try_to_load_from_cache(repo_id, name, cache_dir=cdir, revision=commit)
        cached = cached if isinstance(cached, str) and os.path.getsize(cached) == m.size else None
        shards[name] = RemoteShard(name, m.size, m.etag, cached)
    repo = HubRepo(repo_id, commit, ep, cdir, token, shards)

    def table(name: str) -> tuple[dict[str, TensorInfo], SourceFile]:
        shard = shards[name]
        if shard.cached:
            raw = read_header(Path(shard.cached))[1]
            path = Path(shard.cached)
        else:
            raw = _remote_header(repo, name)
            path = repo.placeholder(name)
        tensors = tensor_table(path, raw, shard.size)
        source = SourceFile(f"hf://{repo_id}@{commit}/{name}", shard.size, 0, hashlib.sha256(raw).hexdigest())
        return tensors, source

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            tables = list(pool.map(table, names))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - network or HTTP failure while reading headers: one line
        raise CheckpointError(f"{where}: cannot read the shards' headers from {ep}: {_reason(e)}") from None
    tensors: dict[str, TensorInfo] = {}
    for name, (t, _) in zip(names, tables):
        for tname in t:
            if tname in tensors:
                raise CheckpointError(f"{where}: tensor '{tname}' appears in two shards ({name} and another)")
        tensors.update(t)
    return repo, tensors, [s for _, s in tables]


def _remember_ref(cdir: str, repo_id: str, ref: str, commit: str) -> None:
    """Record in the cache which commit ``ref`` names, as huggingface_hub does, so that shards kept in
    the cache are found again by ref (also offline)."""
    if ref == commit:
        return
    path = Path(cdir) / f"models--{repo_id.replace('/', '--')}" / "refs" / ref
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != commit:
            path.write_text(commit)
    except OSError:
        pass  # only an optimisation for the next run


def _commit(m, where: str) -> str:
    if not m.commit_hash:
        raise CheckpointError(f"{where}: the Hub did not say which commit it serves (no X-Repo-Commit header)")
    return m.commit_hash


def _remote_header(repo: HubRepo, name: str) -> bytes:
    """The raw safetensors header of a shard on the Hub, by one or two range requests."""
    size = repo.shards[name].size
    where = f"{repo.repo_id}/{name}"
    if size < 8:
        raise CheckpointError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    first = _range(repo, name, 0, min(size, _HEAD_PROBE), retries=_RETRIES)
    n = parse_header_prefix(where, first, size)
    raw = first[8:8 + n]
    if len(raw) < n:
        raw += _range(repo, name, len(first), 8 + n, retries=_RETRIES)
    if len(raw) != n:
        raise CheckpointError(f"{where}: the server sent {len(raw)} of the header's {n} bytes")
    return raw


def _range(repo: HubRepo, name: str, start: int, end: int, retries: int = 0) -> bytes:
    """Bytes ``[start, end)`` of a shard, by an HTTP range request (retried after dropped connections
    and server errors, with a growing pause)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo.repo_id, name, revision=repo.commit, endpoint=repo.endpoint)
    headers = build_hf_headers(token=repo.token)
    headers["Range"] = f"bytes={start}-{end - 1}"
    headers["Accept-Encoding"] = "identity"
    for attempt in range(retries + 1):
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True) as r:
                if r.status_code >= 500 and attempt < retries:
                    time.sleep(min(8.0, 0.5 * 2**attempt))
                    continue
                if r.status_code == 200:
                    # the server ignores ranges: read no further than needed (never a whole shard into memory)
                    body = bytearray()
                    for chunk in r.iter_bytes():
                        body += chunk
                        if len(body) >= end:
                            break
                    if len(body) < end:
                        raise CheckpointError(f"{repo.repo_id}/{name}: the server sent {len(body)} bytes, "
                                              f"fewer than the {end} needed")
                    return bytes(body[start:end])
                if r.status_code != 206:
                    r.read()
                    hf_raise_for_status(r)
                    raise CheckpointError(f"{repo.repo_id}/{name}: range request answered with HTTP {r.status_code}")
                return r.read()
        except (CheckpointError, HfHubHTTPError):
            raise  # an answer, not a transport failure: retrying would get the same
        except Exception:
            if attempt == retries:
                raise
            time.sleep(min(8.0, 0.5 * 2**attempt))
    raise AssertionError("unreachable")


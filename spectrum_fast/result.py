"""Scan results: one record per matrix, and the files they are exchanged in (SPEC.md §4).

* The project's own file ``spectrum_fast_<slug>.json`` keeps everything (statistics, shapes, dtypes, the
  scan's settings, the fingerprints of the weight files it came from) and round-trips exactly.
* The reference-compatible file ``snr_results_<slug>.json`` is the flat ``{module: {snr, type}}`` object
  the reference tool and axolotl read. Its grouped variant ``{type: {module: snr}}`` is read too.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import ensure_writable_dir, write_text_atomic
from .errors import ResultFileError
from .naming import MOE_EXPERT, module_type

if TYPE_CHECKING:
    from .selection import Selection

FORMAT = "spectrum_fast.scan"
FORMAT_VERSION = 1
DEFAULT_OUT_DIR = "model_snr_results"


def reference_file_name(slug: str) -> str:
    return f"snr_results_{slug}.json"


def full_file_name(slug: str) -> str:
    return f"spectrum_fast_{slug}.json"


@dataclass
class MatrixRecord:
    """Outcome for one weight matrix. ``snr`` is NaN unless ``status == "ok"``."""

    module: str
    type: str
    snr: float
    shape: tuple[int, int] | None = None
    dtype: str | None = None
    status: str = "ok"
    method: str | None = None
    sigma_max: float | None = None
    tau: float | None = None
    n_signal: int | None = None
    noise_free: bool | None = None

    @property
    def selectable(self) -> bool:
        return self.status == "ok" and not math.isnan(self.snr)

    @property
    def numel(self) -> int | None:
        return self.shape[0] * self.shape[1] if self.shape else None


@dataclass
class ScanResult:
    """All matrices of one model, plus what is needed to reproduce and check the scan."""

    model: str
    slug: str
    records: list[MatrixRecord]
    skipped: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] | None = None
    embedding_names: list[str] | None = None
    head_names: list[str] | None = None
    backend: str | None = None
    elapsed_s: float | None = None
    tool_version: str | None = None
    origin: str = "scan"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, module: str) -> MatrixRecord:
        for r in self.records:
            if r.module == module:
                return r
        raise KeyError(module)

    @property
    def snr(self) -> dict[str, float]:
        return {r.module: r.snr for r in self.records}

    def select(self, top: float = 0.5, *, grouping: str = MOE_EXPERT, stacks: str = "merged") -> Selection:
        """Top fraction of modules per type (SPEC.md §3); ``stacks="separate"`` ranks each stack of blocks
        (CLIP's text and vision towers) on its own."""
        from .selection import select

        return select(self, top, grouping=grouping, stacks=stacks)

    # -- files -------------------------------------------------------------------------------------

    def to_reference_dict(self) -> dict[str, dict[str, Any]]:
        return {r.module: {"snr": r.snr, "type": r.type} for r in self.records}

    def to_dict(self) -> dict[str, Any]:
        d = {"format": FORMAT, "format_version": FORMAT_VERSION}
        d.update({k: v for k, v in asdict(self).items() if k != "records"})
        d["records"] = [asdict(r) for r in self.records]
        return d

    def save(self, out_dir: str | os.PathLike = DEFAULT_OUT_DIR) -> tuple[Path, Path]:
        """Write the full result and the reference-compatible file atomically; returns both paths."""
        d = ensure_writable_dir(out_dir)
        full = write_text_atomic(d / full_file_name(self.slug), json.dumps(self.to_dict(), indent=1) + "\n")
        ref = write_text_atomic(d / reference_file_name(self.slug),
                                json.dumps(self.to_reference_dict(), indent=4) + "\n")
        return full, ref

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> ScanResult:
        """Build from any supported layout: ours, the reference's flat one, or its grouped one."""
        if not isinstance(d, dict):
            raise ResultFileError(f"{source}: expected a JSON object at the top level")
        if d.get("format") == FORMAT:
            return cls._from_full(d, source)
        if not d:
            raise ResultFileError(f"{source}: the result file holds no modules")
        values = list(d.values())
        if all(isinstance(v, dict) and "snr" in v for v in values):
            records = [MatrixRecord(m, str(v.get("type") or module_type(m)), _as_float(v["snr"], source, m))
                       for m, v in d.items()]
            origin = "reference-flat"
        elif all(isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values())
                 for v in values):
            records = [MatrixRecord(m, t, _as_float(x, source, m)) for t, group in d.items()
                       for m, x in group.items()]
            origin = "reference-grouped"
        else:
            raise ResultFileError(
                f"{source}: not a Spectrum result (expected {{module: {{snr, type}}}} or {{type: {{module: snr}}}})")
        stem = Path(source).stem
        slug = stem.removeprefix("snr_results_")
        return cls(model=slug, slug=slug, records=records, origin=origin)

    @classmethod
    def _from_full(cls, d: dict[str, Any], source: str) -> ScanResult:
        if d.get("format_version") != FORMAT_VERSION:
            raise ResultFileError(f"{source}: unsupported format version {d.get('format_version')!r}")
        try:
            records = [_record(r) for r in d["records"]]
            fields = {k: v for k, v in d.items() if k not in ("format", "format_version", "records")}
            result = cls(records=records, **fields)
        except (KeyError, TypeError, ValueError) as e:
            raise ResultFileError(f"{source}: malformed spectrum_fast result ({e})") from None
        checks = [
            (isinstance(result.model, str) and isinstance(result.slug, str)
             and _SAFE_SLUG.match(result.slug) is not None, "model/slug"),
            (isinstance(result.settings, dict), "settings"),
            (result.sources is None or isinstance(result.sources, list), "sources"),
            (all(v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v))
                 for v in (result.embedding_names, result.head_names)), "embedding_names/head_names"),
            (isinstance(result.skipped, list), "skipped"),
        ]
        bad = [what for ok, what in checks if not ok]
        if bad:
            raise ResultFileError(f"{source}: malformed spectrum_fast result (field {bad[0]})")
        return result

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScanResult:
        """Read a result file: ours, or the reference's flat or grouped JSON (``Infinity``/``NaN`` ok)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ResultFileError(f"{path}: cannot read ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise ResultFileError(f"{path}: not a text (UTF-8) file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ResultFileError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))


_SAFE_SLUG = re.compile(r"^[^/\\\x00]+$")


def _record(r: Any) -> MatrixRecord:
    """One record of our own file, type-checked (a hand-edited file must fail here, not later)."""
    if not isinstance(r, dict):
        raise TypeError("a record is not an object")
    rec = MatrixRecord(**{**r, "shape": tuple(r["shape"]) if r.get("shape") is not None else None})
    if not (isinstance(rec.module, str) and isinstance(rec.type, str) and isinstance(rec.status, str)):
        raise TypeError(f"record {rec.module!r}: module, type and status must be strings")
    if rec.snr is None:
        rec.snr = math.nan
    if isinstance(rec.snr, bool) or not isinstance(rec.snr, (int, float)):
        raise TypeError(f"record {rec.module!r}: snr must be a number")
    if rec.shape is not None and (len(rec.shape) != 2 or not all(type(x) is int and x >= 0 for x in rec.shape)):
        raise ValueError(f"record {rec.module!r}: shape must be two non-negative integers")
    return rec


def _as_float(x: Any, source: str, module: str) -> float:
    if x is None:
        return math.nan
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ResultFileError(f"{source}: module '{module}' has a non-numeric snr {x!r}")
    return float(x)

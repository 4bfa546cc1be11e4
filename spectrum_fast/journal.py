"""A scan's journal: every finished matrix is appended (and fsync'd) as one JSON line, so a scan killed at
any moment (SIGKILL included) resumes where it stopped instead of starting over.

The first line says what the journal belongs to (the weight files' fingerprints and the scan's
settings); a journal of other weights or settings is discarded, never mixed in. A torn last line, from
a kill in the middle of a write, is dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import ResultFileError
from .result import MatrixRecord

FORMAT = "spectrum_fast.journal"


class Journal:
    """Append-only record of finished matrices for one scan."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.header = {"format": FORMAT, **header}
        self.resumed: list[MatrixRecord] = []
        self.note: str | None = None
        self._file = None

    def open(self) -> Journal:
        """Load what an earlier run of the same scan finished, then open for appending."""
        good_end = 0
        if self.path.is_file():
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
            try:
                same = json.loads(lines[0]) == json.loads(json.dumps(self.header))
            except (ValueError, UnicodeDecodeError):
                same = False
            if not same:
                self.note = f"{self.path} belongs to other weights or settings: starting over"
            else:
                good_end = len(lines[0]) + 1
                for line in lines[1:]:
                    try:
                        rec = MatrixRecord(**json.loads(line))
                    except (ValueError, TypeError, UnicodeDecodeError):
                        break  # a torn last line: the kill came in the middle of a write
                    rec.shape = tuple(rec.shape) if rec.shape is not None else None
                    self.resumed.append(rec)
                    good_end += len(line) + 1
                if self.resumed:
                    self.note = f"resuming from {self.path}: {len(self.resumed)} matrices already done"
        try:
            if good_end:
                self._file = open(self.path, "r+b")  # noqa: SIM115 - kept open for the whole scan
                self._file.truncate(good_end)
                self._file.seek(good_end)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "wb")  # noqa: SIM115
                self._write(self.header)
        except OSError as e:
            raise ResultFileError(f"{self.path}: cannot write the scan journal ({e.strerror or e})") from None
        return self

    def _write(self, obj: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(obj).encode() + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, record: MatrixRecord) -> None:
        self._write(asdict(record))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

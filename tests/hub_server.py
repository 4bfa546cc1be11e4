"""A Hugging Face Hub look-alike on loopback, for scanning "from the Hub" without a network.

It serves what ``huggingface_hub`` asks for when it downloads a file: ``HEAD`` and ``GET`` on
``/{repo}/resolve/{revision}/{file}`` with the Hub's headers (``X-Repo-Commit``, ``ETag``, the
``X-Error-Code`` of a missing repo, revision or file), and byte ranges (``206 Partial Content``). It can
cut a download off half-way once, and it logs every request, so tests check what went over the wire.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


@dataclass
class Repo:
    #: commit sha -> {filename: local file served}
    commits: dict[str, dict[str, Path]]
    #: branch or tag -> commit sha
    refs: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    repo: str
    revision: str
    filename: str
    range: str | None
    status: int


class FakeHub:
    """``with FakeHub({...}) as hub: os.environ["HF_ENDPOINT"] = hub.url``."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.log: list[Request] = []
        #: filenames whose next full GET is cut off after half the body
        self.cut_once: set[str] = set()
        #: filenames whose next full GET fails with HTTP 500
        self.fail_once: set[str] = set()
        #: filenames whose next ranged GET past the header fails with HTTP 500
        self.fail_ranged_once: set[str] = set()
        #: filenames whose every GET fails with HTTP 500
        self.fail_always: set[str] = set()
        #: answer every GET with the whole file (200), as servers without range support do
        self.ignore_ranges = False
        #: called with the filename before a GET of a file's body is answered
        self.on_get: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._etags: dict[str, str] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def etag(self, path: Path) -> str:
        """sha256 of the file, as the Hub's ETag of an LFS file (computed once per file)."""
        key = str(path)
        with self._lock:
            if key not in self._etags:
                self._etags[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            return self._etags[key]

    def gets(self, filename: str, *, ranged: bool | None = None) -> list[Request]:
        """GET requests for ``filename`` (only ranged ones, only whole-file ones, or all)."""
        return [r for r in self.log if r.method == "GET" and r.filename == filename
                and (ranged is None or (r.range is not None) == ranged)]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _fail(self, status: int, code: str, req: Request, commit: str | None = None) -> None:
                req.status = status
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body: bool) -> None:
                m = re.fullmatch(r"/(?:models/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                req = Request(self.command, "", "", "", self.headers.get("Range"), 0)
                with hub._lock:
                    hub.log.append(req)
                if not m:
                    return self._fail(404, "RepoNotFound", req)
                req.repo, req.revision, req.filename = m[1], unquote(m[2]), unquote(m[3])
                repo = hub.repos.get(req.repo)
                if repo is None:
                    return self._fail(404, "RepoNotFound", req)
                commit = repo.refs.get(req.revision, req.revision)
                if commit not in repo.commits:
                    return self._fail(404, "RevisionNotFound", req)
                path = repo.commits[commit].get(req.filename)
                if path is None:
                    return self._fail(404, "EntryNotFound", req, commit)
                with hub._lock:
                    fail = body and not req.range and req.filename in hub.fail_once
                    hub.fail_once.discard(req.filename if fail else "")
                    ranged = body and bool(req.range) and not req.range.startswith("bytes=0-")
                    if ranged and req.filename in hub.fail_ranged_once:
                        hub.fail_ranged_once.discard(req.filename)
                        fail = True
                    fail = fail or (body and req.filename in hub.fail_always)
                if fail:
                    return self._fail(500, "InternalError", req, commit)
                size = path.stat().st_size
                etag = hub.etag(path)
                start, end = 0, size
                status = 200
                if req.range and not hub.ignore_ranges:
                    rm = re.fullmatch(r"bytes=(\d+)-(\d*)", req.range)
                    if rm:
                        start = int(rm[1])
                        end = min(size, int(rm[2]) + 1) if rm[2] else size
                        status = 206
                req.status = status
                self.send_response(status)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.end_headers()
                if not body:
                    return
                if hub.on_get is not None and not req.range:
                    hub.on_get(req.filename)
                cut = False
                with hub._lock:
                    if req.filename in hub.cut_once and not req.range:
                        hub.cut_once.discard(req.filename)
                        cut = True
                with open(path, "rb") as f:
                    f.seek(start)
                    if cut:  # promise the whole file, send half, hang up: a dropped connection
                        self.wfile.write(f.read((end - start) // 2))
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    left = end - start
                    while left > 0:
                        chunk = f.read(min(left, 8 * 2**20))
                        self.wfile.write(chunk)
                        left -= len(chunk)

        return Handler

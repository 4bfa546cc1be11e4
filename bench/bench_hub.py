"""Scanning from the Hub: whole shards (``--fetch shards``) against range requests (``--fetch ranges``).

    python bench/bench_hub.py --json bench/results/hub_loopback.json            # loopback Hub, synthetic model
    python bench/bench_hub.py --repo mistralai/Mistral-7B-v0.1 --json out.json  # the real Hub (needs network)

Each mode brings every matrix a default scan covers to local disk, batch by batch, exactly as ``scan()``
stages them, from an empty cache, without the math (which is the same in both modes; tests/test_hub.py
checks that both give identical SNRs). Reported: wall time, bytes moved over HTTP, throughput, and peak
disk use of the cache directory (sampled every 20 ms, counting allocated blocks, so sparse files count
what they hold).

Without ``--repo`` it serves a synthetic Mistral-7B (first ``--layers`` layers, 2 shards) from the tests'
loopback Hub (``tests/hub_server.py``, Python's http.server on this machine): the numbers then measure
this tool's overheads, not a network. The real Hub (CDN, Xet) is where the choice matters; run it there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _machine import machine_info, write_result


def disk_used(d: Path) -> int:
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def run_mode(repo: str, fetch: str, cache: Path, batch_bytes: int) -> dict:
    """Bring every matrix of a default scan to local disk batch by batch, as scan() does, without the math:
    the transfer alone (the math is the same in both modes)."""
    from spectrum_fast.checkpoint import open_checkpoint
    from spectrum_fast.scanner import _tensors_to_scan

    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    os.environ["HF_HUB_CACHE"] = str(cache)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], disk_used(cache))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        ck = open_checkpoint(repo)
        t_headers = time.perf_counter() - t0
        remote = ck.remote
        remote.fetch, remote.batch_bytes, remote.progress = fetch, batch_bytes, False
        chosen, _ = _tensors_to_scan(ck.tensors.values(), None, False, True)
        chosen.sort(key=lambda i: (str(i.file), i.offset))
        n = 0
        for batch in remote.stage(chosen):
            n += len(batch)
            for info in batch:  # touch the bytes, as the engine's pread would
                with open(info.file, "rb") as f:
                    f.seek(info.offset)
                    f.read(info.nbytes)
    finally:
        elapsed = time.perf_counter() - t0
        stop.set()
        sampler.join()
    moved = sum(remote.shards[s].size for s in remote.downloaded) if fetch == "shards" else remote.fetched_bytes
    return {"fetch": fetch, "batch_bytes": batch_bytes if fetch == "ranges" else None, "wall_s": elapsed,
            "headers_s": t_headers, "bytes_moved": moved, "matrix_bytes": sum(i.nbytes for i in chosen),
            "peak_disk_bytes": peak[0], "matrices": n, "MBps": moved / elapsed / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", help="a Hub repo id (default: a synthetic model on a loopback Hub)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-mb", type=int, default=256, help="batch size of --fetch ranges (default 256)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_hub-"))
    server = None
    try:
        if args.repo:
            repo = args.repo
        else:
            from synth_checkpoint import write

            from tests.hub_server import FakeHub, Repo

            config = json.loads((HERE / "configs" / "Mistral-7B.json").read_text())
            src = work / "src"
            write(config, src, args.layers, shard_bytes=400 * 2**20, progress=False)
            files = {p.name: p for p in src.iterdir()}
            repo = "bench/mistral-7b-synthetic"
            server = FakeHub({repo: Repo({"c" * 40: files}, {"main": "c" * 40})}).__enter__()
            for f in files.values():  # the server's ETags (sha256) up front, out of the timings
                server.etag(f)
            os.environ["HF_ENDPOINT"] = server.url
        rows = [run_mode(repo, fetch, work / f"cache-{fetch}", args.batch_mb * 2**20) for fetch in ("shards", "ranges")]
    finally:
        if server is not None:
            server.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)
    same = rows[0]["matrices"] == rows[1]["matrices"]
    for r in rows:
        print(f"{r['fetch']:>7}: {r['wall_s']:6.1f} s ({r['headers_s']:.1f} s headers), "
              f"{r['bytes_moved'] / 2**20:8.1f} MiB moved ({r['matrix_bytes'] / 2**20:.1f} MiB of matrices), "
              f"{r['MBps']:7.1f} MB/s, peak disk {r['peak_disk_bytes'] / 2**20:8.1f} MiB")
    print(f"ranges / shards wall time: {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                            check=False).stdout.strip()
    doc = {"bench": "hub", "where": args.repo or "loopback FakeHub (tests/hub_server.py), synthetic Mistral-7B "
           f"{args.layers} layers", "git_commit": commit, "machine": machine_info(),
           "command": "python bench/bench_hub.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "modes": rows}
    write_result(args.json, doc)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""Starting test workers on several CPU ranks (gloo) with the environment torchrun sets, without torchrun's
extra process, and collecting what each rank wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKERS = Path(__file__).resolve().parent / "distributed"


class _PortTaken(Exception):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker: str, args: list[str], out: Path, world: int = 2, timeout_s: float = 240) -> list[dict]:
    """Start ``tests/distributed/<worker> *args out`` on ``world`` ranks; each rank's ``rank<r>.json``.

    A rank that dies stops the run at once (the others would wait forever in a collective); a hang
    ends at ``timeout_s``. Both fail the test with every rank's log.
    """
    try:
        return _run_once(worker, args, out, world, timeout_s)
    except _PortTaken:  # the probed port was taken before the workers bound it: once more
        return _run_once(worker, args, out, world, timeout_s)


def _run_once(worker: str, args: list[str], out: Path, world: int, timeout_s: float) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
        log = open(out / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, str(WORKERS / worker), *map(str, args), str(out)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p, _ in procs):
                break
            time.sleep(0.2)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    logs = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n"
                     + (out / f"rank{r}.log").read_text(errors="replace")[-6000:] for r, (p, _) in enumerate(procs))
    if any(p.returncode != 0 for p, _ in procs):
        if "address already in use" in logs.lower():
            raise _PortTaken
        why = "timed out" if time.monotonic() > deadline else "failed"
        pytest.fail(f"{worker} {args[0] if args else ''}: workers {why}\n{logs}", pytrace=False)
    return [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(world)]

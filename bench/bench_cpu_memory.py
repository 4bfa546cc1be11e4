"""CPU memory: the float64 Gram matrix by blocks against a float64 copy of the whole matrix, and a whole CPU
scan of big matrices against an earlier tree of spectrum_fast, in the same run.

    python bench/bench_cpu_memory.py --gram 14336x4096 4096x14336 --scan-shape 49152x8192 --count 4 \\
        --baseline /tmp/old --json bench/results/cpu_memory.json

1. ``--gram``: per shape, on one BLAS thread, seconds and peak numpy memory (tracemalloc) of
   ``cpu_engine.gram64`` and of the way it used to be formed (``w.astype(float64)``, then ``x.T @ x``), and
   the largest difference between the two (lower triangles, relative to the largest entry).
2. ``--scan-shape``: a synthetic bf16 checkpoint of ``--count`` such matrices (bench/synth_checkpoint.py's
   low-rank signal plus noise), scanned on the CPU in a fresh process by this tree and by the tree at
   ``--baseline`` (e.g. ``git archive <commit> | tar -x -C /tmp/old``): wall seconds, peak RSS (wait4), the
   largest relative SNR difference and whether both chose the same routes. A scan that dies (out of memory)
   is recorded with its exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from _machine import machine_info, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_CHILD = """
import json, sys, time
import spectrum_fast
t0 = time.perf_counter()
res = spectrum_fast.scan(sys.argv[1], device="cpu", progress=False)
json.dump({"file": spectrum_fast.__file__, "wall_s": time.perf_counter() - t0,
           "records": {r.module: [r.snr, r.method] for r in res.records}}, open(sys.argv[2], "w"))
"""


def _shape(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def _peak_and_seconds(fn) -> tuple[int, float, object]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
        return tracemalloc.get_traced_memory()[1] - base, seconds, out
    finally:
        tracemalloc.stop()


def gram_rows(shapes: list[tuple[int, int]]) -> list[dict]:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from spectrum_fast import cpu_engine

    rows = []
    for m, n in shapes:
        w = np.random.default_rng(0).standard_normal((m, n), dtype=np.float32)

        def whole(w=w):
            x = w.astype(np.float64)
            return x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T

        with threadpool_limits(1):
            peak_new, s_new, g = _peak_and_seconds(lambda w=w: cpu_engine.gram64(w))
            peak_old, s_old, g0 = _peak_and_seconds(whole)
        diff = float(np.abs(np.tril(g) - np.tril(g0)).max() / np.abs(g0).max())
        row = {"shape": [m, n], "blocked_s": round(s_new, 3), "whole_copy_s": round(s_old, 3),
               "speedup": round(s_old / s_new, 3), "blocked_peak_mb": round(peak_new / 2**20, 1),
               "whole_copy_peak_mb": round(peak_old / 2**20, 1), "peak_ratio": round(peak_new / peak_old, 3),
               "max_rel_diff": diff}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _scan(tree: Path, ckpt: Path, out: Path, enter: tuple[str, ...] = ()) -> dict:
    """A CPU scan of ``ckpt`` by the package in ``tree``, in a fresh process (started through ``enter``, a command
    that ends by exec'ing its arguments, e.g. into a cgroup): exit status, seconds, peak RSS, the records."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    t = time.perf_counter()
    # from another folder: "python -c" puts the current one first on sys.path
    proc = subprocess.Popen([*enter, sys.executable, "-c", _CHILD, str(ckpt), str(out)], env=env, cwd=out.parent)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    row = {"tree": str(tree), "exit": proc.returncode, "process_s": round(time.perf_counter() - t, 2),
           "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}
    if row["exit"] == 0:
        doc = json.loads(out.read_text())
        row.update(imported=doc["file"], scan_s=round(doc["wall_s"], 2), records=doc["records"])
    print(json.dumps({k: v for k, v in row.items() if k != "records"}), flush=True)
    return row


def checkpoint(shape: tuple[int, int], count: int, workdir: Path) -> Path:
    """A synthetic bf16 checkpoint of ``count`` ``shape`` matrices under ``workdir`` (kept for the next run)."""
    sys.path.insert(0, str(HERE))
    import synth_checkpoint as synth

    ckpt = workdir / f"memory-{shape[0]}x{shape[1]}x{count}"
    if not (ckpt / "model.safetensors.index.json").exists():
        specs = [synth.Spec(f"model.layers.{i}.mlp.up_proj.weight", shape, "BF16", i) for i in range(count)]
        synth.write({"_name_or_path": "memory-bench"}, ckpt, count, specs=specs)
    return ckpt


def compare(ours: dict, base: dict) -> dict:
    """Both scans' rows without their records and, where both finished, how they differ."""
    out = {k: {kk: vv for kk, vv in v.items() if kk != "records"} for k, v in (("ours", ours), ("baseline", base))}
    if ours["exit"] == 0 and base["exit"] == 0:
        a, b = ours["records"], base["records"]
        out["max_rel_snr_diff"] = max(abs(a[k][0] - b[k][0]) / abs(b[k][0]) for k in b)
        out["same_routes"] = all(a[k][1] == b[k][1] for k in b)
        out["routes"] = sorted({v[1] for v in a.values()})
        out["peak_rss_ratio"] = round(ours["peak_rss_gb"] / base["peak_rss_gb"], 3)
        out["speedup"] = round(base["scan_s"] / ours["scan_s"], 3)
    return out


def scan_rows(shape: tuple[int, int], count: int, baseline: Path, workdir: Path) -> dict:
    ckpt = checkpoint(shape, count, workdir)
    ours, base = _scan(ROOT, ckpt, workdir / "ours.json"), _scan(baseline, ckpt, workdir / "base.json")
    return {"shape": list(shape), "count": count, "checkpoint_gb": round(count * shape[0] * shape[1] * 2 / 2**30, 2),
            **compare(ours, base)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gram", nargs="*", default=["14336x4096", "4096x14336"], help="shapes MxN")
    ap.add_argument("--scan-shape", default=None, help="MxN of the scanned matrices (no scan part without it)")
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier tree of the repository")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sf_memory_bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    doc: dict = {"bench": "cpu_memory", "machine": machine_info(), "command": " ".join(sys.argv)}
    doc["gram"] = gram_rows([_shape(s) for s in args.gram])
    if args.json:
        write_result(args.json, doc)
    if args.scan_shape:
        if args.baseline is None:
            ap.error("--scan-shape needs --baseline")
        args.workdir.mkdir(parents=True, exist_ok=True)
        doc["scan"] = scan_rows(_shape(args.scan_shape), args.count, args.baseline, args.workdir)
        print(json.dumps({k: v for k, v in doc["scan"].items() if k not in ("ours", "baseline")}), flush=True)
    if args.json:
        write_result(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which LAPACK eigensolver should the CPU engine run, from which order on? MRRR (``?syevr``, through scipy)
against the two-stage solver (``?syevd_2stage``, through ctypes: spectrum_fast.lapack), values only, on Gram
matrices, in float32 and float64, with the BLAS threads each engine worker gets.

    python bench/bench_cpu_eigensolver.py --json bench/results/cpu_eigensolver.json
    python bench/bench_cpu_eigensolver.py --sizes 1024 4096 --e2e Mistral-7B --layers 1 --json out.json

Per order ``k``: the seconds of each solver (the best of ``--repeat``), their ratio, and each one's largest
eigenvalue difference from float64 ``numpy.linalg.eigvalsh`` relative to the largest eigenvalue;
``crossover_k`` is the smallest measured order from which the two-stage solver is faster at every larger
measured order in both precisions (``cpu_engine.TWO_STAGE_MIN_K`` is set from it).

``--e2e MODEL`` also scans a generated checkpoint with that model's shapes (bench/configs, ``--layers``
decoder layers) end to end twice in the same run, page cache warm: with syevr at every order (the engine
before the two-stage solver) and with the engine's default rule; it reports both times, their ratio, the
methods the guard chose and the largest SNR difference between the two scans.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, write_result


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def solver_rows(sizes: list[int], repeat: int) -> list[dict]:
    import numpy as np
    import scipy.linalg

    from spectrum_fast import lapack

    rows = []
    for k in sizes:
        x = np.random.default_rng(k).standard_normal((k, k))
        gram = x.T @ x  # Marchenko-Pastur spectrum, as a weight's Gram matrix
        want = np.linalg.eigvalsh(gram)
        for dtype in (np.float32, np.float64):
            a = gram.astype(dtype)
            t_mrrr, mrrr = _best(lambda a=a: scipy.linalg.eigh(a.copy(), eigvals_only=True, driver="evr",
                                                               overwrite_a=True, check_finite=False), repeat)
            t_two, two = _best(lambda a=a: lapack.syevd_2stage(a.copy()), repeat)
            row = {"k": k, "dtype": np.dtype(dtype).name, "syevr_s": round(t_mrrr, 4),
                   "syevd_2stage_s": round(t_two, 4), "speedup": round(t_mrrr / t_two, 3),
                   "syevr_err": float(np.abs(mrrr - want).max() / want[-1]),
                   "syevd_2stage_err": float(np.abs(two - want).max() / want[-1])}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def crossover(rows: list[dict]) -> int | None:
    """The smallest k from which the two-stage solver wins at every larger k, in both precisions."""
    ks = sorted({r["k"] for r in rows})
    wins = {k: all(r["speedup"] > 1 for r in rows if r["k"] == k) for k in ks}
    best = None
    for k in reversed(ks):
        if not wins[k]:
            break
        best = k
    return best


def e2e(model: str, layers: int, workdir: Path, workers: int | None) -> dict:
    import bench_scale

    import spectrum_fast
    from spectrum_fast import cpu_engine

    config = json.loads((bench_scale.CONFIGS / f"{model}.json").read_text())
    ckpt = bench_scale.ensure_checkpoint(model, config, layers, workdir)
    for f in sorted(ckpt.glob("*.safetensors")):  # warm the page cache: both scans read from memory
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    default_min_k = cpu_engine.TWO_STAGE_MIN_K
    out: dict = {"model": model, "layers": layers, "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")),
                 "two_stage_min_k": default_min_k, "eigensolver": cpu_engine.eigensolver()}
    results = {}
    for label, min_k in (("syevr_only", 1 << 62), ("default", default_min_k)):
        cpu_engine.TWO_STAGE_MIN_K = min_k
        try:
            t0 = time.perf_counter()
            res = spectrum_fast.scan(ckpt, device="cpu", workers=workers, progress=False)
            seconds = time.perf_counter() - t0
        finally:
            cpu_engine.TWO_STAGE_MIN_K = default_min_k
        results[label] = res
        methods: dict[str, int] = {}
        for r in res.records:
            methods[r.method] = methods.get(r.method, 0) + 1
        out[label] = {"wall_s": round(seconds, 2), "methods": methods}
        print(f"{model} {layers} layer(s), {label}: {seconds:.1f} s {methods}", file=sys.stderr, flush=True)
    out["speedup"] = round(out["syevr_only"]["wall_s"] / out["default"]["wall_s"], 3)
    a = {r.module: r.snr for r in results["syevr_only"].records}
    b = {r.module: r.snr for r in results["default"].records}
    assert a.keys() == b.keys()
    out["matrices"] = len(a)
    out["max_snr_rel_diff"] = max(abs(b[m] - a[m]) / abs(a[m]) for m in a)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 3072, 4096, 6144, 8192])
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per solver and size; the best counts")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (the engine's workers get cores / workers)")
    ap.add_argument("--e2e", metavar="MODEL", help="also scan a generated checkpoint of this bench/configs model")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of the --e2e checkpoint")
    ap.add_argument("--workers", type=int, help="the --e2e scans' workers (default: the engine's)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/spectrum_fast_scale"))
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)

    from threadpoolctl import threadpool_limits

    from spectrum_fast import cpu_engine, lapack

    if not (lapack.syevd_2stage_available("float32") and lapack.syevd_2stage_available("float64")):
        print("no LAPACKE ?syevd_2stage in this scipy's OpenBLAS: nothing to compare", file=sys.stderr)
        return 1
    doc: dict = {"benchmark": "cpu_eigensolver", "machine": machine_info(), "blas_threads": args.threads,
                 "engine_two_stage_min_k": cpu_engine.TWO_STAGE_MIN_K}
    with threadpool_limits(args.threads):
        doc["rows"] = solver_rows(args.sizes, args.repeat)
    doc["crossover_k"] = crossover(doc["rows"])
    write_result(args.json, doc)
    if args.e2e:
        doc["e2e"] = e2e(args.e2e, args.layers, args.workdir, args.workers)
        write_result(args.json, doc)
    print(json.dumps({k: v for k, v in doc.items() if k not in ("rows", "machine")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

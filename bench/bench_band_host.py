"""Is the native band solver's chase (csrc/band_solver.h) the right amount of work? Runs it on one host thread
(``_C.band_eigenvalues_host``) against LAPACK's ``dsbev_2stage`` (the same scheme, values only; scipy's
OpenBLAS through ctypes) on random symmetric bands, and times the bisection alone (already tridiagonal
bands, nothing to chase) so that the chase's share can be read off:

    OPENBLAS_NUM_THREADS=1 python bench/bench_band_host.py --json bench/results/band_host_cpu.json

Not a GPU figure: the GPU runs one chase per warp, hundreds at once (bench_twostage.py measures that).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, write_result


def lapack_dsbev_2stage():
    from ctypes import c_char, c_int, c_void_p

    from spectrum_fast import lapack

    fn, where = lapack.routine("dsbev_2stage", c_int, c_char, c_char, c_int, c_int, c_void_p, c_int, c_void_p,
                               c_void_p, c_int)
    if fn is None:
        raise SystemExit(where)
    return fn


def main(argv: list[str] | None = None) -> int:
    from spectrum_fast import _C

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["1024:32", "2048:32", "2048:16"], help="n:b pairs")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    dsbev = lapack_dsbev_2stage()
    rng = np.random.default_rng(0)
    rows = []
    for case in args.cases:
        n, b = (int(x) for x in case.split(":"))
        bands = np.zeros((1, n, 2 * b))
        bands[0, :, : b + 1] = rng.standard_normal((n, b + 1))
        for i in range(1, b + 1):
            bands[0, n - i:, i] = 0
        t = time.perf_counter()
        ours = _C.band_eigenvalues_host(bands, b, 1)[0]
        total = time.perf_counter() - t
        tri = np.ascontiguousarray(bands[:, :, :2])
        t = time.perf_counter()
        _C.band_eigenvalues_host(tri, 1, 1)
        bisection = time.perf_counter() - t
        ab = np.asfortranarray(bands[0, :, : b + 1].T)
        w = np.empty(n)
        t = time.perf_counter()
        info = dsbev(102, b"N", b"L", n, b, ab.ctypes.data, b + 1, w.ctypes.data, None, 1)
        lapack = time.perf_counter() - t
        row = {"n": n, "b": b, "chase_s": total - bisection, "bisection_s": bisection, "lapack_dsbev_2stage_s": lapack,
               "chase_vs_lapack": (total - bisection) / lapack, "steps": n * n // (2 * b),
               "us_per_step": 1e6 * (total - bisection) / (n * n / (2 * b)), "lapack_info": info,
               "max_diff_vs_lapack": float(np.abs(np.sort(ours) - w).max() / np.abs(w).max())}
        rows.append(row)
        print(f"n={n} b={b}: chase {row['chase_s']:.3f} s ({row['us_per_step']:.1f} us a step) + bisection "
              f"{bisection:.3f} s; LAPACK dsbev_2stage {lapack:.3f} s; eigenvalues agree to {row['max_diff_vs_lapack']:.1e}")
    write_result(args.json, {"bench": "band_host", "machine": machine_info(),
                             "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                             "command": "python bench/bench_band_host.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                             "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

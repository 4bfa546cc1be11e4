"""Would a two-stage eigensolver (spectrum_fast/twostage.py: dense to band on the GPU, band to eigenvalues on CPU
cores) beat the one-stage ``syevd`` that is the floor of every GPU scan? Times both in one run:

    python bench/bench_twostage.py --device cuda --json bench/results/twostage_gpu.json
    python bench/bench_twostage.py --device cpu --sizes 512 1024 --json /tmp/twostage_cpu.json

Per k (Gram matrices of k x 3.5k Gaussian weights): ``torch.linalg.eigvalsh`` in fp32 and fp64 (what the
engine's ``Xsyevd`` does), stage 1 per bandwidth, stage 2 on one core and its throughput over
``--threads`` threads (``dsbevd`` through ctypes, which releases the GIL), and the pipelined estimate
``max(stage 1, stage 2 per matrix in the pool)`` against ``syevd``. Accuracy: largest
eigenvalue error against float64 ``eigvalsh``, relative to the largest eigenvalue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, write_result

from spectrum_fast import twostage


def timed(fn, device: str, repeats: int) -> float:
    import torch

    out = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--bands", type=int, nargs="+", default=[64])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    pool = twostage.pool(args.threads)
    for k in args.sizes:
        g = torch.Generator(device=args.device).manual_seed(k)
        w = torch.randn(7 * k // 2, k, device=args.device, generator=g, dtype=torch.float64) * 0.02
        a64 = w.T @ w
        a32 = a64.float()
        del w
        ref = torch.linalg.eigvalsh(a64).cpu().numpy()
        scale = float(np.abs(ref).max())
        row = {"k": k, "syevd_fp32_s": timed(lambda a32=a32: torch.linalg.eigvalsh(a32), args.device, args.repeats),
               "syevd_fp64_s": timed(lambda a64=a64: torch.linalg.eigvalsh(a64), args.device, args.repeats), "bands": []}
        for b in args.bands:
            entry = {"b": b}
            for name, a in (("fp32", a32), ("fp64", a64)):
                twostage.band_reduce(a, b)  # warm-up
                entry[f"stage1_{name}_s"] = timed(lambda a=a, b=b: twostage.band_reduce(a, b), args.device, args.repeats)
                band = twostage.band_reduce(a, b).double().cpu().numpy()
                t = time.perf_counter()
                lam = twostage.band_eigenvalues(band.copy())
                entry[f"stage2_{name}_one_core_s"] = time.perf_counter() - t
                entry[f"max_err_{name}"] = float(np.abs(lam - ref).max() / scale)
                many = [band] * args.threads
                t = time.perf_counter()
                list(pool.map(twostage.band_eigenvalues, many))
                entry[f"stage2_{name}_per_matrix_in_pool_s"] = (time.perf_counter() - t) / len(many)
                entry[f"pipelined_{name}_s"] = max(entry[f"stage1_{name}_s"],
                                                   entry[f"stage2_{name}_per_matrix_in_pool_s"])
                entry[f"speedup_{name}_vs_syevd"] = row[f"syevd_{name}_s"] / entry[f"pipelined_{name}_s"]
            row["bands"].append(entry)
            print(json.dumps({"k": k, **entry}), flush=True)
        rows.append(row)
        print(f"k={k}: syevd fp32 {row['syevd_fp32_s']:.4f} s, fp64 {row['syevd_fp64_s']:.4f} s", flush=True)
    doc = {"bench": "twostage", "device": args.device, "threads": args.threads,
           "stage2": twostage.stage2_backend(), "machine": machine_info(),
           "command": "python bench/bench_twostage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    if args.device == "cuda":
        doc["gpu"] = torch.cuda.get_device_name(0)
    write_result(args.json, doc)
    best = {r["k"]: max(r["bands"], key=lambda e: e["speedup_fp64_vs_syevd"]) for r in rows}
    for k, e in best.items():
        print(f"k={k:>6} best b={e['b']:>4}: pipelined fp64 {e['pipelined_fp64_s']:.4f} s, "
              f"{e['speedup_fp64_vs_syevd']:.2f}x syevd fp64; fp32 {e['speedup_fp32_vs_syevd']:.2f}x; "
              f"errors {e['max_err_fp32']:.1e} / {e['max_err_fp64']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

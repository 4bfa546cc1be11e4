"""Does the two-stage eigensolver (spectrum_fast/twostage.py) beat the one-stage ``syevd`` that is the floor of
every GPU scan? Times both in one run, per matrix, on the same device:

    python bench/bench_twostage.py --device cuda --json bench/results/twostage_gpu.json
    python bench/bench_twostage.py --device cpu --sizes 256 512 --launch 4 --json /tmp/twostage_cpu.json

Per k (Gram matrices of k x 3.5k Gaussian weights, float64):

- ``syevd``: ``torch.linalg.eigvalsh`` in fp64 (what the engine's ``Dsyevd`` float64 pass does), per matrix.
- ``gpu`` mode (``SPECTRUM_FAST_TWOSTAGE=gpu``): stage 1 for one stage-1 batch of
  ``cuda_engine.band_batch(k)`` matrices (torch GEMMs and the native panel QR), per matrix; stages 2 and 3
  (the native band solver) for one launch of ``--launch`` bands (default: four per multiprocessor, as
  :class:`~spectrum_fast.twostage.DeviceBands` launches), per matrix; their sum is the throughput
  estimate (no overlap between the two assumed), and ``speedup_vs_syevd``. Per bandwidth and chase
  variant (``--variants``, csrc/band_solver.h) at the first size; at the larger ones the engine's
  bandwidth with the best variant there (``best_variant``), and the best pair overall. The JSON is
  rewritten after every entry. ``launch_sweep`` (first size, GPU): launches of 1, 2 and 8 bands per
  multiprocessor beside the default 4, to show how many chases one holds; ``crews_sweep`` (the same, if the
  best variant has kCrews): 2 and 8 warps per block beside twostage.CREWS = 4. ``stage3_launch_s`` (per k): the
  same launch of already tridiagonal matrices (nothing to chase), i.e. the bisection alone.
- ``--cpu-stage2``: the old ``cpu`` mode's stage 2 (LAPACK ``dsbevd`` on CPU threads), per matrix in a pool.

Accuracy: the largest eigenvalue error of the whole route against float64 ``eigvalsh`` (on the CPU when
k <= 2048, else the device's), relative to the largest eigenvalue.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, seconds, write_result

from spectrum_fast import twostage

#: An entry whose eigenvalues are further than this from float64 ``eigvalsh`` (relative to each matrix's
#: largest) is wrong: it never wins, and bench_scale.py and gpu_summary.py never use its rates.
ACCURATE = 1e-10


def usable(entry: dict) -> bool:
    """A measured entry that ran and was accurate (:data:`ACCURATE`)."""
    return "error" not in entry and entry.get("max_err", 1.0) < ACCURATE


def gram_batch(k: int, count: int, device: str):
    import torch

    g = torch.Generator(device=device).manual_seed(k)
    out = torch.empty(count, k, k, dtype=torch.float64, device=device)
    for i in range(count):
        w = torch.randn(7 * k // 2, k, device=device, generator=g, dtype=torch.float64) * 0.02
        torch.matmul(w.T, w, out=out[i])
    return out


def random_bands(n: int, b: int, count: int, device: str):
    """``count`` random symmetric band matrices in the band solver's layout (batch, n, 2b)."""
    import torch

    g = torch.Generator(device=device).manual_seed(n + b)
    s = torch.zeros(count, n, 2 * b, dtype=torch.float64, device=device)
    s[:, :, : b + 1] = torch.randn(count, n, b + 1, generator=g, dtype=torch.float64, device=device)
    for i in range(1, b + 1):
        s[:, n - i:, i] = 0  # below the last row
    return s


def solve_bands(storage, b: int, device: str, variant: int = twostage.CHASE_VARIANT, threads: int | None = None):
    """Stages 2 and 3 for the bands ``storage`` (consumed), waited for; ``(eigenvalues, seconds)``, timed from
    when the GPU has finished making the inputs. ``threads``: the GPU's block size (default: the scan's)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        t = time.perf_counter()
        w, _ = twostage.launch_bands(storage, b, torch.cuda.current_stream(), threads=threads, variant=variant)
        torch.cuda.synchronize()
        return w, time.perf_counter() - t
    from spectrum_fast import _C

    t = time.perf_counter()
    w = torch.from_numpy(_C.band_eigenvalues_host(storage.numpy(), b, 1, 1, variant))
    return w, time.perf_counter() - t


def gpu_mode(k: int, b: int, variants: list[int], launch: int, device: str, repeats: int, record) -> None:
    """One entry per chase variant, each handed to ``record`` as soon as it is measured: stage 1 (shared),
    stages 2-3 at a full launch, accuracy on Gram matrices."""
    from spectrum_fast.cuda_engine import band_batch

    batch = band_batch(k)
    grams = gram_batch(k, batch, device)
    scales = grams.abs().amax(dim=(1, 2))
    grams /= scales[:, None, None]

    def stage1(g=grams):
        return twostage.band_reduce(g, b, qr=twostage.native_geqrf)

    bands = stage1()  # warm-up, and the bands the accuracy check solves
    stage1_s = seconds(stage1, repeats, device, statistics.median) / batch
    if k <= 2048:
        ref = np.linalg.eigvalsh((grams * scales[:, None, None]).cpu().numpy())
    else:
        import torch

        ref = torch.linalg.eigvalsh(grams * scales[:, None, None]).cpu().numpy()
    del grams, stage1
    for variant in variants:
        try:
            entry = _variant_entry(b, variant, bands, scales, ref, stage1_s, launch, device)
        except (RuntimeError, ValueError) as e:  # a kernel that fails to launch (or worse): the others still run
            entry = {"b": b, "variant": variant, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps({"k": k, **entry}), flush=True)
        record(entry)


def _variant_entry(b: int, variant: int, bands, scales, ref, stage1_s: float, launch: int, device: str) -> dict:
    """One full launch: this stage-1 batch's bands (checked against ``ref``) and random ones to fill it. A chase
    is latency-bound, so a launch takes about as long with 16 bands as with hundreds, and a separate
    accuracy launch would double the time."""
    import torch

    batch, k = bands.shape[0], bands.shape[-1]
    many = torch.cat([twostage.band_storage(bands, 2 * b), random_bands(k, b, max(0, launch - batch), device)])
    count = len(many)
    w, seconds = solve_bands(many, b, device, variant)
    del many
    lam = w[:batch] * scales[:, None]
    stage23_s = seconds / count
    err = float(np.max(np.abs(lam.cpu().numpy() - ref) / np.abs(ref).max(axis=1, keepdims=True)))
    return {"b": b, "variant": variant, "stage1_batch": batch, "stage1_s_per_matrix": stage1_s, "launch": count,
            "stage23_s_per_matrix": stage23_s, "stage23_launch_s": stage23_s * count,
            "s_per_matrix": stage1_s + stage23_s, "max_err": err}


def launch_sweep(k: int, b: int, variant: int, counts: list[int], device: str) -> list[dict]:
    """Seconds for one launch of each of ``counts`` random bands: where per-matrix throughput stops improving
    is how many chases a multiprocessor holds (twostage.DeviceBands.BLOCKS_PER_SM)."""
    from spectrum_fast import _C

    held = _C.band_solver_occupancy(0, b, twostage.chase_threads(b, variant), variant)
    out = []
    for count in counts:
        _, elapsed = solve_bands(random_bands(k, b, count, device), b, device, variant)
        out.append({"launch": count, "launch_s": elapsed, "s_per_matrix": elapsed / count, "held_per_sm": held})
        print(json.dumps({"k": k, "b": b, "variant": variant, **out[-1]}), flush=True)
    return out


def crews_sweep(k: int, b: int, variant: int, crews: list[int], device: str) -> list[dict]:
    """For a kCrews variant: one full launch (as DeviceBands.full_launch sizes it) with each number of crews
    per block (twostage.CREWS is the scan's): more crews, fewer steps per chase but fewer blocks resident."""
    from spectrum_fast import _C

    out = []
    for c in crews:
        held = _C.band_solver_occupancy(0, b, 32 * c, variant)
        count = twostage.DeviceBands.full_launch("cuda:0", b, 32 * c, variant)
        _, elapsed = solve_bands(random_bands(k, b, count, device), b, device, variant, threads=32 * c)
        out.append({"crews": c, "held_per_sm": held, "launch": count, "launch_s": elapsed,
                    "s_per_matrix": elapsed / count})
        print(json.dumps({"k": k, "b": b, "variant": variant, **out[-1]}), flush=True)
    return out


def stage3_launch(k: int, launch: int, device: str) -> float:
    """Seconds for a launch of ``launch`` matrices that are tridiagonal already (b = 1: nothing to chase),
    i.e. the bisection's share of a launch."""
    return solve_bands(random_bands(k, 1, launch, device), 1, device)[1]


def cpu_stage2(k: int, b: int, device: str, threads: int) -> dict:
    grams = gram_batch(k, 1, device)
    band = twostage.band_reduce(grams[0], b).double().cpu().numpy()
    pool = twostage.pool(threads)
    t = time.perf_counter()
    list(pool.map(twostage.band_eigenvalues, [band] * threads))
    return {"b": b, "threads": threads, "stage2_s_per_matrix_in_pool": (time.perf_counter() - t) / threads,
            "backend": twostage.stage2_backend()}


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--bands", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--variants", type=int, nargs="+", default=[0, 1, 3, 4, 7],
                    help="chase variants (csrc/band_solver.h, twostage.CHASE_VARIANT) timed at the first size")
    ap.add_argument("--launch", type=int, default=0,
                    help="bands per solver launch (default: DeviceBands.BLOCKS_PER_SM per multiprocessor)")
    ap.add_argument("--per-sm", type=int, nargs="*", default=[1, 2, 8],
                    help="at the first size, also launches of this many bands per multiprocessor (GPU only)")
    ap.add_argument("--cpu-stage2", action="store_true", help="also time the cpu mode's LAPACK stage 2")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    launch = args.launch or (twostage.DeviceBands.BLOCKS_PER_SM * torch.cuda.get_device_properties(0).multi_processor_count
                             if args.device == "cuda" else 2)  # the same for every variant, so that they compare
    doc = {"bench": "twostage", "device": args.device, "machine": machine_info(),
           "command": "python bench/bench_twostage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": []}
    if args.device == "cuda":
        doc["gpu"] = torch.cuda.get_device_name(0)
    from spectrum_fast.cuda_engine import _DEVICE_BAND

    # every (band, variant) at the first size; beyond it the best variant at the engine's band, and the best
    # pair overall if that is another, except at the largest size (a k = 16384 launch takes many seconds).
    # The JSON is rewritten after every entry: a run cut short (a hang, a crash, the step's time limit) keeps
    # what it measured, and a failing part is recorded without stopping the rest.
    pairs = [(b, v) for b in args.bands for v in args.variants]
    for index, k in enumerate(args.sizes):
        row = {"k": k, "gpu": []}
        doc["rows"].append(row)
        try:
            a = gram_batch(k, 1, args.device)[0]
            torch.linalg.eigvalsh(a)  # warm-up
            row["syevd_fp64_s"] = seconds(lambda a=a: torch.linalg.eigvalsh(a), args.repeats, args.device,
                                          statistics.median)
            del a
        except (RuntimeError, ValueError) as e:  # a CUDA error left by an earlier size: nothing more can run
            row["error"] = f"{type(e).__name__}: {e}"
            write_result(args.json, doc)
            print(f"k={k}: {row['error']}", flush=True)
            break

        def record(entry: dict, row=row) -> None:
            row["gpu"].append(entry)
            write_result(args.json, doc)

        for b in dict.fromkeys(b for b, _ in pairs):
            variants = [v for bb, v in pairs if bb == b]
            before = len(row["gpu"])
            try:
                gpu_mode(k, b, variants, launch, args.device, args.repeats, record)
            except (RuntimeError, ValueError) as e:  # stage 1 or the reference: the variants not yet measured
                seen = {entry["variant"] for entry in row["gpu"][before:]}
                for v in variants:
                    if v not in seen:
                        record({"b": b, "variant": v, "error": f"{type(e).__name__}: {e}"})
        good = [e for e in row["gpu"] if usable(e)]  # a failed or wrong one never wins
        for entry in good:
            entry["speedup_vs_syevd"] = row["syevd_fp64_s"] / entry["s_per_matrix"]
        ours = [e for e in good if e["b"] == _DEVICE_BAND]
        if ours and "best_variant" not in doc:
            doc["best_variant"] = max(ours, key=lambda e: e["speedup_vs_syevd"])["variant"]
        write_result(args.json, doc)
        if "best_variant" in doc and args.device == "cuda" and index == 0 and args.per_sm:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            row["launch_sweep"] = _recorded(launch_sweep, k, _DEVICE_BAND, doc["best_variant"],
                                            [x * sms for x in args.per_sm], args.device)
            write_result(args.json, doc)
            if doc["best_variant"] & twostage.CREWS_BIT:  # does another number of warps per block do better?
                row["crews_sweep"] = _recorded(crews_sweep, k, _DEVICE_BAND, doc["best_variant"], [2, 8], args.device)
                write_result(args.json, doc)
        row["stage3_launch_s"] = _recorded(stage3_launch, k, launch, args.device)
        if args.cpu_stage2:
            row["cpu_stage2"] = cpu_stage2(k, 64, args.device, args.threads)
        write_result(args.json, doc)
        pairs = [(_DEVICE_BAND, doc.get("best_variant", twostage.CHASE_VARIANT))]
        if not good:
            print(f"k={k}: syevd fp64 {row['syevd_fp64_s']:.4f} s; no two-stage variant ran correctly", flush=True)
            continue
        best = max(good, key=lambda e: e["speedup_vs_syevd"])
        if (best["b"], best["variant"]) not in pairs and index + 2 < len(args.sizes):  # the next is not the last
            pairs.append((best["b"], best["variant"]))
        print(f"k={k}: syevd fp64 {row['syevd_fp64_s']:.4f} s; two-stage on the GPU (b={best['b']}, chase "
              f"variant {best['variant']}) {best['s_per_matrix']:.4f} s per matrix (stage 1 "
              f"{best['stage1_s_per_matrix']:.4f}, stages 2+3 {best['stage23_s_per_matrix']:.4f}), "
              f"{best['speedup_vs_syevd']:.2f}x, error {best['max_err']:.1e}", flush=True)
    return 0


def _recorded(fn, *args):
    """``fn(*args)``, or ``{"error": ...}`` if it raises a RuntimeError (a CUDA error, an out-of-memory) or
    a ValueError (the native code refusing its arguments)."""
    try:
        return fn(*args)
    except (RuntimeError, ValueError) as e:
        print(f"{fn.__name__} failed: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    sys.exit(main())

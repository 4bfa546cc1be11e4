"""GPU benchmark of the CUDA engine (run on a lent H100/H200 by bench/gpu_check.sh).

0. cuSOLVER's Xsyevd algorithms (default, one-stage, two-stage; cuSOLVER 12.3.4+) per k, float64 and fp32,
   through the engine; the fastest accurate one is used by the parts after it (``syevd_alg_used``).
1. Engine per matrix: singular values of a k x N fp32 matrix (k = 1024 ... 16384) through our engine
   (read from a page-cached safetensors file, fp32 Gram + cusolverDnXsyevd) against
   ``torch.linalg.svdvals`` and ``torch.linalg.eigvalsh(W^T W)`` on the same GPU.
2. End to end: a synthetic bf16 checkpoint with Mistral-7B shapes (32 layers, hidden 4096, intermediate
   14336, 32/8 heads) on local disk: ``scan(device="cuda")`` against a plain torch loop (load each tensor,
   fp32 Gram, eigvalsh) over all layers, and against the reference method (fp32 + svdvals per matrix)
   timed on ``--ref-layers`` layers and scaled to 32 (said so in the output).

Checks its own results: engine SNRs against float64 on the k=1024 case, and identical selections between
our scan and the torch loop. Writes one JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import spectrum_fast
from spectrum_fast.cuda_engine import fp64_min_k, gram_flops
from spectrum_fast.snr import snr_from_singular_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import write_result

MISTRAL = {"layers": 32, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8}


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def _file_task(path: Path, w: torch.Tensor) -> list[tuple]:
    """``w`` written to ``path`` as a one-tensor safetensors file, and the engine's task list that reads it."""
    from spectrum_fast.checkpoint import read_tensor_table
    from spectrum_fast.cuda_engine import _task

    save_file({"w": w}, str(path))
    return [_task(read_tensor_table(path)[0]["w"])]


def engine_per_matrix(workdir: Path, sizes: list[int]) -> list[dict]:
    from spectrum_fast import _C

    engine = _C.GramEngine(0)
    rows = []
    for k in sizes:
        n = min(4 * k, 32768)
        w = torch.randn(n, k, device="cuda") / math.sqrt(k)
        path = workdir / f"m{k}.safetensors"
        task = _file_task(path, w.cpu())
        reps = 3 if k <= 4096 else 2  # the large sizes take seconds each: keep the device call short
        engine.run(task)  # warm-up: workspaces, page cache
        t_ours = min(sync_time(lambda task=task: engine.run(task)) for _ in range(reps))
        # the guard's fallback: on Hopper fp64 (tensor cores) is about as fast as fp32 (SIMT), which may make
        # going straight to fp64 for large k cheaper than fp32 followed by a fallback
        t_ours64 = min(sync_time(lambda task=task: engine.run(task, fp64=True)) for _ in range(reps - 1))
        t_eigh = min(sync_time(lambda w=w: torch.linalg.eigvalsh(w.T @ w)) for _ in range(reps))
        t_svd = sync_time(lambda w=w: torch.linalg.svdvals(w)) if k <= 8192 else None
        row = {"k": k, "n": n, "ours_s": t_ours, "ours_fp64_s": t_ours64, "torch_eigvalsh_gram_s": t_eigh, "torch_svdvals_s": t_svd,
               "speedup_vs_eigvalsh": t_eigh / t_ours, "speedup_vs_svdvals": (t_svd / t_ours) if t_svd else None}
        if k == sizes[0]:
            lam = engine.run(task)[0][0]
            s64 = np.linalg.svd(w.double().cpu().numpy(), compute_uv=False)
            ref = snr_from_singular_values(s64, n, k).snr
            ours = snr_from_singular_values(np.sqrt(np.maximum(lam, 0)), n, k).snr
            row["snr_rel_err_vs_fp64"] = abs(ours - ref) / abs(ref)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del w
        path.unlink()
    return rows


def syevd_algorithms(workdir: Path, sizes: list[int]) -> dict:
    """cuSOLVER's ``Xsyevd`` algorithms through the engine (``set_syevd_algorithm``: 0 its default, 1 one-stage,
    2 two-stage; cuSOLVER 12.3.4 or newer), per k on a k x k bf16 matrix, float64 (the pass k >= 4096 takes)
    and fp32 (not at 16384): seconds per matrix (Gram included, file in the page cache) and the largest
    eigenvalue difference from algorithm 0's float64 result, relative to the largest eigenvalue."""
    from spectrum_fast import _C

    out: dict = {"cusolver": _C.cusolver_version(), "cusolver_built": _C.cusolver_header_version(), "rows": []}
    engine = _C.GramEngine(0)
    for k in sizes:
        path = workdir / f"syevd{k}.safetensors"
        task = _file_task(path, (torch.randn(k, k) / math.sqrt(k)).bfloat16())
        ref = None
        for fp64 in (True, False):
            if not fp64 and k > 8192:
                continue
            for alg in (0, 1, 2):
                row: dict = {"k": k, "fp64": fp64, "alg": alg}
                try:
                    engine.set_syevd_algorithm(alg, 0)
                    (lam, _, code), = engine.run(task, fp64=fp64)  # warm-up: this algorithm's workspace
                    reps = 2 if k <= 8192 else 1
                    row["s"] = min(sync_time(lambda task=task, fp64=fp64: engine.run(task, fp64=fp64))
                                   for _ in range(reps))
                    lam = np.asarray(lam, dtype=np.float64)
                    if ref is None:
                        ref = lam  # algorithm 0, float64: the first one run
                    row["info"] = code
                    row["max_rel_diff_vs_alg0_fp64"] = float(np.abs(lam - ref).max() / ref.max())
                except Exception as e:  # noqa: BLE001 - an algorithm this cuSOLVER lacks: recorded, the rest go on
                    row["error"] = f"{type(e).__name__}: {e}"
                print(json.dumps(row), flush=True)
                out["rows"].append(row)
        path.unlink()
    engine.set_syevd_algorithm(0, 0)
    out["choice"] = syevd_choice(out["rows"])
    print(f"syevd algorithm choice: {out['choice']}", flush=True)
    return out


def syevd_choice(rows: list[dict], accurate: float = 1e-10) -> str:
    """``SPECTRUM_FAST_SYEVD_ALG`` from :func:`syevd_algorithms`' float64 rows: the algorithm that is fastest
    (by 5% or more over algorithm 0) at every measured k from some k on, with that k as ``:MIN_K``, and
    accurate there (float64 results within ``accurate`` of algorithm 0's); ``"0"`` when none is."""
    ks = sorted({r["k"] for r in rows if r["fp64"]})
    time = {(r["k"], r["alg"]): r["s"] for r in rows if r["fp64"] and "s" in r and r.get("info") == 0
            and r["max_rel_diff_vs_alg0_fp64"] <= accurate}
    best, best_gain = "0", 0.0
    for alg in (1, 2):
        start = None
        for k in reversed(ks):
            if (k, alg) in time and (k, 0) in time and time[(k, alg)] < 0.95 * time[(k, 0)]:
                start = k
            else:
                break
        if start is None:
            continue
        total = sum(time[(k, 0)] - time[(k, alg)] for k in ks if k >= start)
        if total > best_gain:
            best, best_gain = f"{alg}:{start}", total
    return best


def batched_vs_looped(workdir: Path, sizes: tuple[int, ...] = (256, 512, 1024, 2048), count: int = 32) -> list[dict]:
    """Same-shape bf16 matrices (MoE experts: 7168x2048 at k = 2048) through run() one by one and through
    run_batched(): decides SPECTRUM_FAST_BATCHED_MAX_K (cuda_engine.batched_max_k)."""
    from spectrum_fast import _C
    from spectrum_fast.checkpoint import open_checkpoint

    engine = _C.GramEngine(0)
    rows = []
    for k in sizes:
        n = 7 * k // 2
        d = workdir / f"batched{k}"
        d.mkdir(exist_ok=True)
        save_file({f"model.layers.{i}.mlp.experts.{i}.w1.weight": (torch.randn(n, k) * 0.02).bfloat16()
                   for i in range(count)}, str(d / "model.safetensors"))
        infos = list(open_checkpoint(d).tensors.values())
        tasks = [(str(i.file), i.offset, i.nbytes, i.dtype, i.shape[0], i.shape[1]) for i in infos]
        engine.run(tasks)
        engine.run_batched(tasks, batch=count)
        t_loop = min(sync_time(lambda tasks=tasks: engine.run(tasks)) for _ in range(2))
        t_batch = min(sync_time(lambda tasks=tasks: engine.run_batched(tasks, batch=count)) for _ in range(2))
        a, b = engine.run(tasks), engine.run_batched(tasks, batch=count)
        dev = max(float(np.max(np.abs(x[0] - y[0])) / x[0].max()) for x, y in zip(a, b))
        row = {"k": k, "n": n, "count": count, "looped_s": t_loop, "batched_s": t_batch,
               "speedup": t_loop / t_batch, "max_rel_eig_diff": dev}
        print(json.dumps(row), flush=True)
        rows.append(row)
        (d / "model.safetensors").unlink()
    return rows


def build_mistral(path: Path, layers: int) -> int:
    """bf16 Mistral-shaped block matrices with low-rank signal, 4 layers per shard; returns bytes written."""
    h, i, kv = MISTRAL["hidden"], MISTRAL["intermediate"], MISTRAL["hidden"] * MISTRAL["kv_heads"] // MISTRAL["heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    total = 0
    weight_map = {}
    for start in range(0, layers, 4):
        shard = {}
        for layer in range(start, min(start + 4, layers)):
            for name, (m, n) in shapes.items():
                w = torch.randn(m, n, device="cuda", generator=g) * 0.02
                r = 16
                strength = 0.02 * (math.sqrt(m) + math.sqrt(n)) * (1 + layer % 5) / 2
                w += strength * (torch.randn(m, r, device="cuda", generator=g) / math.sqrt(m)) @ (
                    torch.randn(r, n, device="cuda", generator=g) / math.sqrt(n))
                shard[f"model.layers.{layer}.{name}.weight"] = w.to(torch.bfloat16).cpu()
        fname = f"model-{start // 4 + 1:05d}.safetensors"
        save_file(shard, str(path / fname))
        weight_map.update({k: fname for k in shard})
        total += sum(t.numel() * 2 for t in shard.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def torch_loop(path: Path, fp64_svd: bool = False, layers: int | None = None,
               fp64_gram: bool = False) -> tuple[float, dict[str, float]]:
    from safetensors import safe_open

    snrs = {}
    torch.cuda.synchronize()
    t = time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt", device="cuda") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                if layers is not None and int(name.split(".")[2]) >= layers:
                    continue
                w = st.get_tensor(name).double() if fp64_gram else st.get_tensor(name).float()
                m, n = w.shape
                if fp64_svd:
                    s = torch.linalg.svdvals(w)
                else:
                    g = w.T @ w if m >= n else w @ w.T
                    s = torch.linalg.eigvalsh(g).clamp_min(0).sqrt()
                snrs[name[: -len(".weight")]] = snr_from_singular_values(s.double().cpu().numpy(), m, n).snr
    torch.cuda.synchronize()
    return time.perf_counter() - t, snrs


def end_to_end(workdir: Path, ref_layers: int, rates_json: Path | None = None, save=None) -> dict:
    """The Mistral-shaped scan and its baselines; ``save(partial)`` is called after every measurement, so a
    step cut short by the device call's time limit keeps everything measured before it."""
    ckpt = workdir / "mistral-shaped"
    out: dict = {"twostage": {"error": "not finished"}, "goals": {"vs_reference": 20, "vs_torch_loop": 2, "under_s": 10}}

    def note(**numbers) -> None:
        print("end to end:", json.dumps(numbers, default=str), flush=True)  # the log has them too
        out.update(numbers)
        if save is not None:
            save(out)

    t = time.perf_counter()
    nbytes = build_mistral(ckpt, MISTRAL["layers"])
    note(checkpoint_gb=nbytes / 1e9, build_s=time.perf_counter() - t)
    for f in ckpt.glob("*.safetensors"):  # warm page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    spectrum_fast.scan(ckpt, device="cuda", progress=False, types=["self_attn.k_proj"])  # warm-up
    t = time.perf_counter()
    ours = spectrum_fast.scan(ckpt, device="cuda", progress=False)
    ours_s = time.perf_counter() - t
    note(ours_s=ours_s, methods=dict(Counter(r.method or r.status for r in ours.records)),
         syevd_alg=os.environ.get("SPECTRUM_FAST_SYEVD_ALG", "0"))
    if os.environ.get("SPECTRUM_FAST_SYEVD_ALG", "0") != "0":  # the same scan with cuSOLVER's default, same run
        chosen = os.environ.pop("SPECTRUM_FAST_SYEVD_ALG")
        try:
            t = time.perf_counter()
            default = spectrum_fast.scan(ckpt, device="cuda", progress=False)
            default_s = time.perf_counter() - t
        finally:
            os.environ["SPECTRUM_FAST_SYEVD_ALG"] = chosen
        diffs = [abs(a.snr - b.snr) / abs(b.snr) for a, b in zip(ours.records, default.records)
                 if math.isfinite(a.snr) and math.isfinite(b.snr) and b.snr]
        note(ours_default_syevd_s=default_s, speedup_vs_default_syevd=default_s / ours_s,
             max_snr_rel_diff_vs_default_syevd=max(diffs, default=float("nan")),
             selections_equal_to_default_syevd={str(top): ours.select(top).modules == default.select(top).modules
                                                for top in (0.25, 0.5)})
    loop_s, loop_snr = torch_loop(ckpt)
    note(torch_gram_eigvalsh_loop_s=loop_s, speedup_vs_torch_loop=loop_s / ours_s)
    # the loop at the precision our guard ends up using for k >= 4096 (float64 Gram + eigvalsh)
    loop64_s, _ = torch_loop(ckpt, fp64_gram=True)
    note(torch_gram64_eigvalsh_loop_s=loop64_s, speedup_vs_torch_loop_fp64=loop64_s / ours_s)
    ref_s, _ = torch_loop(ckpt, fp64_svd=True, layers=ref_layers)
    ref_scaled = ref_s * MISTRAL["layers"] / ref_layers
    note(**{f"reference_svdvals_{ref_layers}_layers_s": ref_s, "reference_svdvals_scaled_to_32_layers_s": ref_scaled,
            "speedup_vs_reference": ref_scaled / ours_s})
    from spectrum_fast.result import MatrixRecord, ScanResult

    loop_result = ScanResult("loop", "loop", [MatrixRecord(m, r.type, loop_snr[m]) for m, r in
                                              ((r.module, r) for r in ours.records)])
    note(selections_equal_to_torch_loop={str(top): ours.select(top).modules == loop_result.select(top).modules
                                         for top in (0.25, 0.5)})
    try:  # the numbers above stand whatever happens here
        base = floors(ckpt, nbytes)
    except Exception as e:  # noqa: BLE001 - recorded in the result
        base = None
        note(floors={"error": f"{type(e).__name__}: {e}"})
    else:
        note(floors=base)
    # last: a failure in the new route (a CUDA error poisons the context) cannot cost the numbers above
    try:
        twostage = twostage_scan(ckpt, ours, ours_s, {"reference": ref_scaled, "torch_loop": loop_s,
                                                      "torch_loop_fp64": loop64_s}, base, rates_json)
    except Exception as e:  # noqa: BLE001 - recorded in the result
        twostage = {"error": f"{type(e).__name__}: {e}"}
        print(f"two-stage scan failed: {e}", flush=True)
    note(twostage=twostage)
    return out


def mistral_shapes() -> list[tuple[int, int]]:
    """One layer's scanned matrices (q, k, v, o, gate, up, down) as (rows, cols)."""
    h, i = MISTRAL["hidden"], MISTRAL["intermediate"]
    kv = h * MISTRAL["kv_heads"] // MISTRAL["heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def twostage_floors(base: dict, rates: dict[int, dict], dgemm_flops: float, big: int) -> dict:
    """Where the two-stage route's time must go on the Mistral shapes: the reads and copies of :func:`floors`
    (``base``); the float64 Gram products (``cuda_engine.gram_flops``: 9/16 of 2 m k^2 at k = 4096) at the
    measured DGEMM rate; for k >= ``big``, stage 1 per matrix and the band solver's launches from
    bench_twostage.py's ``rates`` (k -> entry): a chase is latency-bound, so a launch of up to ``launch`` bands
    takes ``stage23_launch_s``; below ``big``, the one-stage eigensolve of ``base``. Serial sums: the scan
    overlaps some of it."""
    layers, shapes = MISTRAL["layers"], mistral_shapes()
    two = [s for s in shapes if min(s) >= big]
    count: dict[int, int] = Counter(min(s) for s in two)
    missing = sorted(k for k in count if k not in rates)
    if missing:
        return {"error": f"no two-stage rates for k = {missing}"}
    out = {"read_page_cache_s": base["read_page_cache_s"], "h2d_copy_s": base["h2d_copy_s"],
           "gram_fp64_s": layers * sum(gram_flops(max(s), min(s)) for s in two) / dgemm_flops,
           "stage1_s": sum(layers * c * rates[k]["stage1_s_per_matrix"] for k, c in count.items()),
           "band_solver_s": sum(math.ceil(layers * c / rates[k]["launch"]) * rates[k]["stage23_launch_s"]
                                for k, c in count.items()),
           "one_stage_eig_s": layers * sum(base["eig_s_per_k"][min(s)] for s in shapes if min(s) < big),
           "dgemm_flops": dgemm_flops}
    out["compute_s"] = out["gram_fp64_s"] + out["stage1_s"] + out["band_solver_s"] + out["one_stage_eig_s"]
    out["floor_s"] = max(out["read_page_cache_s"], out["h2d_copy_s"], out["compute_s"])
    return out


def dgemm_rate() -> float:
    """float64 matrix-product FLOP/s on the GPU (what the two-stage route's Gram products run at)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float64)
    a @ a
    return 3 * 2 * 8192**3 / sync_time(lambda: [a @ a for _ in range(3)])


def twostage_scan(ckpt: Path, ours, ours_s: float, baselines: dict[str, float], base_floors: dict | None = None,
                  rates_json: Path | None = None) -> dict:
    """The same scan with SPECTRUM_FAST_TWOSTAGE=gpu: the float64 pass by the GPU two-stage solver
    (spectrum_fast.twostage.DeviceBands: batched band reduction, native band solver); with bench_twostage.py's
    JSON, also where its time must go (:func:`twostage_floors`)."""
    from spectrum_fast import twostage
    from spectrum_fast.cuda_engine import chase_variant

    # warm-up, as the syevd route had its own: the band solver's kernels loaded, float64 GEMM handles made
    solver = twostage.DeviceBands("cuda:0", 32, variant=chase_variant())
    x = torch.randn(2, 512, 512, dtype=torch.float64, device="cuda")
    solver.run([0, 1], x @ x.transpose(1, 2))
    solver.finished(wait=True)
    os.environ["SPECTRUM_FAST_TWOSTAGE"] = "gpu"
    try:
        t = time.perf_counter()
        res = spectrum_fast.scan(ckpt, device="cuda", progress=False)
        elapsed = time.perf_counter() - t
    finally:
        del os.environ["SPECTRUM_FAST_TWOSTAGE"]
    diffs = [abs(a.snr - b.snr) / abs(b.snr) for a, b in zip(res.records, ours.records)
             if math.isfinite(a.snr) and math.isfinite(b.snr) and b.snr]
    out = {"mode": "gpu", "chase": chase_variant(), "s": elapsed, "speedup_vs_syevd_route": ours_s / elapsed,
           **{f"speedup_vs_{name}": base / elapsed for name, base in baselines.items()},
           "max_snr_rel_diff_vs_syevd_route": max(diffs, default=float("nan")),
           "methods": dict(Counter(r.method for r in res.records)),
           "selections_equal": {str(top): res.select(top).modules == ours.select(top).modules for top in (0.25, 0.5)}}
    if base_floors is not None and rates_json is not None:
        try:  # the timing above stands whatever happens here
            from bench_scale import twostage_rates

            os.environ["SPECTRUM_FAST_TWOSTAGE"] = "gpu"  # twostage_rates reads the scan's settings
            try:
                rates = twostage_rates(rates_json)
            finally:
                del os.environ["SPECTRUM_FAST_TWOSTAGE"]
            out["floors"] = twostage_floors(base_floors, rates, dgemm_rate(), fp64_min_k())
            from bench_gram import gram_split_speedup

            out["floors"]["gram_split"] = gram_split_speedup(device="cuda")
            out["vs_floor"] = elapsed / out["floors"]["floor_s"] if "floor_s" in out["floors"] else None
        except Exception as e:  # noqa: BLE001 - recorded in the result
            out["floors"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def floors(ckpt: Path, nbytes: int) -> dict:
    """Where the time must go, each step alone at its measured rate on this machine: reading the (page-cached)
    shards, the host-to-device copy, the fp32 Gram products, and the eigensolves (torch's syevd per k)."""
    from _machine import read_rate
    from bench_scale import eig_seconds, gemm_rate, pcie_bandwidth

    read_bps = read_rate(max(ckpt.glob("*.safetensors"), key=lambda p: p.stat().st_size), cold=False)
    shapes = mistral_shapes()
    gram = MISTRAL["layers"] * sum(max(s) * min(s) ** 2 for s in shapes)
    cache: dict[int, float] = {}
    eig = MISTRAL["layers"] * sum(eig_seconds(min(s), "cuda", cache, 1 << 20) for s in shapes)
    out = {"read_page_cache_s": nbytes / read_bps, "h2d_copy_s": nbytes / pcie_bandwidth(),
           "gram_fp32_s": gram / gemm_rate("cuda"),  # SYRK: N k^2 of a GEMM's 2 N k^2
           "eigensolve_s": eig, "eig_s_per_k": cache}
    out["compute_s"] = out["gram_fp32_s"] + out["eigensolve_s"]
    out["floor_s"] = max(out["read_page_cache_s"], out["h2d_copy_s"], out["compute_s"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/spectrum_fast_gpu_bench"))
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--sizes", default="1024,4096,8192,16384")
    ap.add_argument("--ref-layers", type=int, default=1)
    ap.add_argument("--twostage", type=Path, help="bench_twostage.py's JSON from this device: the two-stage floors")
    # (run 3's `engines` part, several engines on one GPU, gave no speed-up; a scan now refuses a GPU listed twice)
    ap.add_argument("--parts", default="syevd,matrix,batched,e2e",
                    help="which of syevd,matrix,batched,e2e to run; with syevd, the later parts run with the Xsyevd "
                         "algorithm it found fastest")
    ap.add_argument("--syevd-sizes", default="2048,4096,8192,16384")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=False).stdout.strip() or os.environ.get("GIT_COMMIT", "unknown"),
           "sources": os.environ.get("SF_SOURCES")}
    parts = set(args.parts.split(","))
    if "syevd" in parts:
        try:
            out["syevd"] = syevd_algorithms(args.workdir, [int(s) for s in args.syevd_sizes.split(",")])
        except Exception as e:  # noqa: BLE001 - record it; the other parts still run, with the default
            out["syevd"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"syevd algorithms failed: {e}", flush=True)
        choice = out["syevd"].get("choice", "0")
        if choice != "0" and not os.environ.get("SPECTRUM_FAST_SYEVD_ALG"):
            os.environ["SPECTRUM_FAST_SYEVD_ALG"] = choice  # the scans below (spectrum_fast reads it per scan)
        out["syevd_alg_used"] = os.environ.get("SPECTRUM_FAST_SYEVD_ALG", "0")
        write_result(args.json, out)
    if "matrix" in parts:
        out["per_matrix"] = engine_per_matrix(args.workdir, [int(s) for s in args.sizes.split(",")])
        write_result(args.json, out)
    if "batched" in parts:
        try:
            out["batched_vs_looped"] = batched_vs_looped(args.workdir)
        except Exception as e:  # noqa: BLE001 - record it; the end-to-end numbers still matter
            out["batched_vs_looped"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"batched solver failed: {e}", flush=True)
        write_result(args.json, out)
    if "e2e" in parts:
        def save(partial: dict) -> None:
            out["end_to_end"] = partial
            write_result(args.json, out)

        out["end_to_end"] = e2e = end_to_end(args.workdir, args.ref_layers, args.twostage, save)
        print(json.dumps(e2e, indent=1), flush=True)
    write_result(args.json, out)
    ok = "e2e" not in parts or all(out["end_to_end"]["selections_equal_to_torch_loop"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

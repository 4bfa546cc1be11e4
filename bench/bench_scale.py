"""The 100B+ benchmark: measure scan throughput per matrix shape, extrapolate a whole model, compare to floors.

    python bench/bench_scale.py --models Qwen1.5-110B Llama-3.1-405B --device cuda --json bench/results/scale_h100.json
    python bench/bench_scale.py --models Mistral-7B Mixtral-8x22B --device cpu --json bench/results/scale_cpu.json

For each model (a config in bench/configs/):

1. Write its first ``--layers`` decoder layers with bench/synth_checkpoint.py (exact names, shapes, dtypes;
   low-rank signal plus noise), unless that directory already holds them.
2. For every distinct scanned matrix shape ``(m, n, dtype)``, scan up to ``--samples`` of its matrices
   through the real engine path (read ahead, engine, accuracy guard, fallbacks) and time it: seconds
   per matrix, and which method finished them (fp32 Gram, or a float64 recompute).
3. Extrapolate the whole model: sum over shapes of (count in the full model x seconds per matrix), and
   the same with the matrices dealt out over 2 / 4 / 8 devices by the scanner's own cost-balanced plan.
4. Print it next to the floors for the whole model: bytes / disk bandwidth (measured on a shard with its
   page cache dropped), bytes / PCIe bandwidth (measured pinned host-to-device copy, GPU only), Gram
   FLOPs / measured fp32 GEMM rate, and the eigensolver time (measured per distinct k).

``--e2e`` also scans the whole generated checkpoint end to end and reports measured / predicted, a check
of the per-shape model. Goals (one H100): Qwen1.5-110B under 3 minutes, Llama-3.1-405B under 15.

``--e2e-copies C`` (with ``--e2e``) then scans the generated layers C times over (copies of their shards
with the layer numbers shifted in the header, page cache dropped): the difference between the two
end-to-end times is what C - 1 more layers' worth of bytes cost in a running scan, reads overlapped with
compute. The whole model is estimated from it, ``e2e.steady.full_scan_estimate_s = measured + (bytes of the
model - bytes generated) x that cost per byte``: the pipeline's start and the band solver's last launch are
paid once, as in a real scan, not once per sampled shape (the per-shape extrapolation) or per layer.

With ``SPECTRUM_FAST_TWOSTAGE=gpu`` the float64 pass runs through the GPU two-stage solver, whose band
solver launches many matrices at once (four per multiprocessor): a few sampled matrices measure its
latency, not its throughput. ``--twostage JSON`` (bench/bench_twostage.py's output from the same run)
corrects those shapes: ``(measured - one launch's time) / samples + stages 2-3 per matrix at a full
launch``, and uses the two-stage time per matrix as the eigensolver floor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import drop_cache, machine_info, read_rate, write_result
from bench_twostage import usable
from synth_checkpoint import Spec, tensor_list, write

from spectrum_fast.checkpoint import read_header

CONFIGS = Path(__file__).resolve().parent / "configs"
GOALS_S = {"Qwen1.5-110B": 180.0, "Llama-3.1-405B": 900.0}  # one H100 (issue #5)


def scanned(specs: list[Spec]) -> list[Spec]:
    """The matrices a default scan covers (SPEC.md §2: 2-D ``*.weight`` in numbered blocks, routers too)."""
    from spectrum_fast.naming import wants

    return [s for s in specs if wants(s.name, s.shape, include_embeddings=False, types=None)]


def shape_key(s: Spec) -> tuple[int, int, str]:
    return (s.shape[0], s.shape[1], s.dtype)


def ensure_checkpoint(model: str, config: dict, layers: int, workdir: Path) -> Path:
    out = workdir / f"{model}-{layers}L"
    index = out / "model.safetensors.index.json"
    if index.is_file() and json.loads((out / "config.json").read_text()).get("num_hidden_layers") == layers:
        return out
    t0 = time.perf_counter()
    write(config, out, layers)
    print(f"{model}: wrote {layers} layers to {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def disk_bandwidth(path: Path) -> float:
    """Sequential read of a file whose page cache was dropped, bytes/s."""
    return read_rate(path, cold=True)


def disk_bandwidth_readahead(path: Path) -> float:
    """The same file read as the scan's read-ahead reads it (cuda_engine._warm: pieces in file order,
    warm_threads() threads at once), page cache dropped first, bytes/s."""
    import threading

    from spectrum_fast import cuda_engine
    from spectrum_fast.checkpoint import TensorInfo

    drop_cache(path)
    size = path.stat().st_size
    t0 = time.perf_counter()
    got = cuda_engine._warm([TensorInfo("file", path, 0, size, "U8", (size,))], threading.Event())
    return got / (time.perf_counter() - t0)


def gemm_rate(device: str) -> float:
    """fp32 GEMM FLOP/s (TF32 off on the GPU, as the engine runs SYRK)."""
    if device == "cuda":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        a = torch.randn(8192, 8192, device="cuda")
        a @ a
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        torch.cuda.synchronize()
        return 5 * 2 * 8192**3 / (time.perf_counter() - t0)
    import numpy as np

    a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    a @ a
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * 4096**3 / (time.perf_counter() - t0)


def pcie_bandwidth() -> float:
    import torch

    x = torch.empty(2**30 // 4, dtype=torch.float32).pin_memory()
    y = torch.empty_like(x, device="cuda")
    y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(4):
        y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    return 4 * 2**30 / (time.perf_counter() - t0)


def eig_seconds(k: int, device: str, cache: dict[int, float], cpu_max_k: int) -> float:
    """Eigenvalues of one symmetric k x k fp32 matrix (the engine's solver class), measured once per k."""
    if k in cache:
        return cache[k]
    if device == "cuda":
        import torch

        a = torch.randn(k, k, device="cuda")
        a = a + a.T
        torch.linalg.eigvalsh(a)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.linalg.eigvalsh(a)
        torch.cuda.synchronize()
        cache[k] = time.perf_counter() - t0
    elif k > cpu_max_k:  # a 16384 solve takes minutes on a small CPU: scale the largest measured one by k^3
        k0 = cpu_max_k
        cache[k] = eig_seconds(k0, device, cache, cpu_max_k) * (k / k0) ** 3
    else:
        import numpy as np

        from spectrum_fast.cpu_engine import eigvalsh

        a = np.random.default_rng(k).standard_normal((k, k), dtype=np.float32)
        a = a + a.T
        t0 = time.perf_counter()
        eigvalsh(a)  # the engine's solver for this order
        cache[k] = time.perf_counter() - t0
    return cache[k]


def time_shapes(ckpt_dir: Path, device: str, samples: int) -> dict[tuple[int, int, str], dict]:
    """Seconds per matrix for each scanned shape of the generated checkpoint, via the real engine path."""
    from spectrum_fast.checkpoint import open_checkpoint
    from spectrum_fast.cuda_engine import engine_takes
    from spectrum_fast.naming import wants
    from spectrum_fast.scanner import _cpu_stats

    ck = open_checkpoint(ckpt_dir)
    groups: dict[tuple[int, int, str], list] = defaultdict(list)
    for info in ck.tensors.values():
        if wants(info.name, info.shape, include_embeddings=False, types=None):
            groups[(info.shape[0], info.shape[1], info.dtype)].append(info)
    out = {}
    for key, infos in sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        pick = infos[:samples]
        for info in pick:
            drop_cache(info.file)  # read from disk, as a first scan would
        methods: Counter = Counter()

        def done(info, res, methods=methods) -> None:
            methods[res.method] += 1

        t0 = time.perf_counter()
        if device == "cuda" and all(engine_takes(i) for i in pick):
            from spectrum_fast.cuda_engine import cuda_stats

            cuda_stats(pick, [0], done)
        else:
            _cpu_stats(pick, None, False, done)
        dt = time.perf_counter() - t0
        out[key] = {"m": key[0], "n": key[1], "dtype": key[2], "sampled": len(pick), "seconds": dt,
                    "s_per_matrix": dt / len(pick), "methods": dict(methods)}
        print(f"  {key[0]:>6} x {key[1]:<6} {key[2]:<8} {dt / len(pick):8.3f} s/matrix  {dict(methods)}",
              file=sys.stderr)
    return out


def shift_layer(name: str, by: int) -> str | None:
    """``name`` with its decoder layer number moved by ``by`` (``model.layers.3.x`` -> ``model.layers.5.x``);
    None for a tensor outside the numbered layers (the final norm, embeddings)."""
    new, found = re.subn(r"\.layers\.(\d+)\.", lambda m: f".layers.{int(m.group(1)) + by}.", name, count=1)
    return new if found else None


def _copy_range(src, dst, offset: int, count: int) -> None:
    """``count`` bytes of ``src`` from ``offset`` appended to ``dst`` (in the kernel where the file system allows)."""
    end = offset + count
    dst.flush()  # copy_file_range writes at the file's position: nothing may wait in Python's buffer
    while offset < end:
        try:
            done = os.copy_file_range(src.fileno(), dst.fileno(), end - offset, offset)
        except (AttributeError, OSError):  # no copy_file_range here: through user space
            src.seek(offset)
            while offset < end:
                chunk = src.read(min(64 << 20, end - offset))
                if not chunk:
                    raise OSError(f"{src.name} ends early") from None
                dst.write(chunk)
                offset += len(chunk)
            dst.flush()
            return
        if done == 0:
            raise OSError(f"{src.name} ends early")
        offset += done


def _copy_shifted(src: Path, dst: Path, by: int) -> list[str]:
    """``src`` (safetensors) as ``dst``: its layer tensors, each layer number moved by ``by``, with the same bytes
    (the others left out); returns the new names."""
    _, raw = read_header(src)
    header = json.loads(raw)
    with open(src, "rb") as f, open(dst, "wb") as out:
        tensors = sorted(((shift_layer(k, by), v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        tensors = [(k, v) for k, v in tensors if k is not None]
        new, at = {}, 0
        for name, v in tensors:
            size = v["data_offsets"][1] - v["data_offsets"][0]
            new[name] = dict(v, data_offsets=[at, at + size])
            at += size
        text = json.dumps(new, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format's alignment of the data
        out.write(len(text).to_bytes(8, "little") + text)
        out.flush()
        for _, v in tensors:
            begin, stop = v["data_offsets"]
            _copy_range(f, out, 8 + len(raw) + begin, stop - begin)
    return [name for name, _ in tensors]


def replicate(ckpt: Path, copies: int) -> Path:
    """The generated checkpoint's layers ``copies`` times over, as a checkpoint of its own next to it (copy j's
    layer i is layer i + j * generated layers; copy 0 is hard links to the original shards, tensors outside the
    layers included)."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    config = json.loads((ckpt / "config.json").read_text())
    layers = config["num_hidden_layers"]
    out = ckpt.with_name(f"{ckpt.name}-x{copies}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for j in range(copies):
        for f in sorted(set(index["weight_map"].values())):
            dst = out / (f if j == 0 else f"copy{j}-{f}")
            if j == 0:  # the originals, whole
                try:
                    os.link(ckpt / f, dst)
                except OSError:
                    shutil.copyfile(ckpt / f, dst)
                weight_map.update({n: f for n, v in index["weight_map"].items() if v == f})
            else:
                weight_map.update(dict.fromkeys(_copy_shifted(ckpt / f, dst, j * layers), dst.name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": index.get("metadata", {}),
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=layers * copies)))
    return out


def _scan_cold(ckpt: Path, device: str) -> float:
    """Seconds for a whole scan of ``ckpt`` with its shards' page cache dropped first."""
    import spectrum_fast

    for f in sorted(ckpt.glob("*.safetensors")):
        drop_cache(f)
    t0 = time.perf_counter()
    spectrum_fast.scan(ckpt, device=device, progress=False)
    return time.perf_counter() - t0


def launches_left(full: list[Spec], bands: dict[int, dict], big: int) -> float:
    """Seconds of band-solver launches a whole-model scan makes beyond those of a scan of the generated layers
    (one final launch per size either way): ``(ceil(matrices of size k / launch) - 1) x one launch`` per k,
    from bench_twostage.py's rates; 0 without them. Counted in full: a launch fills every multiprocessor, so
    stage 1 of the next matrices waits for it."""
    counts = Counter(min(s.shape) for s in full if min(s.shape) in bands and min(s.shape) >= big)
    return sum((math.ceil(c / bands[k]["launch"]) - 1) * bands[k]["stage23_launch_s"] for k, c in counts.items())


def steady_estimate(ckpt: Path, args: argparse.Namespace, measured: float, gen_bytes: int, nbytes: int,
                    launches_s: float) -> dict:
    """The generated layers scanned ``--e2e-copies`` times over; the whole model at the cost per byte that
    added, plus the band-solver launches only a whole model makes (:func:`launches_left`)."""
    copies = replicate(ckpt, args.e2e_copies)
    try:
        longer = _scan_cold(copies, args.device)
    finally:
        shutil.rmtree(copies, ignore_errors=True)
    out = {"copies": args.e2e_copies, "measured_s": longer, "short_s": measured, "more_launches_s": launches_s}
    per_byte = (longer - measured) / ((args.e2e_copies - 1) * gen_bytes)
    if per_byte <= 0:  # noise or a warm cache: no rate to extrapolate with
        out["error"] = f"the longer scan ({longer:.2f} s) was not slower than the short one ({measured:.2f} s)"
        return out
    out.update(s_per_gb=per_byte * 1e9, gb_per_s=1e-9 / per_byte,
               full_scan_estimate_s=measured + (nbytes - gen_bytes) * per_byte + launches_s)
    return out


def bench_model(model: str, args: argparse.Namespace, rates: dict, publish=lambda row: None) -> dict:
    """The model's per-shape timings, extrapolation and floors; ``publish(row)`` gets them before the end-to-end
    scan runs (the longest part: a run cut short there keeps the rest), and the row is completed after it."""
    config = json.loads((CONFIGS / f"{model}.json").read_text())
    layers = min(args.layers or _default_layers(config), config["num_hidden_layers"])
    full = scanned(tensor_list(config))
    ckpt = ensure_checkpoint(model, config, layers, args.workdir)
    print(f"{model}: timing {layers} generated layers on {args.device}", file=sys.stderr)
    per_shape = time_shapes(ckpt, args.device, args.samples)
    bands = twostage_rates(args.twostage)
    from spectrum_fast.cuda_engine import fp64_min_k

    big = fp64_min_k()
    for key, entry in per_shape.items():
        k = min(key[:2])
        if bands and k not in bands and k >= big and entry["methods"].get("gram-fp64"):
            entry["twostage_uncorrected"] = True  # its time is one launch's latency over a few samples
            print(f"  {key}: no two-stage rates for k = {k}: its sampled time is not corrected", file=sys.stderr)
        if k in bands and entry["methods"].get("gram-fp64") == entry["sampled"]:
            entry["s_per_matrix_measured"] = entry["s_per_matrix"]
            entry["s_per_matrix"] = (max(0.0, entry["seconds"] - bands[k]["stage23_launch_s"]) / entry["sampled"]
                                     + bands[k]["stage23_s_per_matrix"])
    counts = Counter(shape_key(s) for s in full)
    missing = [k for k in counts if k not in per_shape]
    if missing:
        raise SystemExit(f"{model}: shapes {missing} are not in the first {layers} layers; use more --layers")
    costs = [per_shape[shape_key(s)]["s_per_matrix"] for s in full]
    total = sum(costs)
    nbytes = sum(s.nbytes for s in full)
    gram_flops = sum(max(s.shape) * min(s.shape) ** 2 for s in full)
    eig_cache: dict[int, float] = {}
    eig_s = sum(c * (bands[min(k[:2])]["s_per_matrix"] if min(k[:2]) in bands
                     else eig_seconds(min(k[:2]), args.device, eig_cache, args.cpu_eig_max_k)) for k, c in counts.items())
    floors = {"disk_s": nbytes / rates["disk_Bps"], "gram_s": gram_flops / rates["gemm_flops"], "eig_s": eig_s}
    if rates.get("pcie_Bps"):
        floors["pcie_s"] = nbytes / rates["pcie_Bps"]
    floors["compute_s"] = floors["gram_s"] + floors["eig_s"]
    floors["floor_s"] = max(v for k, v in floors.items() if k in ("disk_s", "pcie_s", "compute_s"))
    from spectrum_fast.scheduling import makespan

    multi = {str(g): {"s": makespan(costs, g), "speedup": total / makespan(costs, g)} for g in (2, 4, 8)}
    row = {"model": model, "config": config.get("_name_or_path"), "layers_generated": layers,
           "layers_total": config["num_hidden_layers"], "matrices": len(full), "bytes": nbytes,
           "gram_flops": gram_flops, "per_shape": list(per_shape.values()), "extrapolated_s": total,
           "floors": floors, "vs_floor": total / floors["floor_s"], "multi_device": multi,
           # not measured: how evenly the deal spreads these per-matrix times (bench_ranks.py measures ranks)
           "multi_device_basis": "LPT deal of the per-shape seconds, perfect scaling per device assumed"}
    if args.device == "cuda" and model in GOALS_S:
        row["goal_s"] = GOALS_S[model]
        row["meets_goal"] = total <= GOALS_S[model]
    if args.e2e:
        publish(row)
        measured = _scan_cold(ckpt, args.device)
        gen = scanned(tensor_list(dict(config, num_hidden_layers=layers)))
        gen = [s for s in gen if s.layer is not None and s.layer < layers]
        predicted = sum(per_shape[shape_key(s)]["s_per_matrix"] for s in gen)
        # the overlap the real scan measured (reads beside compute, launches beside stage 1), applied to the
        # per-shape extrapolation, which times each shape's samples alone; conservative: over one generated
        # layer the pipeline's start and the band solver's last launch are paid once per layer, over a whole
        # model once
        ratio = measured / predicted
        row["e2e"] = {"measured_s": measured, "predicted_s": predicted, "ratio": ratio,
                      "full_scan_estimate_s": total * ratio}
        if "goal_s" in row:
            row["meets_goal_with_measured_overlap"] = total * ratio <= row["goal_s"]
        if args.e2e_copies > 1:
            publish(row)
            try:  # its own failure (a full disk) is recorded beside the numbers above, which stand
                row["e2e"]["steady"] = steady_estimate(ckpt, args, measured, sum(s.nbytes for s in gen), nbytes,
                                                       launches_left(full, bands, big))
            except Exception as e:  # noqa: BLE001 - recorded in the result
                row["e2e"]["steady"] = {"error": f"{type(e).__name__}: {e}"}
            if "goal_s" in row and "full_scan_estimate_s" in row["e2e"]["steady"]:
                row["meets_goal_steady"] = row["e2e"]["steady"]["full_scan_estimate_s"] <= row["goal_s"]
    return row


def twostage_rates(path: Path | None) -> dict[int, dict]:
    """k -> the GPU two-stage solver's measured rates at the scan's bandwidth and chase variant
    (bench_twostage.py's JSON), when SPECTRUM_FAST_TWOSTAGE=gpu; else empty."""
    from spectrum_fast.cuda_engine import _DEVICE_BAND, chase_variant, twostage_mode

    if path is None or twostage_mode() != "gpu":
        return {}
    if not path.is_file():
        print(f"no {path}: sampled two-stage shapes are not corrected", file=sys.stderr)
        return {}
    doc = json.loads(path.read_text())
    out: dict[int, dict] = {}
    for row in doc["rows"]:  # the scan's band and chase variant; another variant only if that one is missing
        ours = [e for e in row["gpu"] if e["b"] == _DEVICE_BAND and usable(e)]
        same = [e for e in ours if e.get("variant", chase_variant()) == chase_variant()]
        if same or ours:
            out[row["k"]] = (same or ours)[0]
    return out


def _default_layers(config: dict) -> int:
    # enough layers to hold every distinct shape (DeepSeek-V3: its MoE layers start after the dense ones)
    return config.get("first_k_dense_replace", 0) + 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["Qwen1.5-110B", "Llama-3.1-405B"],
                    help=f"configs in bench/configs ({', '.join(sorted(p.stem for p in CONFIGS.glob('*.json')))})")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--layers", type=int, help="decoder layers to generate (default: enough for every shape)")
    ap.add_argument("--samples", type=int, default=2, help="matrices timed per shape (default 2)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/spectrum_fast_scale"))
    ap.add_argument("--cpu-eig-max-k", type=int, default=8192,
                    help="on the CPU, eigensolver floors above this k are scaled from it by k^3")
    ap.add_argument("--e2e", action="store_true", help="also scan the generated layers end to end")
    ap.add_argument("--e2e-copies", type=int, default=1,
                    help="with --e2e, also scan the generated layers this many times over (see above)")
    ap.add_argument("--twostage", type=Path, help="bench_twostage.py's JSON from this device (see above)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    first_shard = None
    rows = []
    rates: dict = {"gemm_flops": gemm_rate(args.device)}
    if args.device == "cuda":
        rates["pcie_Bps"] = pcie_bandwidth()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent, check=False).stdout.strip()
    from spectrum_fast.cuda_engine import chase_variant, twostage_mode

    doc = {"bench": "scale", "device": args.device, "twostage": twostage_mode(),
           "chase": chase_variant() if twostage_mode() == "gpu" else None,
           "machine": machine_info(), "git_commit": commit,
           "command": "python bench/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rates": rates, "models": rows}
    if args.device == "cuda":
        import torch

        doc["gpu"] = torch.cuda.get_device_name(0)

    def publish(row: dict) -> None:  # the JSON is rewritten whenever a model's row grows
        if not any(r is row for r in rows):
            rows.append(row)
        write_result(args.json, doc)

    for model in args.models:
        try:  # a failing model (its checkpoint, its scan) is recorded; the others still run
            if first_shard is None:
                config = json.loads((CONFIGS / f"{model}.json").read_text())
                layers = min(args.layers or _default_layers(config), config["num_hidden_layers"])
                ckpt = ensure_checkpoint(model, config, layers, args.workdir)
                shard = max(ckpt.glob("*.safetensors"), key=lambda p: p.stat().st_size)
                rates["disk_sequential_Bps"] = disk_bandwidth(shard)
                rates["disk_readahead_Bps"] = disk_bandwidth_readahead(shard)
                rates["disk_Bps"] = max(rates["disk_sequential_Bps"], rates["disk_readahead_Bps"])  # the floor's
                first_shard = shard  # only once the rates are in: else the next model measures them
            publish(bench_model(model, args, rates, publish))
        except Exception as e:  # noqa: BLE001 - keep the other models' numbers; the JSON says what failed
            error = f"{type(e).__name__}: {e}"
            print(f"{model}: FAILED: {error}", file=sys.stderr)
            if rows and rows[-1].get("model") == model:  # its timings stand; the end-to-end scan failed
                rows[-1].setdefault("e2e", {})["error"] = error
            else:
                rows.append({"model": model, "error": error})
            write_result(args.json, doc)

    def fmt(s: float) -> str:
        return f"{s:8.1f} s" if s < 3600 else f"{s / 3600:6.2f} h"

    print(f"\nrates: disk {rates.get('disk_sequential_Bps', math.nan) / 1e9:.2f} GB/s sequential, "
          f"{rates.get('disk_readahead_Bps', math.nan) / 1e9:.2f} GB/s as the read-ahead reads, "
          f"fp32 GEMM {rates['gemm_flops'] / 1e12:.2f} TFLOP/s"
          + (f", PCIe {rates['pcie_Bps'] / 1e9:.1f} GB/s" if "pcie_Bps" in rates else ""))
    print(f"{'model':<16} {'matrices':>8} {'GiB':>6} {'extrapolated':>12} {'floor':>10} {'x floor':>7} "
          f"{'disk':>10} {'Gram':>10} {'eig':>10}  8-device deal (LPT model)")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<16} failed: {r['error']}")
            continue
        f = r["floors"]
        print(f"{r['model']:<16} {r['matrices']:>8} {r['bytes'] / 2**30:>6.0f} {fmt(r['extrapolated_s']):>12} "
              f"{fmt(f['floor_s']):>10} {r['vs_floor']:>7.2f} {fmt(f['disk_s']):>10} {fmt(f['gram_s']):>10} "
              f"{fmt(f['eig_s']):>10}  {r['multi_device']['8']['speedup']:.2f}x"
              + (f"   goal {r['goal_s']:.0f} s: {'met' if r['meets_goal'] else 'NOT met'}" if "goal_s" in r else ""))
        if "measured_s" in r.get("e2e", {}):
            print(f"{'':<16} end to end over {r['layers_generated']} layers: {r['e2e']['measured_s']:.1f} s "
                  f"measured, {r['e2e']['predicted_s']:.1f} s predicted ({r['e2e']['ratio']:.2f}x); the whole "
                  f"model at that overlap: {fmt(r['e2e']['full_scan_estimate_s'])}")
        if "full_scan_estimate_s" in r.get("e2e", {}).get("steady", {}):
            st = r["e2e"]["steady"]
            print(f"{'':<16} {st['copies']}x the generated layers: {st['measured_s']:.1f} s, {st['s_per_gb']:.2f} s "
                  f"per more GB; the whole model at that rate: {fmt(st['full_scan_estimate_s'])}")
    write_result(args.json, doc)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scan speed across torchrun ranks on the CPU (gloo): one checkpoint scanned by 1 process and by W ranks,
every process given the same cores, the records checked equal, the speed-up set beside the deal's ideal.

    python bench/bench_ranks.py --worlds 1 2 --threads 1 --repeat 2 --layers 24 --baseline /tmp/old \\
        --json bench/results/ranks_cpu.json

Each run is a fresh command as a user types it, timed from spawn to exit and pinned with ``taskset`` to
``W x --threads`` cores: ``python -m spectrum_fast.scan CKPT --device cpu --workers 1`` for one rank,
``python -m torch.distributed.run --standalone --nproc_per_node W -m spectrum_fast.scan ...`` (torchrun) for
W ranks, OMP_NUM_THREADS unset as in a user's shell (torchrun then sets it to 1 for each rank). Reported:

- ``wall_s`` (spawn to exit: interpreter, imports, process group, scan, gather, files) and ``scan_s``
  (rank 0's own ``elapsed_s``, in the result file);
- ``speedup`` = one rank's ``wall_s`` / W ranks' ``wall_s``, and ``ideal`` = the LPT deal's bound (the whole
  cost over the largest rank's cost, from the same shape model the scan deals by: ``spectrum_fast.scheduling``);
- ``all_cores``: one process with its default workers on the same W x ``--threads`` cores, the other way to
  use them (what torchrun on one machine has to beat);
- ``startup_s``: the same command on a one-layer checkpoint of small matrices (interpreters, torch's import
  in every rank, the process group, the gather), and ``speedup_after_startup``, the speed-up of what is left
  (what a scan of minutes sees);
- with ``--baseline`` (an earlier tree, e.g. ``git archive <commit> | tar -x -C /tmp/old``), the same W-rank
  runs of that tree, in the same run.

The checkpoint is bench/synth_checkpoint.py's low-rank signal plus noise, in bf16, with a small Llama's shapes
(``--hidden``, ``--intermediate``, ``--layers``), written once under ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _machine import machine_info, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def config(args: argparse.Namespace) -> dict:
    return {"_name_or_path": "bench/ranks", "model_type": "llama", "hidden_size": args.hidden,
            "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": 1024,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def ensure_checkpoint(args: argparse.Namespace) -> Path:
    """The checkpoint for these shapes, written once (its config is the key)."""
    sys.path.insert(0, str(HERE))
    import synth_checkpoint

    cfg = config(args)
    ckpt = args.workdir / f"llama-h{args.hidden}-i{args.intermediate}-l{args.layers}"
    stamp = ckpt / "config.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("hidden_size") == args.hidden):
        synth_checkpoint.write(cfg, ckpt, args.layers, shard_bytes=64 * 2**20, progress=False)
    return ckpt


def tiny(args: argparse.Namespace) -> argparse.Namespace:
    """One layer of small matrices: what a run costs besides its matrices."""
    return argparse.Namespace(**dict(vars(args), hidden=256, intermediate=512, heads=4, kv_heads=2, layers=1))


def matrix_shapes(ckpt: Path) -> list[tuple[int, int]]:
    """The 2-D weights a default scan takes (no embeddings or head), from the safetensors headers."""
    import struct

    shapes = []
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        shapes += [tuple(t["shape"]) for name, t in header.items() if name != "__metadata__"
                   and len(t["shape"]) == 2 and "embed_tokens" not in name and "lm_head" not in name]
    return shapes


def ideal_speedup(shapes: list[tuple[int, int]], world: int) -> float:
    sys.path.insert(0, str(ROOT))
    from spectrum_fast.scheduling import cost, makespan

    costs = [cost(s) for s in shapes]
    return sum(costs) / makespan(costs, world)


def run_once(tree: Path, ckpt: Path, world: int, cores: int, workers: int | None, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    scan = ["-m", "spectrum_fast.scan", str(ckpt), "--device", "cpu", "--out", str(out), "-q"]
    if workers is not None:
        scan += ["--workers", str(workers)]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *scan]
    else:
        cmd = [sys.executable, *scan]
    cmd = ["taskset", "-c", f"0-{cores - 1}", *cmd]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                           "MKL_NUM_THREADS", "SPECTRUM_FAST_MEMORY_GB")}
    env["PYTHONPATH"] = str(tree)
    env["CUDA_VISIBLE_DEVICES"] = ""
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, cwd=out.parent, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    (full,) = [p for p in out.glob("*.json") if json.loads(p.read_text()).get("format")]
    doc = json.loads(full.read_text())
    return {"wall_s": wall, "scan_s": doc["elapsed_s"], "snr": {r["module"]: r["snr"] for r in doc["records"]}}


def best_of(repeat: int, *a) -> dict:
    runs = [run_once(*a) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["wall_s"])
    return dict(best, wall_all_s=[round(r["wall_s"], 3) for r in runs])


def max_rel_diff(a: dict[str, float], b: dict[str, float]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((abs(a[k] - b[k]) / abs(b[k]) if b[k] else abs(a[k])) for k in a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="rank counts (1 is the baseline)")
    ap.add_argument("--threads", type=int, default=1, help="cores per rank")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the fastest counts")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier tree of the repository")
    ap.add_argument("--baseline-repeat", type=int, default=1, help="runs of the baseline's (slow: once)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sf_ranks_bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    worlds = sorted(set(args.worlds) | {1})
    have = len(os.sched_getaffinity(0))
    if max(worlds) * args.threads > have:
        ap.error(f"{max(worlds)} ranks x {args.threads} threads need {max(worlds) * args.threads} cores; "
                 f"this process may use {have}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, small = ensure_checkpoint(args), ensure_checkpoint(tiny(args))
    shapes = matrix_shapes(ckpt)
    doc: dict = {"bench": "ranks", "machine": machine_info(), "command": " ".join(sys.argv),
                 "checkpoint": {"config": config(args), "matrices": len(shapes)}, "threads_per_rank": args.threads,
                 "runs": []}
    trees = [("ours", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    one = best_of(args.repeat, ROOT, ckpt, 1, args.threads, 1, args.workdir / "out")
    one["startup_s"] = best_of(args.repeat, ROOT, small, 1, args.threads, 1, args.workdir / "out")["wall_s"]
    print(f"1 rank on {args.threads} core(s): {one['wall_s']:.2f} s (scan {one['scan_s']:.2f} s, startup "
          f"{one['startup_s']:.2f} s)", flush=True)
    for w in worlds[1:]:
        cores = w * args.threads
        row: dict = {"world": w, "cores": cores, "ideal": round(ideal_speedup(shapes, w), 3)}
        startup = best_of(args.repeat, ROOT, small, w, cores, 1, args.workdir / "out")["wall_s"]
        row["startup_s"] = round(startup, 3)
        for name, tree in trees:
            r = best_of(args.repeat if name == "ours" else args.baseline_repeat, tree, ckpt, w, cores, 1,
                        args.workdir / "out")
            row[name] = {"wall_s": round(r["wall_s"], 3), "wall_all_s": r["wall_all_s"], "scan_s": r["scan_s"],
                         "speedup": round(one["wall_s"] / r["wall_s"], 3),
                         "max_rel_snr_diff_vs_1_rank": max_rel_diff(r["snr"], one["snr"])}
        row["ours"]["speedup_after_startup"] = round((one["wall_s"] - one["startup_s"])
                                                     / (row["ours"]["wall_s"] - startup), 3)
        a = best_of(args.repeat, ROOT, ckpt, 1, cores, None, args.workdir / "out")
        row["all_cores"] = {"wall_s": round(a["wall_s"], 3), "wall_all_s": a["wall_all_s"], "scan_s": a["scan_s"],
                            "speedup": round(one["wall_s"] / a["wall_s"], 3)}
        doc["runs"].append(row)
        base = (f", baseline {row['baseline']['wall_s']:.2f} s ({row['baseline']['speedup']:.2f}x)"
                if "baseline" in row else "")
        print(f"{w} ranks on {cores} cores: {row['ours']['wall_s']:.2f} s, {row['ours']['speedup']:.2f}x; startup "
              f"{startup:.2f} s, after it {row['ours']['speedup_after_startup']:.2f}x (ideal {row['ideal']:.2f}x; "
              f"SNRs within {row['ours']['max_rel_snr_diff_vs_1_rank']:.1e}){base}; "
              f"one process on those cores: {a['wall_s']:.2f} s ({row['all_cores']['speedup']:.2f}x)", flush=True)
        if args.json:
            write_result(args.json, dict(doc, one_rank={k: v for k, v in one.items() if k != "snr"}))
    doc["one_rank"] = {k: v for k, v in one.items() if k != "snr"}
    if args.json:
        write_result(args.json, doc)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

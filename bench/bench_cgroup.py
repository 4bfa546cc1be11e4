"""CPU scans inside real cgroups: this tree against an earlier one, in the same run (Linux, root, cgroup v1).

    python bench/bench_cgroup.py --baseline /tmp/old --json bench/results/cgroup_cpu.json

(``git archive <commit> | tar -x -C /tmp/old`` makes the earlier tree.) Each scan runs in a fresh process moved
into a new child cgroup of this process's own, the way a batch scheduler puts a job below its own cgroups, so
that the limit is not on the hierarchy's root:

- ``none``: no limit (the control: both trees should take the same time);
- ``quota``: ``--cpus`` CPUs' worth of time (``cpu.cfs_quota_us``), as a container's ``--cpus`` or a
  Kubernetes CPU limit; the cgroup's throttling counters are recorded;
- ``memory``: ``--mem-gib`` GiB (``memory.limit_in_bytes``), as a Slurm job's ``--mem``; a scan the cgroup's
  OOM killer stopped is recorded with its exit status (-9).

Per scan: exit status, wall seconds, peak RSS (wait4), the cgroup's peak memory and throttled time; per
scenario the largest relative SNR difference between the trees and the speed-up. The checkpoint is
``--count`` bf16 ``--shape`` matrices (bench/synth_checkpoint.py's low-rank signal plus noise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from _machine import machine_info, write_result
from bench_cpu_memory import ROOT, _scan, _shape, checkpoint, compare

sys.path.insert(0, str(ROOT))
from spectrum_fast import _cgroup


@contextmanager
def cgroup(name: str) -> Iterator[dict[str, Path]]:
    """New child cgroups ``name`` of this process's own v1 ``memory`` and ``cpu`` cgroups, removed afterwards."""
    dirs: dict[str, Path] = {}
    for controller in ("memory", "cpu"):
        own = _cgroup.v1_dirs(controller)
        if not own:
            raise SystemExit(f"bench_cgroup: no cgroup v1 {controller} hierarchy is mounted here")
        dirs[controller] = own[0] / name
    made = []
    try:
        for d in dirs.values():
            try:
                d.mkdir()
            except OSError as e:
                raise SystemExit(f"bench_cgroup: cannot create the cgroup {d} ({e.strerror}): run it as root") from e
            made.append(d)
        yield dirs
    finally:
        for d in made:  # empty once the scan has exited; the kernel may take a moment to agree
            for attempt in range(20):
                with suppress(OSError):
                    d.rmdir()
                if not d.exists():
                    break
                time.sleep(0.1 * attempt)
            else:
                print(f"bench_cgroup: could not remove {d}", file=sys.stderr)


def entering(dirs: dict[str, Path]) -> tuple[str, ...]:
    """The command prefix that moves a process into ``dirs``' cgroups, then execs its arguments."""
    moves = " && ".join(f'echo $$ > "{d}/cgroup.procs"' for d in dirs.values())
    return ("sh", "-c", moves + ' && exec "$@"', "sh")


def counters(dirs: dict[str, Path]) -> dict:
    """The cgroups' peak memory, OOM kills and CPU throttling so far."""
    mem, cpu = dirs["memory"], dirs["cpu"] / "cpu.stat"
    return {"cgroup_peak_gb": round((_cgroup.read_int(mem / "memory.max_usage_in_bytes") or 0) / 2**30, 2),
            "oom_kills": _cgroup.stat(mem / "memory.oom_control", "oom_kill"),
            "nr_throttled": _cgroup.stat(cpu, "nr_throttled"),
            "throttled_s": round(_cgroup.stat(cpu, "throttled_time") / 1e9, 2)}


def run(tree: Path, ckpt: Path, out: Path, limits: dict[tuple[str, str], int]) -> dict:
    with cgroup(f"spectrum_fast_bench_{os.getpid()}") as dirs:
        for (controller, name), value in limits.items():
            (dirs[controller] / name).write_text(f"{value}\n")
        row = _scan(tree, ckpt, out, entering(dirs))  # prints its own row
        extra = counters(dirs)
    print(json.dumps(extra), flush=True)
    return {**row, **extra}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="an earlier tree of the repository")
    ap.add_argument("--shape", default="14336x4096", help="MxN of the scanned matrices")
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--cpus", type=float, default=1.0, help="the quota scenario's CPUs")
    ap.add_argument("--mem-gib", type=float, default=1.5, help="the memory scenario's limit")
    ap.add_argument("--scenarios", nargs="+", default=["none", "quota", "memory"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sf_cgroup_bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = _shape(args.shape)
    ckpt = checkpoint(shape, args.count, args.workdir)
    period = 100_000
    limits = {"none": {}, "quota": {("cpu", "cpu.cfs_period_us"): period,
                                    ("cpu", "cpu.cfs_quota_us"): int(args.cpus * period)},
              "memory": {("memory", "memory.limit_in_bytes"): int(args.mem_gib * 2**30)}}
    doc: dict = {"bench": "cgroup_cpu", "machine": machine_info(), "command": " ".join(sys.argv),
                 "shape": list(shape), "count": args.count, "cpus": args.cpus, "mem_gib": args.mem_gib,
                 "baseline": str(args.baseline), "scenarios": {}}
    for name in args.scenarios:
        print(f"== {name}", flush=True)
        ours = run(ROOT, ckpt, args.workdir / "ours.json", limits[name])
        base = run(args.baseline, ckpt, args.workdir / "base.json", limits[name])
        doc["scenarios"][name] = compare(ours, base)
        print(json.dumps({k: v for k, v in doc["scenarios"][name].items() if k not in ("ours", "baseline")}),
              flush=True)
        if args.json:
            write_result(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

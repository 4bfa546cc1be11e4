"""Read-ahead across engine calls (cuda_engine._warm), measured on this machine's disk with the GPU's
compute replaced by a wait of the measured length, so it runs without a GPU:

    python bench/bench_readahead.py --json bench/results/readahead_cpu.json

A 100B model's matrices are ~1 GB each, one per engine call, and the engine overlaps reading with compute
only inside a call. For ``--matrices`` bf16 matrices written to a file whose page cache is dropped before
each run, a stand-in engine reads each task's bytes with ``pread`` (as the native reader thread does) and
then waits ``nbytes / --compute-gbps`` (default 0.8 GB/s: an 8192 x 49152 bf16 matrix, 805 MB, took 1.51 s
per matrix float64 first on an H100, bench/results/scale_gpu.json, of which 0.49 s was reading it at
1.65 GB/s, leaving ~1.0 s of compute). Baseline: the same path with the read-ahead turned off. The GPU
figure comes from bench_scale.py --e2e on a lent GPU. ``one_thread``: the read-ahead by one sequential reader
instead of ``cuda_engine.warm_threads()`` (pieces in flight keep an NVMe queue busy); run it with a fast stand-in
compute (``--compute-gbps 4``, the GPU two-stage route's pace) to see the disk's share.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import drop_cache, machine_info, read_rate, write_result


class StandInEngine:
    """GramEngine's contract for the orchestration: reads the bytes, waits the compute time, returns
    eigenvalues of a tiny stand-in so the guard has something to judge (their values are not the point)."""

    compute_bps = 0.8e9

    def __init__(self, device: int = 0) -> None:
        self.device = device

    def run(self, tasks, fp64=False, should_stop=None):
        out = []
        for path, offset, nbytes, _dtype, rows, cols, _scale in tasks:
            fd = os.open(path, os.O_RDONLY)
            try:
                buf = bytearray(min(nbytes, 64 << 20))
                done = 0
                while done < nbytes:
                    n = os.preadv(fd, [memoryview(buf)[: min(len(buf), nbytes - done)]], offset + done)
                    if n <= 0:
                        break
                    done += n
            finally:
                os.close(fd)
            time.sleep(nbytes / self.compute_bps)
            k = min(rows, cols)
            out.append((np.linspace(1.0, 2.0, k), 1.0, 0))
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrices", type=int, default=8)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=4096, help="bf16 matrices of rows x cols (default 128 MiB each)")
    ap.add_argument("--compute-gbps", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    from spectrum_fast import cuda_engine
    from spectrum_fast.checkpoint import TensorInfo

    StandInEngine.compute_bps = args.compute_gbps * 1e9
    nbytes = args.rows * args.cols * 2
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = Path(tmp) / "weights.bin"
        with open(path, "wb") as f:
            f.writelines(np.random.default_rng(0).integers(0, 2**16, nbytes // 2, dtype=np.uint16).tobytes() for _ in range(args.matrices))
        infos = [TensorInfo(f"model.layers.{i}.mlp.up_proj.weight", path, i * nbytes, nbytes, "BF16",
                            (args.rows, args.cols)) for i in range(args.matrices)]
        import spectrum_fast

        fake = types.ModuleType("spectrum_fast._C")
        fake.GramEngine = StandInEngine
        saved = (sys.modules.get("spectrum_fast._C"), getattr(spectrum_fast, "_C", None), cuda_engine._CHUNK_BYTES)
        sys.modules["spectrum_fast._C"], spectrum_fast._C = fake, fake
        real_warm = cuda_engine._warm
        cuda_engine._CHUNK_BYTES = nbytes  # one matrix per engine call, as for a 100B model's ~1 GB matrices
        times: dict[str, list[float]] = {"without": [], "one_thread": [], "with": []}
        warm = {"without": lambda infos, stop, threads=None: 0,
                "one_thread": lambda infos, stop, threads=None: real_warm(infos, stop, threads=1),
                "with": real_warm}  # "with": warm_threads() threads, as the scan reads ahead
        try:
            for _ in range(args.repeats):
                for mode, seconds in times.items():
                    cuda_engine._warm = warm[mode]
                    drop_cache(path)
                    t0 = time.perf_counter()
                    cuda_engine.cuda_stats(infos, [0], lambda info, out: None, units={})  # no batched solver
                    seconds.append(time.perf_counter() - t0)
                    print(f"{mode:>10} read-ahead: {seconds[-1]:.2f} s", flush=True)
        finally:
            cuda_engine._warm, cuda_engine._CHUNK_BYTES = real_warm, saved[2]
            if saved[0] is None:
                sys.modules.pop("spectrum_fast._C", None)
            else:
                sys.modules["spectrum_fast._C"] = saved[0]
            if saved[1] is None:
                delattr(spectrum_fast, "_C")
            else:
                spectrum_fast._C = saved[1]
        disk_bps = read_rate(path, cold=True)
    best = {m: float(np.median(v)) for m, v in times.items()}  # the disk here is noisy: medians
    read_s, compute_s = args.matrices * nbytes / disk_bps, args.matrices * nbytes / StandInEngine.compute_bps
    doc = {"bench": "readahead", "machine": machine_info(), "command": "python bench/bench_readahead.py "
           + " ".join(argv if argv is not None else sys.argv[1:]),
           "matrices": args.matrices, "matrix_bytes": nbytes, "disk_Bps": disk_bps, "compute_Bps": StandInEngine.compute_bps,
           "warm_threads": cuda_engine.warm_threads(), "seconds": times, "median_s": best,
           "speedup": best["without"] / best["with"], "threads_speedup": best["one_thread"] / best["with"],
           "serial_prediction_s": read_s + compute_s, "overlapped_prediction_s": max(read_s, compute_s) + read_s / args.matrices}
    print(f"disk {disk_bps / 1e9:.2f} GB/s; without {best['without']:.2f} s (read + compute {read_s + compute_s:.2f} s), "
          f"with {best['with']:.2f} s (overlapped {doc['overlapped_prediction_s']:.2f} s): {doc['speedup']:.2f}x; "
          f"read ahead by one thread {best['one_thread']:.2f} s ({doc['threads_speedup']:.2f}x for "
          f"{doc['warm_threads']} threads)")
    write_result(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

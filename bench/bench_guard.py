"""How conservative is the fp32 accuracy guard at large k? Measures, per matrix, the fp32 route's real
errors against the float64 route and compares them with the guard's error model.

    python bench/bench_guard.py --device cuda --sizes 1024 4096 8192 --json bench/results/guard_gpu.json
    python bench/bench_guard.py --device cpu --sizes 256 1024 --json /tmp/guard_cpu.json

For Mistral-like bf16 matrices (``m x k`` with ``m = 3.5 k``, square ``k x k``; low-rank signal plus noise,
as bench/synth_checkpoint.py writes them) it computes the Gram eigenvalues in fp32 and in float64 with the
engine of ``--device`` and reports:

- ``max_ratio``: the largest ``|lambda32 - lambda64| / delta_i`` over all eigenvalues, where ``delta_i`` is
  the guard's error model (cpu_engine.stats_from_gram), as fitted on the CPU. On the GPU the guard widens
  that model by ``cuda_engine.GPU_ERROR_SCALE`` (``guard_scale``); ``max_ratio / guard_scale`` must stay
  well below 1, and far below 1 means the bound could be tightened.
- ``snr_rel_err``: the fp32 SNR's real error against the float64 one, and whether the guard (widened as on
  that device) accepted it.

The guard is only loosened on such evidence, measured on the device that will use it (issue #3).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth_checkpoint import Spec, _matrix_rows


def _matrices(k: int, count: int) -> list[tuple[str, tuple[int, int]]]:
    return [(f"model.layers.{i}.mlp.w{k}_{j}.weight", shape)
            for i in range(count) for j, shape in enumerate([(7 * k // 2, k), (k, k)])]


def write(path: Path, k: int, count: int) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for seed, (name, shape) in enumerate(_matrices(k, count)):
        rows = _matrix_rows(Spec(name, shape, "BF16", None), seed)
        tensors[name] = torch.cat(list(rows)).to(torch.bfloat16)
    save_file(tensors, str(path))


def eigenvalues(infos, device: str, fp64: bool) -> list[tuple[np.ndarray, float]]:
    """(ascending Gram eigenvalues, ||W||_F^2) per matrix."""
    if device == "cuda":
        from spectrum_fast import _C
        from spectrum_fast.cuda_engine import _task

        out = _C.GramEngine(0).run([_task(i) for i in infos], fp64=fp64)
        return [(np.asarray(lam, dtype=np.float64), float(np.sum(lam))) for lam, _, _ in out]
    from spectrum_fast.checkpoint import read_matrix
    from spectrum_fast.cpu_engine import _gram_eigenvalues

    return [_gram_eigenvalues(read_matrix(i) if fp64 else read_matrix(i).astype(np.float32, copy=False), fp64=fp64)
            for i in infos]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--count", type=int, default=2, help="matrices of each shape per size")
    ap.add_argument("--cpu-two-stage-min-k", type=int,
                    help="CPU: order from which LAPACK's two-stage solver runs (default: the engine's)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    from spectrum_fast import cpu_engine

    if args.cpu_two_stage_min_k is not None:
        cpu_engine.TWO_STAGE_MIN_K = args.cpu_two_stage_min_k
    from spectrum_fast.checkpoint import open_checkpoint
    from spectrum_fast.cpu_engine import _GRAM_C_FRO, _GRAM_C_REL, stats_from_gram
    from spectrum_fast.cuda_engine import GPU_ERROR_SCALE
    from spectrum_fast.snr import snr_from_singular_values

    eps32 = float(np.finfo(np.float32).eps)
    scale = GPU_ERROR_SCALE if args.device == "cuda" else 1.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.sizes:
            d = Path(tmp) / str(k)
            d.mkdir()
            write(d / "model.safetensors", k, args.count)
            infos = sorted(open_checkpoint(d).tensors.values(), key=lambda i: i.name)
            e32, e64 = eigenvalues(infos, args.device, False), eigenvalues(infos, args.device, True)
            for info, (l32, fro32), (l64, _) in zip(infos, e32, e64):
                m, n = info.shape
                lam = np.maximum(l32, 0.0)
                delta = eps32 * (_GRAM_C_REL * math.sqrt(max(m, n)) * lam + _GRAM_C_FRO * fro32 / math.sqrt(lam.size))
                ratio = np.abs(l32 - l64) / delta
                snr32 = snr_from_singular_values(np.sqrt(lam)[::-1], m, n).snr
                snr64 = snr_from_singular_values(np.sqrt(np.maximum(l64, 0.0))[::-1], m, n).snr
                row = {"k": k, "shape": [m, n], "max_ratio": float(ratio.max()),
                       "solver": "cuSOLVER" if args.device == "cuda" else
                       ("syevd_2stage" if k >= cpu_engine.TWO_STAGE_MIN_K else "syevr"),
                       "median_ratio": float(np.median(ratio)), "guard_scale": scale,
                       "snr_rel_err": abs(snr32 - snr64) / abs(snr64),
                       "guard_accepts": stats_from_gram(l32, fro32, eps32 * scale, m, n) is not None}
                print(json.dumps(row), flush=True)
                rows.append(row)
            (d / "model.safetensors").unlink()
    doc = {"bench": "guard", "device": args.device, "rows": rows}
    if args.device == "cpu":
        doc["cpu_eigensolver"] = cpu_engine.eigensolver()
    if args.device == "cuda":
        import torch

        doc["gpu"] = torch.cuda.get_device_name(0)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

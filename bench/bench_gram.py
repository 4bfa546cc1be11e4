"""The two-stage route's float64 Gram matrix: ``cuda_engine._gram`` (a symmetric split, 9/16 of the flops)
against one ``x.T @ x``, on the CPU or a GPU, same matrix, same run.

    python bench/bench_gram.py --device cpu --json bench/results/gram_split_cpu.json

``bench_gpu.py`` runs :func:`gram_split_speedup` on the GPU as part of its two-stage floors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, seconds, write_result


def gram_split_speedup(rows: int = 14336, k: int = 4096, device: str = "cuda", repeats: int = 3) -> dict:
    """Best of ``repeats`` for a ``rows x k`` float64 Gram matrix both ways, after a warm-up of each."""
    import torch

    from spectrum_fast.cuda_engine import _gram, gram_flops

    x = torch.randn(rows, k, device=device, dtype=torch.float64)
    x.T @ x, _gram(x)  # warm-up
    full = seconds(lambda: x.T @ x, repeats, device)
    split = seconds(lambda: _gram(x), repeats, device)
    return {"shape": [rows, k], "device": device, "full_s": full, "split_s": split, "speedup": full / split,
            "flops_ratio": gram_flops(rows, k) / (2 * rows * k * k)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rows", type=int, default=14336)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    out = gram_split_speedup(args.rows, args.k, args.device, args.repeats)
    doc = {"bench": "gram_split", "machine": machine_info(),
           "command": "python bench/bench_gram.py " + " ".join(argv if argv is not None else sys.argv[1:]), **out}
    print(f"{args.rows} x {args.k} float64 on {args.device}: x.T @ x {out['full_s']:.3f} s, split {out['split_s']:.3f} s "
          f"({out['speedup']:.2f}x; {out['flops_ratio']:.4f} of the flops)")
    write_result(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

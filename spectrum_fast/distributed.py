"""Scanning across processes and machines: ``torchrun --nproc_per_node G [--nnodes N] -m spectrum_fast.scan``.

Every rank reads the checkpoint's headers, deals the matrices out the same way (largest first, to the
rank with the least estimated work: balanced by cost, not by count), reads and computes only its own,
and all ranks exchange their records (``all_gather_object`` over a gloo group, also when the default
backend is NCCL). A rank that fails sends its error instead, so the whole run fails with that rank's
message on every rank rather than hanging in the collective.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ._cgroup import cpu_quota
from .errors import SpectrumError
from .result import MatrixRecord


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    group: object


def _env_int(name: str, default: int) -> int:
    """An integer torchrun put in the environment; ``default`` when it is unset or not an integer."""
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        return default


def world_size() -> int:
    """Processes in this run according to torchrun's environment (1 when not launched by it)."""
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's index among the ranks torchrun started on its machine: the GPU it takes (0 alone)."""
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    """Processes torchrun started on this machine (1 when not launched by it)."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def cores_per_rank() -> int:
    """The cores this process may use: its CPU affinity (``taskset``, a batch scheduler's cpuset) capped by its
    cgroup's CPU quota (a container's ``--cpus``: more threads than that only take turns), shared evenly among
    the ranks torchrun started on this machine, which all see the same ones."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))  # 2.5 CPUs' worth: 3 threads; 4.0: 4
    return max(1, cores // local_world_size())


def context() -> Context | None:
    """Join the process group torchrun set up (creating it if needed); None when running alone."""
    if world_size() <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    group = dist.new_group(backend="gloo")
    return Context(dist.get_rank(), dist.get_world_size(), group)


def rank_journal(path: Path) -> Path:
    """This process's journal: each rank journals its own share (resuming needs the same number of ranks)."""
    return path if world_size() <= 1 else path.with_name(f"{path.name}.rank{rank()}-of-{world_size()}")


def exchange(ctx: Context, records: list[MatrixRecord], error: BaseException | None) -> list[MatrixRecord]:
    """Everyone's records on every rank; raises on every rank if any rank failed, naming it."""
    import torch.distributed as dist

    mine = (records, None if error is None else f"{type(error).__name__}: {error}" if not isinstance(
        error, SpectrumError) else str(error))
    gathered: list = [None] * ctx.world
    dist.all_gather_object(gathered, mine, group=ctx.group)
    for r, (_, err) in enumerate(gathered):
        if err is not None:
            raise SpectrumError(f"rank {r} of {ctx.world} failed: {err}")
    return [rec for recs, _ in gathered for rec in recs]

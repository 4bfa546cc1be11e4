"""Dealing matrices out to workers (GPUs, torchrun ranks) so that all finish at about the same time.

The work of one matrix is estimated from its shape: ``max(m, n)·k²`` for the Gram matrix plus ``k³`` for
the eigensolver, ``k = min(m, n)``. Items go largest first to the worker with the least work so far
(LPT scheduling, within 4/3 of the best possible makespan). The deal depends only on the shapes and the
order of the items, so every rank computes the same one without talking to the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from .checkpoint import TensorInfo

T = TypeVar("T")


def cost(shape: Sequence[int]) -> float:
    m, n = shape[0], shape[1]
    k = min(m, n)
    return float(max(m, n)) * k * k + float(k) ** 3


def lpt(costs: Sequence[float], n_workers: int) -> list[int]:
    """The worker of each item: largest first (ties in item order) to the least loaded (ties: lowest index)."""
    loads = [0.0] * n_workers
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        w = min(range(n_workers), key=lambda w: (loads[w], w))
        owner[i] = w
        loads[w] += costs[i]
    return owner


def makespan(costs: Sequence[float], n_workers: int) -> float:
    """The largest load of :func:`lpt`'s deal."""
    loads = [0.0] * n_workers
    for c, w in zip(costs, lpt(costs, n_workers)):
        loads[w] += c
    return max(loads)


def _deal(items: Sequence[T], costs: Sequence[float], n_workers: int) -> list[list[T]]:
    out: list[list[T]] = [[] for _ in range(n_workers)]
    owner = lpt(costs, n_workers)
    for i in sorted(range(len(items)), key=lambda i: (-costs[i], i)):  # each worker's share largest first
        out[owner[i]].append(items[i])
    return out


def plan(infos: Sequence[TensorInfo], n_workers: int) -> list[list[TensorInfo]]:
    """Each worker's matrices, balanced by estimated cost, largest first."""
    return _deal(infos, [cost(i.shape) for i in infos], n_workers)


def plan_files(infos: Sequence[TensorInfo], n_workers: int) -> list[list[TensorInfo]]:
    """Whole files dealt out by their summed cost: for scans that download each file once (from the Hub)."""
    by_file: dict[str, list[TensorInfo]] = {}
    for info in infos:
        by_file.setdefault(str(info.file), []).append(info)
    groups = list(by_file.values())
    return [[info for g in share for info in g]
            for share in _deal(groups, [sum(cost(i.shape) for i in g) for g in groups], n_workers)]

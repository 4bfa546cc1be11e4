"""Dealing matrices out to workers (GPUs, torchrun ranks) so that all finish at about the same time.

The work of one matrix is estimated from its shape: ``max(m, n)·k²`` for the Gram matrix plus ``k³`` for
the eigensolver, ``k = min(m, n)``. Items go largest first to the worker with the least work so far
(LPT scheduling, within 4/3 of the best possible makespan). The deal depends only on the shapes and the
order of the items, so every rank computes the same one without talking to the others.

On the GPU, same-shape small matrices go through a batched solver whose last bits depend on which
matrices share a call (on an H100, up to 7e-7 relative). So that a resumed, multi-GPU or multi-rank scan
gives bit for bit what an uninterrupted one does, those calls are fixed before anything is dealt out
(:func:`batch_units`) and never split: dealing, resuming and staging move whole units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from .checkpoint import TensorInfo, scale_layout

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


def batch_units(infos: Sequence[TensorInfo], max_k: int, size: int, first: int = 0) -> dict[str, int]:
    """The batched solver's calls, fixed for the whole scan: matrix name -> unit number.

    Matrices with ``k <= max_k`` that share a file, shape, dtype and scale layout form units of ``size``,
    in the order given (a scan's: by file and offset). A matrix left alone (no partner, or the last of a
    group) is in no unit and goes through the solver on its own. Unit numbers start at ``first``."""
    return _units([i for i in infos if max_k and min(i.shape) <= max_k], lambda k: size, first)


def band_units(infos: Sequence[TensorInfo], size_of: Callable[[int], int], first: int = 0) -> dict[str, int]:
    """As :func:`batch_units`, for the GPU two-stage solver's batched band reduction: all of ``infos``, in
    units of ``size_of(k)`` matrices."""
    return _units(infos, size_of, first)


def _units(infos: Sequence[TensorInfo], size_of: Callable[[int], int], first: int) -> dict[str, int]:
    groups: dict[tuple, list[TensorInfo]] = {}
    for info in infos:
        sc = info.scale
        key = (str(info.file), info.shape, info.dtype, scale_layout(info) if sc else None,
               sc.dtype if sc else None, sc.nbytes if sc else None)
        groups.setdefault(key, []).append(info)
    units: dict[str, int] = {}
    parts = [[i.name for i in members[s:s + size]]
             for members in groups.values()
             for size in (max(1, size_of(min(members[0].shape))),)
             for s in range(0, len(members), size)]
    for unit, part in enumerate((p for p in parts if len(p) > 1), start=first):
        units.update(dict.fromkeys(part, unit))
    return units


def group_units(infos: Sequence[TensorInfo], units: dict[str, int]) -> list[list[TensorInfo]]:
    """``infos`` as groups: each unit's members together (at its first member's place), the rest alone."""
    groups: list[list[TensorInfo]] = []
    where: dict[int, list[TensorInfo]] = {}
    for info in infos:
        unit = units.get(info.name)
        if unit is None:
            groups.append([info])
        elif unit in where:
            where[unit].append(info)
        else:
            where[unit] = [info]
            groups.append(where[unit])
    return groups


def plan(infos: Sequence[TensorInfo], n_workers: int,
         units: dict[str, int] | None = None) -> list[list[TensorInfo]]:
    """Each worker's matrices, balanced by estimated cost, largest first; a unit (:func:`batch_units`)
    goes whole to one worker."""
    groups = group_units(infos, units or {})
    return [[info for g in share for info in g]
            for share in _deal(groups, [sum(cost(i.shape) for i in g) for g in groups], n_workers)]


def plan_files(infos: Sequence[TensorInfo], n_workers: int) -> list[list[TensorInfo]]:
    """Whole files dealt out by their summed cost: for scans that download each file once (from the Hub)."""
    by_file: dict[str, list[TensorInfo]] = {}
    for info in infos:
        by_file.setdefault(str(info.file), []).append(info)
    groups = list(by_file.values())
    return [[info for g in share for info in g]
            for share in _deal(groups, [sum(cost(i.shape) for i in g) for g in groups], n_workers)]

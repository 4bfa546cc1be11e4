"""The CPU scan's memory budget: how much it may take, the budget itself, and a scan held to it."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

import spectrum_fast
from spectrum_fast import memory, scanner
from spectrum_fast.checkpoint import open_checkpoint
from spectrum_fast.errors import SpectrumError
from spectrum_fast.memory import Budget, MemoryBudgetWarning

from .conftest import save_np


def test_budget_admits_what_fits_and_waits_for_the_rest():
    budget, stop = Budget(100), threading.Event()
    assert budget.acquire(60, stop) and budget.acquire(40, stop)
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.acquire(30, stop)))
    waiter.start()
    time.sleep(0.3)
    assert got == [] and budget.held == 100  # 30 more do not fit
    budget.release(60)
    waiter.join(timeout=5)
    assert got == [True] and budget.held == 70 and budget.peak == 100


def test_budget_lets_one_oversized_matrix_in_alone():
    budget, stop = Budget(10), threading.Event()
    assert budget.acquire(50, stop) and budget.held == 50  # nothing else held: it goes on
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.acquire(1, stop)))
    waiter.start()
    time.sleep(0.2)
    assert got == []
    stop.set()  # a stopped scan does not wait on
    waiter.join(timeout=5)
    assert got == [False] and budget.held == 50


def test_no_limit_never_waits():
    budget, stop = Budget(None), threading.Event()
    assert all(budget.acquire(1 << 40, stop) for _ in range(3)) and budget.peak == 3 << 40


def test_available_bytes_from_the_setting(monkeypatch):
    monkeypatch.setenv("SPECTRUM_FAST_MEMORY_GB", "1.5")
    assert memory.available_bytes() == int(1.5 * 2**30)
    for bad in ("0", "-2", "lots"):
        monkeypatch.setenv("SPECTRUM_FAST_MEMORY_GB", bad)
        with pytest.raises(SpectrumError, match="SPECTRUM_FAST_MEMORY_GB"):
            memory.available_bytes()


def test_available_bytes_from_the_system(monkeypatch):
    monkeypatch.delenv("SPECTRUM_FAST_MEMORY_GB", raising=False)
    got = memory.available_bytes()
    free = memory._meminfo_available()
    if free is None:
        pytest.skip("no /proc/meminfo here")
    assert got is not None and 0 < got <= memory.SHARE * free * 1.05  # memory moves a little meanwhile


def test_ranks_on_one_machine_split_its_memory(monkeypatch):
    monkeypatch.delenv("SPECTRUM_FAST_MEMORY_GB", raising=False)
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 100 << 30)
    monkeypatch.setattr(memory, "_cgroup_available", lambda: 40 << 30)  # a container's room: the lesser
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory.available_bytes() == int(memory.SHARE * (40 << 30))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4: a quarter each
    assert memory.available_bytes() == int(memory.SHARE * (40 << 30)) // 4
    monkeypatch.setenv("SPECTRUM_FAST_MEMORY_GB", "3")  # the setting is per process
    assert memory.available_bytes() == 3 << 30


def test_cgroup_room(tmp_path):
    no_table = tmp_path / "no_mountinfo"  # no mount table: v2 at the root, v1 in folders below it
    own = tmp_path / "self_cgroup"
    own.write_text("0::/job\n")
    job = tmp_path / "job"
    job.mkdir()
    (job / "memory.max").write_text("8589934592\n")
    (job / "memory.current").write_text("1073741824\n")
    assert memory._cgroup_available(tmp_path, own, no_table) == 7 << 30  # cgroup v2: limit minus usage
    (job / "memory.stat").write_text("anon 100\nfile 3221225472\ninactive_file 2147483648\nactive_file 1\n")
    assert memory._cgroup_available(tmp_path, own, no_table) == 9 << 30  # the inactive page cache is given back
    (job / "memory.max").write_text("max\n")
    assert memory._cgroup_available(tmp_path, own, no_table) is None  # no limit
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(str(4 << 30))
    (v1 / "memory.usage_in_bytes").write_text(str(1 << 30))
    (job / "memory.max").unlink()
    assert memory._cgroup_available(tmp_path, own, no_table) == 3 << 30  # cgroup v1
    (v1 / "memory.stat").write_text("cache 5\ntotal_inactive_file 536870912\n")
    assert memory._cgroup_available(tmp_path, own, no_table) == (3 << 30) + (1 << 29)  # inactive page cache is room
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert memory._cgroup_available(tmp_path, own, no_table) is None


def test_matrix_bytes_counts_the_matrix_and_the_larger_of_reading_and_computing(tmp_path):
    rng = np.random.default_rng(0)
    path = save_np(tmp_path / "m.safetensors", {"tall.weight": rng.standard_normal((3000, 40)).astype(np.float16),
                                                 "square.weight": rng.standard_normal((600, 600)).astype(np.float32)})
    infos = open_checkpoint(path).tensors
    tall, square = infos["tall.weight"], infos["square.weight"]
    assert scanner._matrix_bytes(tall) == 4 * 3000 * 40 + max(2 * 3000 * 40, 16 * 40 * 40 + (64 << 20))
    assert scanner._matrix_bytes(square) == 4 * 600 * 600 + 16 * 600 * 600 + (64 << 20)
    # exact: every matrix takes the float64 SVD, with its own float64 copy of the matrix
    assert scanner._matrix_bytes(tall, exact=True) >= 4 * 3000 * 40 + 8 * 3000 * 40


def _checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"model.layers.{i}.mlp.{p}.weight": (rng.standard_normal((300, 120)) / 10).astype(np.float32)
               for i in range(3) for p in ("up_proj", "down_proj")}
    save_np(tmp_path / "ckpt" / "model.safetensors", tensors)
    return tmp_path / "ckpt"


@pytest.fixture
def budgets(monkeypatch) -> list[Budget]:
    """Every budget the scans make, as they make them."""
    made: list[Budget] = []

    class Recorded(Budget):
        def __init__(self, limit):
            super().__init__(limit)
            made.append(self)

    monkeypatch.setattr(scanner, "Budget", Recorded)
    return made


def test_scan_held_to_a_small_budget_takes_one_matrix_at_a_time(tmp_path, monkeypatch, budgets):
    """A budget smaller than any matrix: one matrix in flight at a time (read, computed, freed), a warning
    naming the largest, and the same numbers as an unbounded scan."""
    ckpt = _checkpoint(tmp_path)
    free = spectrum_fast.scan(ckpt, device="cpu", progress=False, workers=2)
    budgets.clear()
    monkeypatch.setenv("SPECTRUM_FAST_MEMORY_GB", "0.001")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        held = spectrum_fast.scan(ckpt, device="cpu", progress=False, workers=2)
    one = max(scanner._matrix_bytes(i) for i in open_checkpoint(ckpt).tensors.values())
    assert budgets and budgets[0].peak == one and budgets[0].held == 0  # never two at once; all given back
    msgs = [str(w.message) for w in caught if issubclass(w.category, MemoryBudgetWarning)]
    assert len(msgs) == 1 and "model.safetensors" in msgs[0] and "one at a time" in msgs[0]
    assert [(r.module, r.snr) for r in held.records] == [(r.module, r.snr) for r in free.records]


def test_scan_within_budget_gives_every_byte_back(tmp_path, monkeypatch, budgets):
    monkeypatch.setenv("SPECTRUM_FAST_MEMORY_GB", "64")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryBudgetWarning)  # everything fits: no warning
        res = spectrum_fast.scan(_checkpoint(tmp_path), device="cpu", progress=False, workers=2)
    assert len(res.records) == 6 and budgets[0].held == 0 and budgets[0].peak > 0


def test_failed_read_gives_its_bytes_back(tmp_path):
    ckpt = _checkpoint(tmp_path)
    last = max(open_checkpoint(ckpt).tensors.values(), key=lambda i: i.offset)
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:-1000])  # truncated
    budget = Budget(1 << 40)
    with pytest.raises(SpectrumError, match="truncated"):
        scanner._cpu_stats([last], 1, False, lambda info, out: None, budget)
    assert budget.peak == scanner._matrix_bytes(last) and budget.held == 0


def test_bad_memory_setting_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from spectrum_fast.cli import scan_main

    monkeypatch.setenv("SPECTRUM_FAST_MEMORY_GB", "plenty")
    assert scan_main([str(_checkpoint(tmp_path)), "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "SPECTRUM_FAST_MEMORY_GB must be a positive number" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.json"))

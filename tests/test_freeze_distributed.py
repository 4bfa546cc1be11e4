"""freeze() under real sharding wrappers: 2 CPU processes on gloo, FSDP2, FSDP1 and DeepSpeed ZeRO-3.

Each test scans a small saved Llama here, hands the selected module names to two worker processes
(``tests/distributed/freeze_worker.py``, started with the environment ``torchrun`` sets), which freeze,
wrap, take two AdamW steps (weight decay on, so a frozen parameter wrongly given to the optimizer would
move) and gather the full parameters. The assertions are made here, from what the workers wrote:

* every frozen parameter is bit-identical to the checkpoint, every selected one has changed;
* the optimizer holds (state for) the trainable parameters only;
* ``FreezeReport.trainable_params`` / ``total_params`` equal the sums computed from the unsharded
  checkpoint, also where the live parameters are DTensors (FSDP2) or ZeRO-3 partitions (``ds_numel``).

The wrappers are imported only in the workers: they warn at import time, and this file runs under
``filterwarnings = error``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

import spectrum_fast

from .ranks import run_workers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.slow

WORKER = "freeze_worker.py"
WORLD_SIZE = 2
TIMEOUT_S = 240  # a hang (e.g. one rank died inside a collective) fails the test instead of CI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The worker's Llama, saved once; low-rank structure added so that the SNRs differ."""
    path = tmp_path_factory.mktemp("dist") / "llama"
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ".layers." in name:
                low_rank = torch.randn(p.shape[0], 4, generator=g) @ torch.randn(4, p.shape[1], generator=g)
                p.add_(float(torch.rand(1, generator=g)) * 0.5 * low_rank / p.shape[1] ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="module")
def initial(checkpoint) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


@pytest.fixture(scope="module")
def selection(checkpoint) -> list[str]:
    modules = spectrum_fast.scan(checkpoint, progress=False).select(0.5).modules
    # 2 layers x 7 projection types, top half of each type: one module per type
    assert len(modules) == 7 and all(m.startswith("model.layers.") for m in modules)
    return modules


def _launch(mode: str, checkpoint: Path, selection: list[str], out: Path) -> tuple[dict, list[dict]]:
    """Run the worker on WORLD_SIZE ranks; the final full weights (rank 0 wrote them) and each rank's JSON."""
    out.mkdir(parents=True, exist_ok=True)
    sel_file = out / "selection.json"
    sel_file.write_text(json.dumps(selection), encoding="utf-8")
    ranks = run_workers(WORKER, [mode, checkpoint, sel_file], out, world=WORLD_SIZE, timeout_s=TIMEOUT_S)
    from safetensors.torch import load_file

    return load_file(str(out / "final.safetensors")), ranks


def _selected_params(initial: dict, selection: list[str]) -> set[str]:
    return {n for n in initial if any(n.startswith(m + ".") for m in selection)}


def _check_common(initial: dict, final: dict, ranks: list[dict], selection: list[str]) -> set[str]:
    """Weights, and the report's numbers against the unsharded checkpoint. Returns the selected names."""
    selected = _selected_params(initial, selection)
    assert len(selected) == len(selection)  # Llama projections have no bias
    assert set(final) == set(initial)
    assert {t.dtype for t in final.values()} == {torch.float32}
    frozen_moved = [n for n in initial if n not in selected and not torch.equal(final[n], initial[n])]
    assert frozen_moved == [], "frozen parameters changed"
    selected_unchanged = [n for n in sorted(selected) if torch.equal(final[n], initial[n])]
    assert selected_unchanged == [], "selected parameters did not train"
    want_trainable = sum(initial[n].numel() for n in selected)
    want_total = sum(t.numel() for t in initial.values())
    for info in ranks:
        assert info["world_size"] == WORLD_SIZE
        rep = info["report"]
        assert rep["unmatched"] == []
        assert {spectrum_fast.apply.canonical_name(n) for n in rep["trainable"]} == selected
        assert rep["trainable_params"] == want_trainable
        assert rep["total_params"] == want_total
        assert all(math.isfinite(x) and x > 0 for x in info["losses"])
    return selected


def _check_orig_param_optimizer(ranks: list[dict], selected: set[str]) -> None:
    """Optimizers over the original parameters (FSDP2, FSDP1 use_orig_params=True)."""
    def canon(names):
        return {spectrum_fast.apply.canonical_name(n) for n in names}

    have_state = set()
    for info in ranks:
        opt = info["optimizer"]
        assert canon(opt["requires_grad"]) == selected
        assert canon(opt["in_groups"]) == selected
        assert canon(opt["with_grad"]) <= selected, "a frozen parameter received a gradient"
        # state exactly for the trainable parameters this rank holds a (non-empty) piece of
        held = {n for n in opt["requires_grad"] if opt["local_numel"][n] > 0}
        assert set(opt["with_state"]) == held
        assert len(opt["with_state"]) == len(held)
        have_state |= canon(opt["with_state"])
    assert have_state == selected


def test_fsdp2_freeze_before_sharding(checkpoint, initial, selection, tmp_path):
    final, ranks = _launch("fsdp2-before", checkpoint, selection, tmp_path)
    selected = _check_common(initial, final, ranks, selection)
    assert all(info["params_are_dtensors"] for info in ranks)
    _check_orig_param_optimizer(ranks, selected)


def test_fsdp2_freeze_after_sharding(checkpoint, initial, selection, tmp_path):
    # freeze() sees DTensors here: the report's sizes must be the global ones
    final, ranks = _launch("fsdp2-after", checkpoint, selection, tmp_path)
    selected = _check_common(initial, final, ranks, selection)
    assert all(info["params_are_dtensors"] for info in ranks)
    _check_orig_param_optimizer(ranks, selected)


def test_fsdp1_use_orig_params(checkpoint, initial, selection, tmp_path):
    final, ranks = _launch("fsdp1-orig", checkpoint, selection, tmp_path)
    selected = _check_common(initial, final, ranks, selection)
    _check_orig_param_optimizer(ranks, selected)
    for info in ranks:
        # freeze() again on the wrapped model: same names, and full sizes although the live
        # parameters are views of this rank's shard
        again = info["report_after_wrap"]
        assert again["unmatched"] == []
        assert {spectrum_fast.apply.canonical_name(n) for n in again["trainable"]} == selected
        assert again["trainable_params"] == info["report"]["trainable_params"]
        assert again["total_params"] == info["report"]["total_params"]


def test_fsdp1_flat_params_with_auto_wrap_policy(checkpoint, initial, selection, tmp_path):
    final, ranks = _launch("fsdp1-flat", checkpoint, selection, tmp_path)
    selected = _check_common(initial, final, ranks, selection)
    for info in ranks:
        opt = info["optimizer"]
        flats = opt["flat_params"]
        # one unit per selected module, wholly trainable; everything else in frozen units
        trainable_units = [f for f in flats if f["requires_grad"]]
        assert sorted(fqn for f in trainable_units for fqn in f["fqns"]) == sorted(selected)
        assert all(len(f["fqns"]) == 1 for f in trainable_units)
        frozen_fqns = {fqn for f in flats if not f["requires_grad"] for fqn in f["fqns"]}
        assert frozen_fqns == set(initial) - selected
        assert len(opt["in_groups"]) == len(trainable_units) == len(opt["requires_grad"])
        assert set(opt["with_state"]) == set(opt["requires_grad"])
        assert set(opt["with_grad"]) <= set(opt["requires_grad"])
        assert "call freeze() before wrapping" in info["flat_error"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3(checkpoint, initial, selection, tmp_path):
    final, ranks = _launch("zero3", checkpoint, selection, tmp_path)
    selected = _check_common(initial, final, ranks, selection)  # report counted ds_numel
    want_trainable = sum(initial[n].numel() for n in selected)
    for info in ranks:
        opt = info["optimizer"]
        assert opt["partitioned"]
        # the live parameters are empty placeholders: the report could not have used p.numel()
        assert all(v == 0 for v in opt["local_numel"].values())
        assert set(opt["requires_grad"]) == selected
        assert sorted(n for g in opt["ds_groups"] for n in g) == sorted(selected)
        assert opt["ds_group_numel"] == want_trainable
        # the torch AdamW inside holds state for this rank's fp32 partition of the trainable parameters
        assert opt["inner_with_state"] >= 1 and opt["inner_state_numel"] == opt["fp32_partition_numel"] > 0
        assert opt["with_grad"] == []  # ZeRO-3 keeps gradients in its partitions, not in .grad
    # together the partitions cover the trainable parameters, up to padding (one element per tensor and rank)
    covered = sum(info["optimizer"]["fp32_partition_numel"] for info in ranks)
    assert want_trainable <= covered < want_trainable + WORLD_SIZE * len(selected)

"""param_groups(): learning rates that grow with SNR, checked against the formula written out here.

The expected learning rates come from float64 SNRs of the checkpoint (``ref_snr``) and numpy / scipy,
never from the package's own numbers; real optimizer steps show that every parameter moves by exactly
``-lr_of_its_group * grad``. The distributed cases run ``tests/distributed/lr_worker.py`` on 2 CPU
ranks (FSDP2, DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import spectrum_fast
from spectrum_fast import SpectrumError
from spectrum_fast.apply import canonical_name
from spectrum_fast.lr import param_groups

from .conftest import ref_snr
from .ranks import run_workers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

TOP = 0.75  # 3 of 4 layers per type: a real median
BASE_LR = 0.05


def llama(seed: int = 0, layers: int = 4):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   attention_bias=True, use_cache=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    # low-rank structure of varying strength: SNRs far apart, so ratios spread and some hit the clip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ".layers." in name:
                low_rank = torch.randn(p.shape[0], 6, generator=g) @ torch.randn(6, p.shape[1], generator=g)
                p.add_(float(torch.rand(1, generator=g)) ** 2 * 2.0 * low_rank / p.shape[1] ** 0.5)
    return model


def module_type(module: str) -> str:
    parts = module.split(".")
    i = next(i for i, x in enumerate(parts) if x.isdigit())
    return ".".join(parts[i + 1:])


def expected_ratios(snr: dict[str, float], trainable: set[str], scale: str, lo: float, hi: float) -> dict[str, float]:
    """The documented formula, independently: per type over the trainable modules, then clipped."""
    from scipy.stats import rankdata

    by_type: dict[str, list[str]] = {}
    for m in sorted(trainable):
        by_type.setdefault(module_type(m), []).append(m)
    out = {}
    for mods in by_type.values():
        v = np.array([snr[m] for m in mods])
        if scale == "snr":
            r = v / np.median(v)
        elif scale == "rank":
            r = lo * (hi / lo) ** ((rankdata(v) - 1) / (len(v) - 1)) if len(v) > 1 else np.ones(1)
        else:
            r = np.ones(len(v))
        out.update(zip(mods, np.clip(r, lo, hi)))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lr") / "llama"
    llama().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def result(checkpoint):
    return spectrum_fast.scan(checkpoint, progress=False)


@pytest.fixture(scope="module")
def ref(checkpoint) -> dict[str, float]:
    """float64 SNR of every scanned matrix, from the stored weights."""
    from safetensors.numpy import load_file

    weights = load_file(str(checkpoint / "model.safetensors"))
    return {n.removesuffix(".weight"): ref_snr(w) for n, w in weights.items()
            if w.ndim == 2 and ".layers." in n}


def frozen_model(result, **flags):
    model = llama()
    spectrum_fast.freeze(model, result, top=TOP, **flags)
    return model


def check_groups(model, groups, ref, *, scale="snr", lo=0.5, hi=2.0, weight_decay=0.0):
    """Every trainable parameter in exactly one group, with the formula's lr and the right decay."""
    trainable = {canonical_name(n).rsplit(".", 1)[0] for n, p in model.named_parameters()
                 if p.requires_grad and canonical_name(n).rsplit(".", 1)[0] in ref}
    want = expected_ratios(ref, trainable, scale, lo, hi)
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {canonical_name(n) for n, p in model.named_parameters() if p.requires_grad}
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            mod = name.rsplit(".", 1)[0]
            lr = BASE_LR * want[mod] if mod in want else BASE_LR
            assert g["lr"] == pytest.approx(lr, rel=1e-3), name  # ref_snr and the scan agree to 1e-4
            decay = 0.0 if name.endswith(".bias") or "norm" in name else weight_decay
            assert g["weight_decay"] == decay, name
            assert g["modules"] == [mod] or g["name"].startswith("other")
    return want


def test_snr_scaled_lrs_and_two_exact_sgd_steps(result, ref):
    model = frozen_model(result, train_lm_head=True, train_norms=True)
    groups = param_groups(model, result, base_lr=BASE_LR, top=TOP)
    want = check_groups(model, groups, ref)
    # the formula really spreads the learning rates here, clipping included
    assert min(want.values()) == 0.5 and max(want.values()) == 2.0
    assert len({round(r, 6) for r in want.values()}) > 10
    # one group per module (weight + bias share it: no decay split at weight_decay=0 ... except norms)
    by_name = {g["name"]: g for g in groups}
    assert {"other", "other (no decay)"} <= set(by_name)
    q = next(m for m in want if m.endswith("q_proj"))
    assert len(by_name[q]["params"]) == 1 and len(by_name[q + " (no decay)"]["params"]) == 1  # weight | bias
    assert by_name[q]["lr"] == by_name[q + " (no decay)"]["lr"]

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(groups, lr=123.0, momentum=0.0)  # the default lr must never be used
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        old = {n: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        for n, p in model.named_parameters():
            w, grad = old[n]
            if p.requires_grad:
                assert grad is not None and grad.abs().sum() > 0, n
                # the float32 update w - lr * grad with lr in float32, computed exactly in float64 and
                # rounded once (a fused multiply-add, as torch's kernel does): bit for bit
                lr32 = float(torch.tensor(lr_of[id(p)], dtype=torch.float32))
                assert torch.equal(p.detach(), (w.double() - lr32 * grad.double()).float()), n
            else:
                assert grad is None and torch.equal(p.detach(), before[n]), n


def test_rank_scale_and_none(result, ref):
    model = frozen_model(result)
    groups = param_groups(model, result, base_lr=BASE_LR, scale="rank", min_ratio=0.25, max_ratio=4.0)
    want = check_groups(model, groups, ref, scale="rank", lo=0.25, hi=4.0)
    assert sorted({round(r, 9) for r in want.values()}) == [0.25, 1.0, 4.0]  # 3 per type: low, mid, high
    groups = param_groups(model, result, base_lr=BASE_LR, scale="none")
    assert {g["lr"] for g in groups} == {BASE_LR}


def test_adamw_gets_the_groups_and_weight_decay(result, ref):
    model = frozen_model(result, train_embeddings=True)
    groups = param_groups(model, result, base_lr=BASE_LR, weight_decay=0.1)
    check_groups(model, groups, ref, weight_decay=0.1)
    opt = torch.optim.AdamW(groups, lr=123.0)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(g["lr"], g["weight_decay"]) for g in groups]
    ids = torch.randint(0, 128, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert {id(p) for p in opt.state} == {id(p) for p in model.parameters() if p.requires_grad}


def test_sources_and_wrapped_names(result, ref, checkpoint, tmp_path):
    model = frozen_model(result)
    want = [(g["name"], g["lr"]) for g in param_groups(model, result, base_lr=BASE_LR)]
    full, reference_file = result.save(tmp_path)
    for source in (full, reference_file, result.select(TOP), checkpoint, {r.module: r.snr for r in result.records}):
        assert [(g["name"], g["lr"]) for g in param_groups(model, source, base_lr=BASE_LR)] == want, source

    class Wrapper(torch.nn.Module):  # DDP / DeepSpeed engines put the model under "module."
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert [(g["name"], g["lr"]) for g in param_groups(Wrapper(model), result, base_lr=BASE_LR)] == want


def test_peft_adapters_take_their_module_lr(result, ref):
    peft = pytest.importorskip("peft")
    targets = [m for m in result.select(TOP).modules if m.endswith(("q_proj", "down_proj"))]
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=targets))
    groups = param_groups(pm, result, base_lr=BASE_LR)
    want = expected_ratios(ref, set(targets), "snr", 0.5, 2.0)
    names = {id(p): n for n, p in pm.named_parameters()}
    for g in groups:
        mod = g["modules"][0]
        assert all(".lora_" in names[id(p)] for p in g["params"])
        assert g["lr"] == pytest.approx(BASE_LR * want[mod], rel=1e-3)
    assert sum(len(g["params"]) for g in groups) == 2 * len(targets)  # lora_A, lora_B


def test_errors(result, tmp_path):
    model = frozen_model(result)
    with pytest.raises(SpectrumError, match="not result.select"):
        param_groups(model, result, base_lr=BASE_LR, top=0.5)
    with pytest.raises(SpectrumError, match="no trainable parameter belongs to a module of the scan"):
        param_groups(model, {"vit.layers.0.attention.q_proj": 1.0}, base_lr=BASE_LR)
    yaml_file = result.select(TOP).save_yaml(tmp_path)
    with pytest.raises(SpectrumError, match="holds no SNRs"):
        param_groups(model, yaml_file, base_lr=BASE_LR)
    with pytest.raises(SpectrumError, match="scale must be"):
        param_groups(model, result, base_lr=BASE_LR, scale="log")
    with pytest.raises(SpectrumError, match="min_ratio"):
        param_groups(model, result, base_lr=BASE_LR, min_ratio=0.0)
    with pytest.raises(SpectrumError, match="base_lr"):
        param_groups(model, result, base_lr=-1.0)


def test_lr_ratios_edge_cases():
    from spectrum_fast.lr import lr_ratios

    snr = {"a": 1.0, "b": 2.0, "c": 4.0, "d": math.nan, "e": 3.0}
    group = {"a": "t", "b": "t", "c": "t", "d": "t", "e": "u"}
    # median of t is 2; NaN takes no part and gets 1; a group of one is its own median
    assert lr_ratios(snr, group) == {"a": 0.5, "b": 1.0, "c": 2.0, "d": 1.0, "e": 1.0}
    assert lr_ratios(snr, group, scale="rank", min_ratio=0.25, max_ratio=4.0) == {
        "a": 0.25, "b": 1.0, "c": 4.0, "d": 1.0, "e": 1.0}
    tied = lr_ratios({"a": 1.0, "b": 1.0, "c": 5.0}, dict.fromkeys("abc", "t"), scale="rank")
    assert tied["a"] == tied["b"] == pytest.approx(0.5 * 4 ** 0.25) and tied["c"] == 2.0  # mean rank 0.5
    # noise-free matrices (snr inf) and a zero median still give finite, clipped ratios
    assert lr_ratios({"a": math.inf, "b": math.inf, "c": 1.0}, dict.fromkeys("abc", "t")) == {
        "a": 2.0, "b": 2.0, "c": 0.5}
    assert lr_ratios({"a": 0.0, "b": 0.0, "c": 1.0}, dict.fromkeys("abc", "t")) == {"a": 1.0, "b": 1.0, "c": 2.0}


# -- 2 CPU ranks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist_inputs(tmp_path_factory, checkpoint, result) -> list[str]:
    d = tmp_path_factory.mktemp("lr-dist")
    full, _ = result.save(d)
    sel = d / "selection.json"
    sel.write_text(json.dumps(result.select(0.5).modules), encoding="utf-8")
    return [str(checkpoint), str(full), str(sel)]


def _check_dist_groups(ranks: list[dict], ref: dict[str, float], selected: set[str], weight_decay: float) -> None:
    want = expected_ratios(ref, selected, "snr", 0.5, 2.0)
    assert ranks[0]["groups"] == ranks[1]["groups"]  # the same groups, in the same order, on every rank
    for g in ranks[0]["groups"]:
        assert g["modules"] and g["modules"][0] in selected
        assert all(p.startswith(g["modules"][0] + ".") for p in g["params"])
        assert g["lr"] == pytest.approx(0.05 * want[g["modules"][0]], rel=1e-3)
        assert g["weight_decay"] == (0.0 if g["name"].endswith("(no decay)") else weight_decay)
    assert sorted(p for g in ranks[0]["groups"] for p in g["params"]) == sorted(
        f"{m}.{leaf}" for m in selected for leaf in (("weight", "bias") if "self_attn" in m else ("weight",)))
    for info in ranks:  # scan_live on the sharded weights, against float64 SNRs of the checkpoint
        assert info["world_size"] == 2
        assert set(info["live_snr"]) == set(ref)
        assert all(abs(info["live_snr"][m] - ref[m]) <= 1e-4 * abs(ref[m]) for m in ref)


@pytest.mark.slow
def test_fsdp2_two_ranks(dist_inputs, result, ref, tmp_path):
    ranks = run_workers("lr_worker.py", ["fsdp2", *dist_inputs], tmp_path)
    selected = set(result.select(0.5).modules)
    _check_dist_groups(ranks, ref, selected, 0.0)
    for info in ranks:
        assert info["dtensors"]
        # each local shard moved by exactly -lr * grad; frozen shards not at all
        assert max(info["update_errors"].values()) == 0.0
    assert sum(info["moved"] for info in ranks) >= len(selected)


@pytest.mark.slow
def test_zero3_two_ranks(dist_inputs, result, ref, tmp_path):
    ranks = run_workers("lr_worker.py", ["zero3", *dist_inputs], tmp_path)
    selected = set(result.select(0.5).modules)
    _check_dist_groups(ranks, ref, selected, 0.1)
    for info in ranks:
        assert info["local_numel"] == [0]  # partitioned placeholders: param.shape was no help
        # DeepSpeed kept our groups, in order, and the torch AdamW inside steps with their lr / decay
        assert info["inner_groups"] == len(info["groups"])
        assert [(g["params"], g["lr"], g["weight_decay"]) for g in info["ds_groups"]] == [
            (g["params"], g["lr"], g["weight_decay"]) for g in info["groups"]]
        assert info["inner_states"] == len(info["groups"])
        assert math.isfinite(info["loss"])
        assert all(e is not None and "does not support DeepSpeed ZeRO-3" in e for e in info["retarget_errors"])

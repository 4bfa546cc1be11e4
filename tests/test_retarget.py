"""scan_live() and retarget(): rescanning live weights, moving the selection, fixing up the optimizer.

The selection a retarget must reach is computed here independently (float64 ``ref_snr`` of the live
weights, ``ref_select``); weights are changed between scans so that the selection really moves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import spectrum_fast
from spectrum_fast import SpectrumError
from spectrum_fast.apply import canonical_name
from spectrum_fast.lr import param_groups
from spectrum_fast.retarget import RetargetReport, retarget, scan_live

from .conftest import ref_select, ref_snr
from .ranks import run_workers
from .test_param_groups import expected_ratios, llama, module_type

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOP = 0.5
LR = 0.01
BOOSTED_TYPES = ("mlp.down_proj", "mlp.up_proj", "self_attn.o_proj")


def boost(w: torch.Tensor, k: int = 8) -> torch.Tensor:
    """Shrink the bulk, add k equal strong directions: the SNR rises several-fold."""
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(w.shape[0], k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(w.shape[1], k, generator=g))
    return 0.2 * w + torch.linalg.matrix_norm(w, 2) * u @ v.T


def live_ref(model) -> dict[str, float]:
    """float64 SNR of every matrix in the model's blocks, by canonical module name."""
    return {canonical_name(n).removesuffix(".weight"): ref_snr(p.detach().double().numpy())
            for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n}


def boost_frozen(model) -> list[str]:
    """Raise the SNR of the frozen module of each BOOSTED_TYPES type; returns them."""
    out = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            mod = n.removesuffix(".weight")
            if not p.requires_grad and n.endswith(".weight") and ".layers." in n and module_type(mod) in BOOSTED_TYPES:
                p.copy_(boost(p))
                out.append(mod)
    return out


def train_step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def types_of(ref: dict[str, float]) -> dict[str, str]:
    return {m: module_type(m) for m in ref}


def test_scan_live_matches_float64_reference():
    model = llama(layers=2)
    ref = live_ref(model)
    res = scan_live(model)
    assert [r.module for r in res.records] == list(ref)  # the model's order
    for r in res.records:
        assert r.status == "ok" and r.type == module_type(r.module) and r.dtype == "F32"
        assert abs(r.snr - ref[r.module]) <= 1e-4 * abs(ref[r.module]), r.module
    assert res.head_names == ["lm_head.weight"] and res.embedding_names == ["model.embed_tokens.weight"]
    assert res.origin == "live" and res.settings["live"] is True

    class Wrapper(torch.nn.Module):  # "module." as DDP / DeepSpeed add it: canonical names come out
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    mlp = scan_live(Wrapper(model), types=["mlp.*"])
    assert [r.module for r in mlp.records] == [m for m in ref if ".mlp." in m]
    assert mlp.snr == {m: res.snr[m] for m in mlp.snr}


def test_scan_live_degenerate_matrix_is_never_selected():
    model = llama(layers=2)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    with pytest.warns(spectrum_fast.DegenerateMatrixWarning, match="model.layers.0.mlp.up_proj.weight"):
        res = scan_live(model, types=["mlp.up_proj"])
    assert res["model.layers.0.mlp.up_proj"].status == "zero"
    assert res.select(1.0).modules == ["model.layers.1.mlp.up_proj"]


def test_retarget_param_groups_optimizer():
    model = llama(layers=2)
    first = scan_live(model)
    spectrum_fast.freeze(model, first, top=TOP)
    opt = torch.optim.AdamW(param_groups(model, first, base_lr=LR, weight_decay=0.1), lr=123.0)
    n_groups = len(opt.param_groups)
    for s in range(2):
        train_step(model, opt, s)
    old = set(first.select(TOP).modules)
    boosted = boost_frozen(model)
    ref = live_ref(model)
    new = ref_select(ref, types_of(ref), TOP)
    # the boosted modules enter (training itself may swap near-tied others too); some modules stay
    assert len(boosted) == len(BOOSTED_TYPES) and set(boosted) <= new - old and old & new
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    kept = {p: (s, dict(s), {k: v.clone() for k, v in s.items()}) for p, s in opt.state.items()}
    before = {n: p.detach().clone() for n, p in params.items()}

    report = retarget(model, opt, top=TOP)

    assert isinstance(report, RetargetReport) and report.changed
    assert set(report.selected) == new
    assert set(report.entered) == new - old and set(report.left) == old - new
    assert set(report.stayed) == old & new
    assert report.groups_added == 0 and len(opt.param_groups) == n_groups  # freed groups were reused
    assert {n for n, p in params.items() if p.requires_grad} == {m + s for m in new for s in (".weight", ".bias")
                                                                 if m + s in params}
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in params.items():
        mod = name.rsplit(".", 1)[0]
        if mod in old & new:  # stayer: the same state dict, the same tensors, unchanged
            state, tensors, values = kept[p]
            assert opt.state[p] is state and opt.state[p].keys() == tensors.keys()
            assert all(opt.state[p][k] is v and torch.equal(v, values[k]) for k, v in tensors.items())
        elif mod in old - new:  # leaver: state freed, out of the groups, no gradient
            assert p not in opt.state and id(p) not in in_groups and p.grad is None
        elif mod in new - old:
            assert p not in opt.state and id(p) in in_groups
    assert report.freed_states == sum(1 for p in kept if canonical_name(
        next(n for n, q in model.named_parameters() if q is p)).rsplit(".", 1)[0] in old - new)
    # every module's lr follows the formula over the new trainable set (float64 SNRs here)
    want = expected_ratios(ref, new, "snr", 0.5, 2.0)
    names = {id(p): n for n, p in params.items()}
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["lr"] == pytest.approx(LR * want[names[id(p)].rsplit(".", 1)[0]], rel=1e-3)
    assert report.lr == {m: pytest.approx(LR * want[m], rel=1e-3) for m in new}

    train_step(model, opt, 9)
    for name, p in params.items():
        mod = name.rsplit(".", 1)[0]
        if mod in new - old:  # newcomers trained, from fresh state
            assert int(opt.state[p]["step"]) == 1 and not torch.equal(p.detach(), before[name]), name
        elif mod in old & new:
            assert int(opt.state[p]["step"]) == 3
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_retarget_plain_optimizer_keeps_groups_and_scheduler():
    model = llama(layers=2)
    first = scan_live(model)
    spectrum_fast.freeze(model, first, top=TOP)
    # as transformers' Trainer builds it: decay and no-decay groups, a LambdaLR over them
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in trainable if not n.endswith("bias")], "weight_decay": 0.1},
                             {"params": [p for n, p in trainable if n.endswith("bias")], "weight_decay": 0.0}], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    train_step(model, opt, 0)
    sched.step()
    boosted = boost_frozen(model)
    ref = live_ref(model)
    new, old = ref_select(ref, types_of(ref), TOP), set(first.select(TOP).modules)
    report = retarget(model, opt, top=TOP, scheduler=sched)
    assert set(report.entered) == new - old and set(boosted) <= new - old
    assert len(opt.param_groups) == 2 and report.groups_added == 0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in opt.param_groups[0]["params"]) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias"))
    assert sorted(names[id(p)] for p in opt.param_groups[1]["params"]) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert [g["lr"] for g in opt.param_groups] == [LR / 2, LR / 2] and sched.base_lrs == [LR, LR]
    train_step(model, opt, 1)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([LR / 3, LR / 3])


def test_retarget_growing_selection_adds_groups_and_fixes_scheduler():
    model = llama(layers=2)
    first = scan_live(model)
    spectrum_fast.freeze(model, first, top=TOP)
    opt = torch.optim.AdamW(param_groups(model, first, base_lr=LR), lr=123.0)
    n_groups = len(opt.param_groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    train_step(model, opt, 0)
    sched.step()  # every lr halved
    report = retarget(model, opt, top=1.0, scheduler=sched)
    ref = live_ref(model)
    assert set(report.selected) == set(ref) and report.left == []
    assert report.groups_added == len(opt.param_groups) - n_groups > 0
    want = expected_ratios(ref, set(ref), "snr", 0.5, 2.0)
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    assert len(sched.base_lrs) == len(sched.lr_lambdas) == len(opt.param_groups)
    for g, base in zip(opt.param_groups, sched.base_lrs):
        mod = names[id(g["params"][0])].rsplit(".", 1)[0]
        assert g["lr"] == pytest.approx(LR * want[mod] / 2, rel=1e-3)  # the scheduler's factor is kept
        assert base == g["initial_lr"] == pytest.approx(LR * want[mod], rel=1e-3)
    train_step(model, opt, 1)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b / 4 for b in sched.base_lrs])


def test_retarget_refuses_what_it_cannot_move():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(llama(layers=2), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=LR)
    with pytest.raises(SpectrumError, match="LoRA adapters"):
        retarget(pm, opt)
    model = llama(layers=2)
    with pytest.raises(SpectrumError, match=r"top must be a fraction in \(0, 1\]"):
        retarget(model, torch.optim.SGD(model.parameters(), lr=LR), top=50)


def test_callback_needs_a_schedule():
    from spectrum_fast.retarget import SpectrumRetargetCallback

    with pytest.raises(SpectrumError, match="exactly one of"):
        SpectrumRetargetCallback()
    with pytest.raises(SpectrumError, match="positive integer"):
        SpectrumRetargetCallback(every_n_steps=0)


class _Boost(transformers.TrainerCallback):
    """Before the retarget at the end of epoch 1: raise the SNR of some frozen modules, remember weights."""

    def __init__(self):
        self.boosted: list[str] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.expected: set[str] = set()

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if round(state.epoch) == 1:
            self.boosted = boost_frozen(model)
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            ref = live_ref(model)
            self.expected = ref_select(ref, types_of(ref), TOP)


def test_trainer_callback_two_epochs(tmp_path: Path):
    from spectrum_fast.retarget import SpectrumRetargetCallback

    model = llama(layers=2)
    first = scan_live(model)
    spectrum_fast.freeze(model, first, top=TOP)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (8, 12), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    boost_cb, spectrum_cb = _Boost(), SpectrumRetargetCallback(every_n_epochs=1, top=TOP)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[boost_cb, spectrum_cb])
    trainer.train()

    assert len(spectrum_cb.reports) == 1  # after epoch 1; not after the last one
    report = spectrum_cb.reports[0]
    old, new = set(first.select(TOP).modules), boost_cb.expected
    assert set(report.selected) == new and set(report.entered) == new - old and set(report.left) == old - new
    assert set(boost_cb.boosted) <= new - old
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in new}
    after = boost_cb.weights
    for n, p in model.named_parameters():  # epoch 2 trained the new selection and nothing else
        assert torch.equal(p.detach(), after[n]) != (n.rsplit(".", 1)[0] in new), n
    opt = trainer.optimizer
    with_state = {id(p) for p, s in opt.state.items() if s}
    assert with_state == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.slow
def test_fsdp2_two_ranks(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path_factory.mktemp("retarget") / "llama"
    llama(layers=2).save_pretrained(ckpt, safe_serialization=True)
    ranks = run_workers("retarget_worker.py", [str(ckpt)], tmp_path)
    before = load_file(str(tmp_path / "before.safetensors"))
    final = load_file(str(tmp_path / "final.safetensors"))
    ref = {n.removesuffix(".weight"): ref_snr(w.double().numpy()) for n, w in before.items()
           if w.ndim == 2 and ".layers." in n}
    new = ref_select(ref, types_of(ref), TOP)
    r0, r1 = ranks
    for key in ("first_selection", "boosted", "selected", "entered", "left", "stayed", "lr", "requires_grad",
                "in_groups", "live_snr"):
        assert r0[key] == r1[key], key  # every rank reached the same new selection
    old = set(r0["first_selection"])
    assert set(r0["selected"]) == new and set(r0["entered"]) == new - old
    assert set(r0["boosted"]) <= new - old and old & new
    assert set(r0["left"]) == old - new and set(r0["stayed"]) == old & new
    assert all(abs(r0["live_snr"][m] - ref[m]) <= 1e-4 * abs(ref[m]) for m in ref)
    want = expected_ratios(ref, new, "snr", 0.5, 2.0)
    assert r0["lr"] == {m: pytest.approx(LR * want[m], rel=1e-3) for m in new}
    trainable = {m + ".weight" for m in new} | {m + ".bias" for m in new if m + ".bias" in before}
    for info in ranks:
        assert info["world_size"] == 2 and info["stayers_kept"]
        assert set(info["requires_grad"]) == set(info["in_groups"]) == trainable
        assert not any(n.rsplit(".", 1)[0] in old - new for n in info["with_state_after_retarget"])
        # newcomers stepped once from fresh state, stayers carry on
        assert {n: s for n, s in info["steps_after"].items() if n.rsplit(".", 1)[0] in new - old} == {
            n: 1 for n in trainable if n.rsplit(".", 1)[0] in new - old}
        assert all(s == 3 for n, s in info["steps_after"].items() if n.rsplit(".", 1)[0] in old & new)
    for n in before:
        moved = not torch.equal(final[n], before[n])
        assert moved == (n in trainable), n

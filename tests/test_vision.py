"""Scan and freeze on vision checkpoints: a ViT and a two-tower CLIP, built with transformers.

Every SNR is checked against the float64 reference of the stored weights. Two findings are pinned here:

* transformers 5 renames ViT's modules when it builds or loads the model
  (``vit.encoder.layer.0.attention.attention.query`` in the file is ``vit.layers.0.attention.q_proj`` live);
  ``freeze`` and ``param_groups`` translate a checkpoint's selection with transformers' own mapping.
* CLIP's towers share module types under SPEC.md §2 (``text_model.encoder.layers.0.self_attn.q_proj`` and
  ``vision_model.encoder.layers.0.self_attn.q_proj`` are both ``self_attn.q_proj``), so the reference rule
  ranks both towers together; a per-tower selection is built here from two filtered results.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import spectrum_fast
from spectrum_fast import ScanResult, SpectrumError
from spectrum_fast.retarget import scan_live

from .conftest import ref_select, ref_snr

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

TOP = 0.5
VIT_TYPES = {"attention.attention.query", "attention.attention.key", "attention.attention.value",
             "attention.output.dense", "intermediate.dense", "output.dense"}
CLIP_TYPES = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"}


def stored(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def after_index(module: str) -> str:
    """SPEC.md §2 module type, written out: the name after its first numeric component."""
    parts = module.split(".")
    i = next(i for i, x in enumerate(parts) if x.isdigit())
    return ".".join(parts[i + 1:])


def check_against_reference(result: ScanResult, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every 2-D block weight scanned, with the float64 SNR; returns the reference SNRs."""
    ref = {n.removesuffix(".weight"): ref_snr(w.double().numpy()) for n, w in weights.items()
           if w.ndim == 2 and n.endswith(".weight") and any(x.isdigit() for x in n.split("."))}
    assert {r.module for r in result.records} == set(ref)
    for r in result.records:
        assert r.status == "ok" and r.type == after_index(r.module)
        assert abs(r.snr - ref[r.module]) <= 1e-4 * abs(ref[r.module]), r.module
    return ref


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- ViT -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(path, safe_serialization=True)
    return path


def test_vit_scan(vit_dir):
    result = spectrum_fast.scan(vit_dir, progress=False)
    ref = check_against_reference(result, stored(vit_dir))
    assert {r.type for r in result.records} == VIT_TYPES
    assert all(r.module.startswith("vit.encoder.layer.") for r in result.records)
    sel = result.select(TOP)
    assert set(sel.modules) == ref_select(ref, {m: after_index(m) for m in ref}, TOP)
    assert sel.group_sizes == {t: 2 for t in VIT_TYPES}


def test_vit_freeze_live(vit_dir):
    """A selection from the checkpoint applies to the live model although transformers 5 renames ViT's
    modules on load: freeze() translates the names with transformers' own mapping."""
    result = spectrum_fast.scan(vit_dir, progress=False)
    model = transformers.ViTForImageClassification.from_pretrained(vit_dir)
    weights = stored(vit_dir)
    params = dict(model.named_parameters())
    file_name = {}  # live module -> stored module, by identical weights (random, so unique)
    for name, p in params.items():
        if p.ndim == 2 and ".weight" in name and name.removesuffix(".weight") != "classifier":
            match = [n for n, t in weights.items() if t.shape == p.shape and torch.equal(t, p.detach())]
            if len(match) == 1 and match[0].startswith("vit.encoder."):
                file_name[name.removesuffix(".weight")] = match[0].removesuffix(".weight")
    selected = set(result.select(TOP).modules)
    report = spectrum_fast.freeze(model, result, top=TOP)
    assert report.unmatched == []
    want = {n for n in params if n.rsplit(".", 1)[0] in file_name and file_name[n.rsplit(".", 1)[0]] in selected}
    assert trainable(model) == want and len(want) == 2 * len(selected)  # weight and bias of each
    out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable(model)

    # SNR learning rates resolve the same way
    from spectrum_fast.lr import param_groups

    groups = param_groups(model, result, base_lr=1e-3, top=TOP)
    by_module = {g["modules"][0]: g for g in groups if g["modules"] and not g["no_decay"]}
    assert {file_name[m] for m in by_module} == selected
    for live, g in by_module.items():
        assert g["snr"] == result[file_name[live]].snr

    # scan_live names the same matrices as the live model does, with the same SNRs
    live = scan_live(model)
    for r in live.records:
        assert r.snr == pytest.approx(result[file_name[r.module]].snr, rel=1e-4)


# -- CLIP ----------------------------------------------------------------------------------------


def clip_model():
    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                       pad_token_id=1)
    vision = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                          projection_dim=16))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip"
    clip_model().save_pretrained(path, safe_serialization=True)
    return path


def tower(module: str) -> str:
    return module.split(".", 1)[0]


def clip_step(model) -> None:
    out = model(input_ids=torch.randint(2, 100, (2, 8)), pixel_values=torch.randn(2, 3, 32, 32), return_loss=True)
    out.loss.backward()


def test_clip_scan_merges_the_towers_types(clip_dir):
    result = spectrum_fast.scan(clip_dir, progress=False)
    ref = check_against_reference(result, stored(clip_dir))
    assert {r.type for r in result.records} == CLIP_TYPES
    assert {tower(r.module) for r in result.records} == {"text_model", "vision_model"}
    # SPEC.md §2 as written: both towers in one group per type (2 layers x 2 towers), ranked together
    sel = result.select(TOP)
    assert sel.group_sizes == {t: 4 for t in CLIP_TYPES}
    assert set(sel.modules) == ref_select(ref, {m: after_index(m) for m in ref}, TOP)
    # the shapes differ between towers (32 vs 48 wide): one ranking compares unlike matrices
    assert {result[m].shape for m in ref if m.endswith("q_proj")} == {(32, 32), (48, 48)}


def test_separate_stacks_change_nothing_for_one_stack(vit_dir):
    result = spectrum_fast.scan(vit_dir, progress=False)
    merged, separate = result.select(TOP), result.select(TOP, stacks="separate")
    assert merged.modules == separate.modules and merged.group_sizes == separate.group_sizes
    with pytest.raises(SpectrumError, match="stacks must be one of merged, separate"):
        result.select(TOP, stacks="towers")


def test_clip_freeze_live_merged_and_per_tower(clip_dir):
    result = spectrum_fast.scan(clip_dir, progress=False)
    ref = {r.module: ref_snr(w.double().numpy()) for r in result.records
           for w in [stored(clip_dir)[r.module + ".weight"]]}
    model = transformers.CLIPModel.from_pretrained(clip_dir)
    names = {n for n, _ in model.named_parameters()}

    rep = spectrum_fast.freeze(model, result, top=TOP)  # CLIP's live names are the stored ones
    assert rep.unmatched == []
    merged = set(result.select(TOP).modules)
    assert trainable(model) == {n for n in names if n.rsplit(".", 1)[0] in merged}

    # stacks="separate": each tower ranked on its own, against the reference rule applied per tower
    per_tower = set()
    for t in ("text_model", "vision_model"):
        mods = {m: after_index(m) for m in ref if tower(m) == t}
        per_tower |= ref_select({m: ref[m] for m in mods}, mods, TOP)
    sel = result.select(TOP, stacks="separate")
    assert set(sel.modules) == per_tower
    assert set(sel.group_sizes) == {f"{t}.encoder.layers:{ty}" for t in ("text_model", "vision_model")
                                    for ty in CLIP_TYPES}
    assert all(sum(tower(m) == t and after_index(m) == ty for m in per_tower) == 1
               for t in ("text_model", "vision_model") for ty in CLIP_TYPES)  # one per type and tower
    rep = spectrum_fast.freeze(model, result, top=TOP, stacks="separate")
    assert rep.unmatched == []
    assert trainable(model) == {n for n in names if n.rsplit(".", 1)[0] in per_tower}
    clip_step(model)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable(model)

    # the live scan agrees with the checkpoint scan, name for name
    live = scan_live(model)
    assert {r.module for r in live.records} == {r.module for r in result.records}
    assert all(abs(live[m].snr - ref[m]) <= 1e-4 * abs(ref[m]) for m in ref)


def test_cli_freeze_with_separate_stacks(clip_dir, tmp_path):
    from spectrum_fast.cli import freeze_main

    out = tmp_path / "out"
    assert freeze_main([str(clip_dir), "--top", str(TOP), "--stacks", "separate", "--out", str(out), "-q"]) == 0
    (yaml_file,) = out.glob("*_unfrozenparameters_50percent.yaml")
    text = yaml_file.read_text()
    assert "# text_model.encoder.layers:self_attn.q_proj layers" in text
    assert "# vision_model.encoder.layers:self_attn.q_proj layers" in text
    entries = [line[2:] for line in text.splitlines() if line.startswith("- ") and not line.startswith("- ^")]
    result = spectrum_fast.scan(clip_dir, progress=False)
    assert sorted(entries) == sorted(result.select(TOP, stacks="separate").modules)

"""Applying a selection to live models (SPEC.md §5): plain, transformers, PEFT, wrapped names, sources."""

from __future__ import annotations

import pytest

import spectrum_fast
from spectrum_fast import SpectrumError
from spectrum_fast.apply import canonical_name

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SELECTED = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]


def _llama(seed: int = 0):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _train_two_steps(model, trainable_only=True):
    params = [p for p in model.parameters() if p.requires_grad] if trainable_only else list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _assert_trained_exactly(model, before, selected_prefixes, opt):
    for name, p in model.named_parameters():
        canon = canonical_name(name)
        chosen = any(canon.startswith(s + ".") for s in selected_prefixes)
        assert p.requires_grad == chosen, name
        if chosen:
            assert not torch.equal(p.detach(), before[name]), f"{name} did not train"
        else:
            assert torch.equal(p.detach(), before[name]), f"{name} changed although frozen"
    with_state = {id(p) for p in opt.state}
    assert with_state == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """A real scan of the test Llama's checkpoint, and its top-half selection."""
    path = tmp_path_factory.mktemp("llama")
    _llama().save_pretrained(path, safe_serialization=True)
    result = spectrum_fast.scan(path, progress=False)
    return result, result.select(0.5).modules


def test_plain_transformers_model_trains_scan_selection(scanned):
    result, selected = scanned
    assert len(selected) == 7  # floor(2 * 0.5) of each of the 7 projection types
    model = _llama()
    rep = spectrum_fast.freeze(model, result, top=0.5)
    sizes = dict(model.named_parameters())
    assert rep.trainable_params == sum(sizes[s + ".weight"].numel() for s in selected)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _train_two_steps(model)
    _assert_trained_exactly(model, before, selected, opt)


def test_report_counts_and_types():
    model = _llama()
    rep = spectrum_fast.freeze(model, SELECTED)
    assert rep.unmatched == []
    sizes = dict(model.named_parameters())
    expect = sum(sizes[s + ".weight"].numel() for s in SELECTED)
    assert rep.trainable_params == expect
    assert rep.total_params == sum(p.numel() for p in model.parameters())
    assert rep.per_type == {"mlp.down_proj": sizes[SELECTED[0] + ".weight"].numel(),
                            "self_attn.q_proj": sizes[SELECTED[1] + ".weight"].numel(),
                            "mlp.up_proj": sizes[SELECTED[2] + ".weight"].numel()}


def test_plain_module_without_transformers():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    rep = spectrum_fast.freeze(net, ["2"])
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["2.weight", "2.bias"]
    assert rep.trainable_params == 18


def test_embeddings_head_norms_flags():
    model = _llama()
    spectrum_fast.freeze(model, SELECTED, train_embeddings=True, train_lm_head=True, train_norms=True)
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"} <= on
    assert "model.layers.0.self_attn.q_proj.weight" not in on


def test_yaml_regex_lines_and_result_sources(tmp_path):
    model = _llama()
    path = tmp_path / "ckpt"
    model.save_pretrained(path, safe_serialization=True)
    result = spectrum_fast.scan(path, progress=False)
    sel = result.select(0.5)
    yaml_path = sel.save_yaml(tmp_path / "out")
    for source in (yaml_path, result, sel, result.save(tmp_path / "out")[0], result.save(tmp_path / "o2")[1], path):
        rep = spectrum_fast.freeze(model, source, top=0.5)
        on = {n for n, p in model.named_parameters() if p.requires_grad}
        expect = {m + ".weight" for m in sel.modules}
        if source == yaml_path:
            expect |= {"lm_head.weight", "model.embed_tokens.weight"}  # the ^...$ lines
        assert on == expect, source
        assert rep.unmatched == []


def test_strict_names_the_unmatched_entry():
    model = _llama()
    with pytest.raises(SpectrumError, match=r"1 selection entries match no parameter.*model\.layers\.7\.mlp\.up_proj"):
        spectrum_fast.freeze(model, SELECTED + ["model.layers.7.mlp.up_proj"])
    rep = spectrum_fast.freeze(model, SELECTED + ["model.layers.7.mlp.up_proj"], strict=False)
    assert rep.unmatched == ["model.layers.7.mlp.up_proj"]


def test_axolotl_style_entries_and_nesting():
    model = _llama()
    rep = spectrum_fast.freeze(model, ["model.layers.1.mlp.*", "model.layers.0.mlp.down_proj.weight",
                                       "model.layers.0.self_attn", "model.layers.0.self_attn.q_proj"])
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert on == {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                  "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight",
                  "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                  "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"}
    assert rep.unmatched == []  # nested entries all count as matched


def test_peft_modules_to_save_head():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    rep = spectrum_fast.freeze(pm, ["^lm_head.weight$", SELECTED[0]])
    on = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert on == {"base_model.model.lm_head.modules_to_save.default.weight",
                  "base_model.model." + SELECTED[0] + ".weight"}
    assert rep.unmatched == []
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "original_module" in n)


def test_prefix_does_not_leak_to_other_layers():
    # "model.layers.1.mlp.up_proj" must not unfreeze "model.layers.11..." (component-wise match)
    net = torch.nn.Module()
    net.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(12)])
    spectrum_fast.freeze(net, ["layers.1"])
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["layers.1.weight", "layers.1.bias"]


@pytest.mark.parametrize("wrapped", [
    "module.model.layers.0.mlp.down_proj.weight",
    "_orig_mod.model.layers.0.mlp.down_proj.weight",
    "model.layers.0._checkpoint_wrapped_module.mlp.down_proj.weight",
    "_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp.down_proj.weight",
    "base_model.model.model.layers.0.mlp.down_proj.base_layer.weight",
    "module.base_model.model.model.layers.0.mlp.down_proj.weight",
])
def test_wrapper_names_resolve(wrapped):
    assert canonical_name(wrapped) == "model.layers.0.mlp.down_proj.weight"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_ddp_style_and_compiled_wrappers():
    model = _llama()

    class Wrapper(torch.nn.Module):  # what DDP / DeepSpeed's engine look like from named_parameters
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    wrapped = Wrapper(model)
    rep = spectrum_fast.freeze(wrapped, SELECTED)
    assert sorted(rep.trainable) == sorted("module." + s + ".weight" for s in SELECTED)
    compiled = torch.compile(model)  # parameters appear under _orig_mod.
    rep = spectrum_fast.freeze(compiled, SELECTED)
    assert len(rep.trainable) == 3 and all(n.startswith("_orig_mod.") for n in rep.trainable)


def test_peft_lora_model(scanned):
    peft = pytest.importorskip("peft")
    result, selected = scanned
    model = _llama()
    targets = spectrum_fast.lora_target_modules(result, top=0.5)
    assert targets == selected
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    pm = peft.get_peft_model(model, config)
    lora_modules = {n.split(".lora_A")[0] for n, _ in pm.named_parameters() if ".lora_A." in n}
    assert {canonical_name(m) for m in lora_modules} == set(selected)  # LoRA exactly on the selection
    # Spectrum + LoRA: the selected base weights and their adapters train, all else is frozen
    rep = spectrum_fast.freeze(pm, result, top=0.5)
    assert rep.unmatched == []
    on = {canonical_name(n) for n, p in pm.named_parameters() if p.requires_grad}
    assert {s + ".weight" for s in selected} <= on
    assert all(any(n.startswith(s + ".") for s in selected) for n in on)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = _train_two_steps(pm)
    _assert_trained_exactly(pm, before, selected, opt)


def _checkpointed_llama():
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    # transformers 5 hooks the embeddings itself when checkpointing is switched on; earlier versions
    # (and models trained through other entry points) do not: undo it to test the case that fails
    model.disable_input_require_grads()
    model.train()
    return model


def test_gradient_checkpointing_with_frozen_embeddings():
    model = _checkpointed_llama()
    rep = spectrum_fast.freeze(model, SELECTED)
    assert rep.input_require_grads
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _train_two_steps(model)
    _assert_trained_exactly(model, before, SELECTED, opt)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.utils.checkpoint: "None of the inputs have requires_grad"
def test_gradient_checkpointing_fails_without_the_fix(monkeypatch):
    """The control for the test above: the error it prevents is real."""
    model = _checkpointed_llama()
    monkeypatch.setattr(model, "enable_input_require_grads", lambda: None)
    spectrum_fast.freeze(model, SELECTED)
    with pytest.raises(RuntimeError, match="does not require grad"):
        _train_two_steps(model)


def test_fused_experts_get_a_clear_error():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 8, 16))

    net = torch.nn.Module()
    net.model = torch.nn.Module()
    net.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    net.model.layers[0].mlp = torch.nn.Module()
    net.model.layers[0].mlp.experts = Experts()
    with pytest.raises(SpectrumError, match=r"fused in 3-D parameters such as 'model\.layers\.0\.mlp\.experts\.gate_up_proj'"):
        spectrum_fast.freeze(net, ["model.layers.0.mlp.experts.3.gate_proj"])


def test_real_fused_moe_model_from_its_scan(tmp_path):
    """transformers 5 loads Mixtral experts fused (3-D) although the checkpoint stores them per expert."""
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                     num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("this transformers version keeps Mixtral experts as separate 2-D weights")
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    result = spectrum_fast.scan(tmp_path / "m", progress=False)
    with pytest.raises(SpectrumError, match="fused in 3-D parameters"):
        spectrum_fast.freeze(model, result)
    attn = spectrum_fast.scan(tmp_path / "m", types=["self_attn.*"], progress=False)
    rep = spectrum_fast.freeze(model, attn)
    assert rep.trainable and all(".self_attn." in n for n in rep.trainable)


def test_bad_sources():
    model = _llama()
    with pytest.raises(SpectrumError, match="cannot take a selection from int"):
        spectrum_fast.freeze(model, 5)
    with pytest.raises(SpectrumError, match="must hold module names"):
        spectrum_fast.freeze(model, [1, 2])
    with pytest.raises(spectrum_fast.CheckpointError, match="no such file"):
        spectrum_fast.freeze(model, "/nonexistent/model")

"""Whole checkpoints written by transformers: scan() against the float64 reference, matrix by matrix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import spectrum_fast

from .conftest import ref_select, ref_snr, rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _save(model, path, dtype):
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return path


def _reference(path) -> tuple[dict[str, float], dict[str, str]]:
    """Independent: safetensors' own loader, float64 SVD, names per SPEC §2 spelled out here."""
    from safetensors.torch import load_file

    snrs, types = {}, {}
    for f in sorted(path.glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            parts = name.split(".")
            idx = [i for i, p in enumerate(parts) if p.isdigit()]
            if t.ndim != 2 or parts[-1] != "weight" or not idx:
                continue
            module = name[: -len(".weight")]
            snrs[module] = ref_snr(t.double().numpy())
            types[module] = ".".join(parts[idx[0] + 1:-1])
    return snrs, types


def _compare(path, expect_types: set[str]):
    result = spectrum_fast.scan(path, progress=False)
    snrs, types = _reference(path)
    assert {r.module for r in result.records} == set(snrs)
    assert {r.type for r in result.records} == expect_types
    for r in result.records:
        assert r.type == types[r.module]
        assert rel_err(r.snr, snrs[r.module]) <= 1e-4, (r.module, r.method, r.snr, snrs[r.module])
    for top in (0.25, 0.5, 0.75, 1.0):
        assert set(result.select(top).modules) == ref_select(snrs, types, top)
    return result


def _init(model, seed):
    # transformers' init gives near-pure noise; add low-rank structure so SNRs differ as in real models
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("layers" in name or ".h." in name):
                scale = float(torch.rand(1, generator=g)) * 0.5
                low_rank = torch.randn(p.shape[0], 4, generator=g) @ torch.randn(4, p.shape[1], generator=g)
                p.add_(scale * low_rank / p.shape[1] ** 0.5)
    return model


def test_llama_bf16(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    path = _save(_init(transformers.LlamaForCausalLM(cfg), 1), tmp_path / "llama", torch.bfloat16)
    res = _compare(path, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
    assert res.records[0].dtype == "BF16"
    assert res.head_names == ["lm_head.weight"] and res.embedding_names == ["model.embed_tokens.weight"]
    assert res.slug == "llama"


def test_mixtral_experts_fp16(tmp_path):
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                     num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    path = _save(_init(transformers.MixtralForCausalLM(cfg), 2), tmp_path / "mixtral", torch.float16)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        expert_shapes = [f.get_slice(k).get_shape() for k in f.keys() if ".experts." in k]  # noqa: SIM118 - safe_open is not a dict
    assert expert_shapes and all(len(s) == 2 for s in expert_shapes), "expected per-expert 2-D weights on disk"
    snrs, types = _reference(path)
    _compare(path, set(types.values()))
    assert any(".experts.3." in m for m in snrs)
    no_routers = spectrum_fast.scan(path, routers=False, progress=False)
    assert {r.module for r in no_routers.records} == {m for m in snrs if not m.endswith(".gate")}
    assert len(no_routers) == len(snrs) - cfg.num_hidden_layers


def test_gpt2_conv1d_fp32(tmp_path):
    cfg = transformers.GPT2Config(n_embd=96, n_layer=3, n_head=4, vocab_size=300, n_positions=64)
    torch.manual_seed(0)
    path = _save(_init(transformers.GPT2LMHeadModel(cfg), 3), tmp_path / "gpt2", torch.float32)
    res = _compare(path, {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"})
    # Conv1D weights are stored transposed: the record keeps the stored shape
    assert res["transformer.h.0.mlp.c_fc"].shape == (96, 384)


def test_minilm_real_weights(minilm_file):
    result = spectrum_fast.scan("demo", progress=False)
    from safetensors.numpy import load_file

    tensors = load_file(str(minilm_file))
    assert len(result) == 36
    for r in result.records:
        assert rel_err(r.snr, ref_snr(tensors[r.module + ".weight"])) <= 1e-4


def test_nan_and_zero_matrices_flagged_never_selected(tmp_path):
    from .conftest import save_np

    rng = np.random.default_rng(0)
    t = {f"model.layers.{i}.mlp.down_proj.weight": rng.standard_normal((32, 64)).astype(np.float32)
         for i in range(4)}
    t["model.layers.1.mlp.down_proj.weight"][3, 3] = np.nan
    t["model.layers.2.mlp.down_proj.weight"][:] = 0
    save_np(tmp_path / "model.safetensors", t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = spectrum_fast.scan(tmp_path, progress=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, spectrum_fast.DegenerateMatrixWarning)]
    assert any("model.layers.1.mlp.down_proj.weight" in m and "NaN" in m for m in msgs)
    assert any("model.layers.2.mlp.down_proj.weight" in m and "zeros" in m for m in msgs)
    assert res["model.layers.1.mlp.down_proj"].status == "nonfinite"
    sel = res.select(1.0).modules
    assert sorted(sel) == ["model.layers.0.mlp.down_proj", "model.layers.3.mlp.down_proj"]


def test_unsupported_dtype_skipped_with_reason(tmp_path):
    from .conftest import save_np

    t = {"model.layers.0.mlp.down_proj.weight": np.ones((8, 8), np.int8),
         "model.layers.1.mlp.down_proj.weight": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)}
    save_np(tmp_path / "model.safetensors", t)
    res = spectrum_fast.scan(tmp_path, progress=False)
    assert [r.module for r in res.records] == ["model.layers.1.mlp.down_proj"]
    assert res.skipped == [{"name": "model.layers.0.mlp.down_proj.weight", "reason": "unsupported dtype I8"}]


def test_types_filter_and_embeddings(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    path = _save(transformers.LlamaForCausalLM(cfg), tmp_path / "l", torch.float32)
    res = spectrum_fast.scan(path, types=["mlp.*"], progress=False)
    assert {r.type for r in res.records} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    res = spectrum_fast.scan(path, types=["self_attn.q_proj"], include_embeddings=True, progress=False)
    assert {r.module for r in res.records} >= {"lm_head", "model.embed_tokens", "model.layers.1.self_attn.q_proj"}
    with pytest.raises(spectrum_fast.SpectrumError, match="no 2-D weight matrices of types nothing"):
        spectrum_fast.scan(path, types=["nothing"], progress=False)


def test_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """Streaming: peak traced memory stays a small multiple of one tensor, not the model's size."""
    import tracemalloc

    from .conftest import save_np

    rng = np.random.default_rng(0)
    one = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": one * (1 + i / 10) for i in range(40)}  # 80 MiB
    path = save_np(tmp_path / "model.safetensors", tensors)
    del tensors
    tracemalloc.start()
    try:
        res = spectrum_fast.scan(path, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(res) == 40
    assert peak < 16 * one.nbytes, f"peak {peak / 2**20:.1f} MiB for 2 MiB tensors"

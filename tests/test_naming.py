"""Module names and types (SPEC.md §2) across architectures."""

from __future__ import annotations

import pytest

from spectrum_fast.naming import (
    is_embedding,
    is_head,
    is_scanned_by_default,
    module_name,
    module_type,
    pooled_type,
    wants,
)


@pytest.mark.parametrize("tensor,mtype", [
    ("model.layers.12.mlp.down_proj.weight", "mlp.down_proj"),
    ("model.layers.0.self_attn.qkv_proj.weight", "self_attn.qkv_proj"),  # Phi-3 fused
    ("transformer.h.3.attn.c_attn.weight", "attn.c_attn"),  # GPT-2 Conv1D
    ("encoder.layer.5.attention.self.query.weight", "attention.self.query"),  # BERT
    ("model.layers.3.block_sparse_moe.experts.5.w1.weight", "block_sparse_moe.experts.5.w1"),  # Mixtral
    ("model.layers.1.mlp.experts.59.down_proj.weight", "mlp.experts.59.down_proj"),  # Qwen-MoE / DeepSeek
    ("model.layers.1.mlp.shared_expert.up_proj.weight", "mlp.shared_expert.up_proj"),
    ("blocks.7.attn.proj.weight", "attn.proj"),
    ("model.norm.weight", "model.norm"),  # outside blocks: the whole name, as the reference
    ("model.layers.5.mlp.experts.17.gate_proj.weight", "mlp.experts.17.gate_proj"),  # Qwen-MoE
    ("model.layers.5.mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.gate_proj"),
    ("model.layers.5.mlp.shared_experts.down_proj.weight", "mlp.shared_experts.down_proj"),  # DeepSeek
    ("model.layers.5.self_attn.q_a_proj.weight", "self_attn.q_a_proj"),  # DeepSeek MLA
    ("model.layers.5.self_attn.kv_b_proj.weight", "self_attn.kv_b_proj"),
    ("model.layers.5.mlp.gate.weight", "mlp.gate"),  # a router
])
def test_module_type(tensor, mtype):
    assert module_type(module_name(tensor)) == mtype


def test_pooled_type():
    assert pooled_type("block_sparse_moe.experts.5.w1") == "block_sparse_moe.experts.*.w1"
    assert pooled_type("mlp.down_proj") == "mlp.down_proj"


def test_default_scope():
    assert is_scanned_by_default("model.layers.0.mlp.up_proj.weight", (4, 8))
    assert not is_scanned_by_default("model.layers.0.input_layernorm.weight", (8,))
    assert not is_scanned_by_default("model.layers.0.mlp.up_proj.bias", (8,))
    assert not is_scanned_by_default("model.embed_tokens.weight", (100, 8))
    assert not is_scanned_by_default("lm_head.weight", (100, 8))


def test_embeddings_and_head():
    for n in ("model.embed_tokens.weight", "transformer.wte.weight", "embeddings.word_embeddings.weight"):
        assert is_embedding(n)
    assert not is_embedding("embeddings.position_embeddings.weight")
    assert is_head("lm_head.weight") and is_head("embed_out.weight")
    assert not is_head("model.layers.1.lm_head.weight")
    assert wants("lm_head.weight", (10, 4), include_embeddings=True, types=None)
    assert not wants("lm_head.weight", (10, 4), include_embeddings=False, types=None)


def test_routers():
    from spectrum_fast.naming import is_router

    assert is_router("model.layers.5.mlp.gate.weight") and is_router("model.layers.0.block_sparse_moe.gate.weight")
    assert not is_router("model.layers.5.mlp.gate_proj.weight")
    assert not is_router("model.layers.5.mlp.shared_expert_gate.weight")
    n = "model.layers.5.mlp.gate.weight"
    assert wants(n, (64, 4096), include_embeddings=False, types=None)
    assert not wants(n, (64, 4096), include_embeddings=False, types=None, routers=False)


def test_selection_at_45000_matrices_both_groupings():
    import math
    import time

    from spectrum_fast import MatrixRecord, ScanResult

    rng = __import__("numpy").random.default_rng(0)
    recs = [MatrixRecord(f"model.layers.{layer}.mlp.experts.{e}.{p}", f"mlp.experts.{e}.{p}", float(rng.random()))
            for layer in range(60) for e in range(250) for p in ("gate_proj", "up_proj", "down_proj")]
    assert len(recs) == 45000
    result = ScanResult("synthetic", "synthetic", recs)
    t = time.perf_counter()
    per_expert = result.select(0.5)
    pooled = result.select(0.5, grouping="pooled")
    assert time.perf_counter() - t < 10
    assert len(per_expert.groups) == 750 and all(len(v) == 30 for v in per_expert.groups.values())
    assert sorted(pooled.groups) == ["mlp.experts.*.down_proj", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"]
    assert all(len(v) == math.floor(15000 * 0.5) for v in pooled.groups.values())
    best = max((r for r in recs if r.type.endswith("down_proj")), key=lambda r: r.snr)
    assert pooled.groups["mlp.experts.*.down_proj"][0] is best


def test_type_patterns():
    n = "model.layers.3.block_sparse_moe.experts.5.w1.weight"
    assert wants(n, (4, 4), include_embeddings=False, types=["block_sparse_moe.experts.*.w1"])
    assert wants(n, (4, 4), include_embeddings=False, types=["block_sparse_moe.*"])
    assert not wants(n, (4, 4), include_embeddings=False, types=["self_attn.*"])

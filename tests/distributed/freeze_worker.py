"""One rank of a real 2-process CPU/gloo run of ``spectrum_fast.freeze`` under a sharding wrapper.

Started by ``tests/test_freeze_distributed.py`` once per rank, with the environment ``torchrun`` would
set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

    python freeze_worker.py MODE CHECKPOINT_DIR SELECTION_JSON OUT_DIR

MODE is one of ``fsdp2-before``, ``fsdp2-after``, ``fsdp1-orig``, ``fsdp1-flat``, ``zero3``. Every rank
loads the same weights (the checkpoint the test scanned), freezes, wraps, takes two AdamW steps on
random tokens and gathers the full parameters. Rank 0 writes them to ``OUT_DIR/final.safetensors``;
each rank writes ``OUT_DIR/rank<R>.json`` with the FreezeReport and what its optimizer holds. The test
process makes every assertion from these files. Nothing is asserted here beyond sanity, so that a
failure shows up as a readable pytest diff rather than a traceback from one rank.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

# This process is not under pytest's filterwarnings=error, but keep the log readable: the wrappers
# warn about things that do not matter for a 2-rank CPU run (FSDP1 deprecation, CPU device, ...).
warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from _harness import exit_after, process_group, write_rank_info, zero3_config

torch.set_num_threads(1)

STEPS = 2
LR = 1e-2
WEIGHT_DECAY = 0.1
BATCH, SEQ = 2, 16


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, use_cache=False)


def load_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(checkpoint, "model.safetensors"))


def build_model(checkpoint: str) -> torch.nn.Module:
    """The scanned checkpoint's weights in a fresh LlamaForCausalLM, identical on every rank."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    missing, unexpected = model.load_state_dict(load_weights(checkpoint), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model.float().train()


def batches(vocab: int) -> list[torch.Tensor]:
    # Different data per rank (as in data-parallel training), reproducible.
    g = torch.Generator().manual_seed(1234 + dist.get_rank())
    return [torch.randint(0, vocab, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def report_dict(report) -> dict:
    return {"trainable": list(report.trainable), "trainable_params": report.trainable_params,
            "total_params": report.total_params, "unmatched": list(report.unmatched)}


def optimizer_info(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What the optimizer holds, by the parameter names this rank's model reports."""
    names = {id(p): n for n, p in model.named_parameters()}
    in_groups = [names.get(id(p), "<unnamed>") for g in optimizer.param_groups for p in g["params"]]
    with_state = [names.get(id(p), "<unnamed>") for p, s in optimizer.state.items() if s]
    requires_grad = [n for n, p in model.named_parameters() if p.requires_grad]
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    local_numel = {n: int(_local(p).numel()) for n, p in model.named_parameters()}
    return {"in_groups": in_groups, "with_state": with_state, "requires_grad": requires_grad,
            "with_grad": with_grad, "local_numel": local_numel}


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def train(model: torch.nn.Module, optimizer, vocab: int, engine=None) -> list[float]:
    losses = []
    for ids in batches(vocab):
        out = (model if engine is None else engine)(input_ids=ids, labels=ids)
        if engine is None:
            out.loss.backward()
            optimizer.step()
        else:
            engine.backward(out.loss)
            engine.step()
        losses.append(float(out.loss.detach()))
    return losses


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


def run_fsdp2(checkpoint, selection, after: bool) -> tuple[dict, dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import spectrum_fast

    model = build_model(checkpoint)
    if not after:
        report = spectrum_fast.freeze(model, selection)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if after:
        report = spectrum_fast.freeze(model, selection)
    params_are_dtensors = all(type(p).__name__ == "DTensor" for p in model.parameters())
    optimizer = adamw([p for p in model.parameters() if p.requires_grad])
    losses = train(model, optimizer, model.config.vocab_size)
    info = optimizer_info(model, optimizer)
    # Gather, no grad, in one fixed order on all ranks (full_tensor is a collective).
    full = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
    return full, {"report": report_dict(report), "optimizer": info, "losses": losses,
                  "params_are_dtensors": params_are_dtensors}


def run_fsdp1(checkpoint, selection, use_orig_params: bool) -> tuple[dict, dict]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    import spectrum_fast

    model = build_model(checkpoint)
    report = spectrum_fast.freeze(model, selection)
    kwargs = {}
    if use_orig_params:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # Mixed trainable/frozen parameters inside one unit: allowed with use_orig_params=True.
        kwargs["auto_wrap_policy"] = ModuleWrapPolicy({LlamaDecoderLayer})
    else:
        kwargs["auto_wrap_policy"] = spectrum_fast.fsdp_auto_wrap_policy(model)
    wrapped = FSDP(model, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=use_orig_params,
                   device_id=torch.device("cpu"), sync_module_states=False, **kwargs)
    optimizer = adamw([p for p in wrapped.parameters() if p.requires_grad])
    losses = train(wrapped, optimizer, model.config.vocab_size)
    info = optimizer_info(wrapped, optimizer)
    # every FSDP unit's flat parameter, with the full (wrapper-free) names of what it holds
    info["flat_params"] = []
    for unit_name, unit in wrapped.named_modules():
        flat = getattr(unit, "_flat_param", None) if isinstance(unit, FSDP) else None
        if flat is not None:
            prefix = spectrum_fast.apply.canonical_name(unit_name)
            info["flat_params"].append({"unit": prefix, "requires_grad": flat.requires_grad, "fqns": [
                spectrum_fast.apply.canonical_name(f"{prefix}.{f}" if prefix else f) for f in flat._fqns]})
    # After freezing+wrapping, a second freeze() on the wrapped model must find the same names and
    # count full sizes; with flattened parameters it must refuse with a clear message instead.
    report2, flat_error = None, None
    if use_orig_params:
        report2 = spectrum_fast.freeze(wrapped, selection)
    else:
        try:
            spectrum_fast.freeze(wrapped, selection)
        except spectrum_fast.SpectrumError as e:
            flat_error = str(e)
    with FSDP.summon_full_params(wrapped, writeback=False, rank0_only=False):
        full = {spectrum_fast.apply.canonical_name(n): p.detach().clone() for n, p in wrapped.named_parameters()}
    return full, {"report": report_dict(report), "optimizer": info, "losses": losses,
                  "report_after_wrap": report_dict(report2) if report2 else None, "flat_error": flat_error}


def run_zero3(checkpoint, selection) -> tuple[dict, dict]:
    import deepspeed
    from transformers import LlamaForCausalLM

    import spectrum_fast

    config = zero3_config(BATCH)
    weights = load_weights(checkpoint)
    torch.manual_seed(0)
    # No dtype=torch.float32 here: with the config given, Init takes the dtype from it (fp32 without
    # "bf16"/"fp16" sections). An explicit dtype goes through
    # `dtype or torch.float16 if accelerator.is_fp16_supported() else torch.bfloat16 if ...` in
    # deepspeed 0.19.8 (partition_parameters.py, _set_dtype), which on a CPU without fp16 support
    # parses as `(dtype or fp16) if fp16_ok else bf16`: the model silently became bfloat16.
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = LlamaForCausalLM(llama_config())
    partitioned = all(hasattr(p, "ds_numel") for p in model.parameters())
    # Load the scanned weights into the partitioned model (rank 0 writes, then re-partitioned).
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if dist.get_rank() == 0:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(weights[n])
    report = spectrum_fast.freeze(model, selection)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad])
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    losses = train(model, optimizer, model.config.vocab_size, engine=engine)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = [[names.get(id(p), "<unnamed>") for p in g] for g in ds_optimizer.fp16_groups]
    inner = ds_optimizer.optimizer
    info = {
        # the parameters ZeRO-3 partitions for the optimizer, and what the wrapped torch optimizer holds
        "ds_groups": groups,
        "ds_group_numel": sum(int(p.ds_numel) for g in ds_optimizer.fp16_groups for p in g),
        # this rank's fp32 master partition (DeepSpeed hands it to the torch optimizer only around step())
        "fp32_partition_numel": sum(int(t.numel()) for t in ds_optimizer.fp32_partitioned_groups_flat),
        "inner_with_state": sum(1 for s in inner.state.values() if s),
        "inner_state_numel": sum(int(s["exp_avg"].numel()) for s in inner.state.values() if "exp_avg" in s),
        "with_grad": [n for n, p in engine.module.named_parameters() if p.grad is not None],
        "requires_grad": [n for n, p in engine.module.named_parameters() if p.requires_grad],
        "partitioned": partitioned,
        "local_numel": {n: int(p.numel()) for n, p in engine.module.named_parameters()},
    }
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        full = {spectrum_fast.apply.canonical_name(n): p.detach().clone()
                for n, p in engine.module.named_parameters()}
    return full, {"report": report_dict(report), "optimizer": info, "losses": losses}


def main() -> int:
    mode, checkpoint, selection_file, out = sys.argv[1:5]
    with open(selection_file, encoding="utf-8") as f:
        selection = json.load(f)
    with process_group(zero3=mode == "zero3"):
        if mode in ("fsdp2-before", "fsdp2-after"):
            full, info = run_fsdp2(checkpoint, selection, after=mode == "fsdp2-after")
        elif mode in ("fsdp1-orig", "fsdp1-flat"):
            full, info = run_fsdp1(checkpoint, selection, use_orig_params=mode == "fsdp1-orig")
        elif mode == "zero3":
            full, info = run_zero3(checkpoint, selection)
        else:
            raise SystemExit(f"unknown mode {mode}")
        if dist.get_rank() == 0:
            from safetensors.torch import save_file

            save_file({n: t.contiguous() for n, t in full.items()}, os.path.join(out, "final.safetensors"))
        write_rank_info(out, info)
    return 0


if __name__ == "__main__":
    exit_after(main)

"""One rank of a 2-process CPU/gloo run of ``param_groups`` (and ``scan_live``) under a sharding wrapper.

Started by ``tests/test_param_groups.py`` once per rank with torchrun's environment:

    python lr_worker.py MODE CHECKPOINT_DIR RESULT_JSON SELECTION_JSON OUT_DIR

MODE is ``fsdp2`` or ``zero3``. Every rank loads the checkpoint, freezes the selection, scans the live
(sharded) weights with ``scan_live``, builds the parameter groups from the checkpoint's result file
and takes one optimizer step: SGD under FSDP2 (each local shard must move by exactly ``-lr * grad``),
AdamW inside a DeepSpeed engine under ZeRO-3 (the groups' learning rates must reach the optimizer
DeepSpeed wraps). Under ZeRO-3 it also records the error ``retarget`` raises there. Each rank writes
``OUT_DIR/rank<R>.json``; the test makes every assertion from those files.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")  # wrapper chatter (CPU device, deprecations); pytest is not watching here
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from _harness import exit_after, process_group, write_rank_info, zero3_config

torch.set_num_threads(1)

LR = 0.05
TOP = 0.5
WEIGHT_DECAY = 0.1
BATCH, SEQ = 2, 16


def llama_config(checkpoint: str):
    from transformers import LlamaConfig

    return LlamaConfig.from_pretrained(checkpoint, use_cache=False)  # the test's tiny Llama


def load_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(checkpoint, "model.safetensors"))


def build_model(checkpoint: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(checkpoint))
    missing, unexpected = model.load_state_dict(load_weights(checkpoint), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model.float().train()


def batch(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + dist.get_rank())  # data-parallel: different data per rank
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def describe(groups: list[dict], names: dict[int, str]) -> list[dict]:
    from spectrum_fast.apply import canonical_name

    return [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"], "modules": g["modules"],
             "params": [canonical_name(names[id(p)]) for p in g["params"]]} for g in groups]


def run_fsdp2(checkpoint: str, result_file: str, selection: list[str]) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import spectrum_fast
    from spectrum_fast.lr import param_groups
    from spectrum_fast.retarget import scan_live

    model = build_model(checkpoint)
    spectrum_fast.freeze(model, selection)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    live = scan_live(model)
    groups = param_groups(model, result_file, base_lr=LR, top=TOP)
    names = {id(p): n for n, p in model.named_parameters()}
    info = {"groups": describe(groups, names), "live_snr": live.snr,
            "dtensors": all(type(p).__name__ == "DTensor" for p in model.parameters())}
    optimizer = torch.optim.SGD(groups, lr=123.0)  # the default must never apply: every group has its lr
    ids = batch(model.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    before = {n: (p.detach().to_local().clone(), p.grad.to_local().clone())
              for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().to_local().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer.step()
    errors, moved = {}, 0
    for n, p in model.named_parameters():
        now = p.detach().to_local()
        if n in before:
            w, g = before[n]
            # float32 w - lr * g, lr in float32, rounded once (torch's fused kernel): exact in float64
            lr32 = float(torch.tensor(lr_of[id(p)], dtype=torch.float32))
            want = (w.double() - lr32 * g.double()).float()
            errors[n] = float((now - want).abs().max()) if now.numel() else 0.0
            moved += int(now.numel() > 0 and not torch.equal(now, w))
        else:
            errors[n] = float((now - frozen[n]).abs().max()) if now.numel() else 0.0
    info.update(update_errors=errors, moved=moved)
    return info


def run_zero3(checkpoint: str, result_file: str, selection: list[str]) -> dict:
    import deepspeed
    from transformers import LlamaForCausalLM

    import spectrum_fast
    from spectrum_fast.apply import canonical_name
    from spectrum_fast.lr import param_groups
    from spectrum_fast.retarget import retarget, scan_live

    config = zero3_config(BATCH)
    weights = load_weights(checkpoint)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):  # no dtype argument: see freeze_worker.py
        model = LlamaForCausalLM(llama_config(checkpoint))
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if dist.get_rank() == 0:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(weights[n])
    spectrum_fast.freeze(model, selection)
    live = scan_live(model)
    groups = param_groups(model, result_file, base_lr=LR, top=TOP, weight_decay=WEIGHT_DECAY)
    names = {id(p): n for n, p in model.named_parameters()}
    info = {"groups": describe(groups, names), "live_snr": live.snr,
            "local_numel": sorted({int(p.numel()) for p in model.parameters()})}
    optimizer = torch.optim.AdamW(groups, lr=123.0)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = batch(model.config.vocab_size)
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    ds_names = {id(p): canonical_name(n) for n, p in engine.module.named_parameters()}
    inner = ds_optimizer.optimizer
    info["ds_groups"] = [{"params": [ds_names[id(p)] for p in group], "lr": inner.param_groups[i]["lr"],
                          "weight_decay": inner.param_groups[i]["weight_decay"]}
                         for i, group in enumerate(ds_optimizer.fp16_groups)]
    # the torch AdamW holds one state per group: this rank's flat fp32 partition of it
    info["inner_states"] = sum(1 for s in inner.state.values() if s.get("exp_avg") is not None)
    info["inner_groups"] = len(inner.param_groups)
    info["loss"] = float(out.loss.detach())
    errors = []
    for opt in (ds_optimizer, optimizer):
        try:
            retarget(engine.module, opt, top=TOP)
            errors.append(None)
        except spectrum_fast.SpectrumError as e:
            errors.append(str(e))
    info["retarget_errors"] = errors
    return info


def main() -> int:
    mode, checkpoint, result_file, selection_file, out = sys.argv[1:6]
    with open(selection_file, encoding="utf-8") as f:
        selection = json.load(f)
    with process_group(zero3=mode == "zero3"):
        run = run_fsdp2 if mode == "fsdp2" else run_zero3
        write_rank_info(out, run(checkpoint, result_file, selection))
    return 0


if __name__ == "__main__":
    exit_after(main)

"""One rank of a 2-process CPU/gloo FSDP2 run of ``retarget``.

Started by ``tests/test_retarget.py`` once per rank with torchrun's environment:

    python retarget_worker.py CHECKPOINT_DIR OUT_DIR

Every rank loads the checkpoint, shards it with ``fully_shard``, selects with ``scan_live`` (the sharded
weights, one DTensor at a time), freezes, builds ``param_groups`` and takes two AdamW steps. Then it
raises the SNR of some frozen modules (the same low-rank change on every rank), calls ``retarget``
and takes one more step. Rank 0 writes the full weights just before ``retarget``
(``before.safetensors``) and at the end (``final.safetensors``); every rank writes
``rank<R>.json`` with the report and what its optimizer holds. The test makes the assertions.
"""

from __future__ import annotations

import os
import sys
import warnings

warnings.filterwarnings("ignore")  # wrapper chatter; pytest is not watching this process
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist
from _harness import exit_after, process_group, write_rank_info

torch.set_num_threads(1)

LR = 0.01
TOP = 0.5
BOOSTED_TYPES = ("mlp.down_proj", "mlp.up_proj", "self_attn.o_proj")


def build_model(checkpoint: str) -> torch.nn.Module:
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(checkpoint, use_cache=False))
    missing, unexpected = model.load_state_dict(load_file(os.path.join(checkpoint, "model.safetensors")), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model.float().train()


def boost(w: torch.Tensor, k: int = 8) -> torch.Tensor:
    """Shrink the bulk and add k equal strong directions: the SNR rises several-fold (deterministic)."""
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(w.shape[0], k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(w.shape[1], k, generator=g))
    return 0.2 * w + torch.linalg.matrix_norm(w, 2) * u @ v.T


def step(model, optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed + 100 * dist.get_rank())
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def full_weights(model) -> dict[str, torch.Tensor]:
    from spectrum_fast.apply import canonical_name

    with torch.no_grad():  # collectives: the same order on every rank
        return {canonical_name(n): p.full_tensor().clone() for n, p in model.named_parameters()}


def run(checkpoint: str, out: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    import spectrum_fast
    from spectrum_fast.apply import canonical_name
    from spectrum_fast.lr import param_groups
    from spectrum_fast.retarget import retarget, scan_live

    model = build_model(checkpoint)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    first = scan_live(model)
    spectrum_fast.freeze(model, first, top=TOP)
    optimizer = torch.optim.AdamW(param_groups(model, first, base_lr=LR), lr=123.0)
    losses = [step(model, optimizer, s) for s in range(2)]

    boosted = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            mod = canonical_name(n).removesuffix(".weight")
            if not p.requires_grad and n.endswith(".weight") and mod.split(".", 3)[-1] in BOOSTED_TYPES:
                p.copy_(distribute_tensor(boost(p.full_tensor()), p.device_mesh, p.placements))
                boosted.append(mod)
    before = full_weights(model)
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    kept = {names[id(p)]: (s, {k: v.clone() for k, v in s.items()}) for p, s in optimizer.state.items()}

    report = retarget(model, optimizer, top=TOP)

    by_name = {canonical_name(n): p for n, p in model.named_parameters()}
    stayer_params = [n for n in kept if n.rsplit(".", 1)[0] in report.stayed]
    info = {
        "first_selection": first.select(TOP).modules, "boosted": boosted, "losses": losses,
        "selected": report.selected, "entered": report.entered, "left": report.left, "stayed": report.stayed,
        "lr": report.lr, "groups_added": report.groups_added, "freed_states": report.freed_states,
        "live_snr": report.result.snr,
        "requires_grad": sorted(n for n, p in by_name.items() if p.requires_grad),
        "in_groups": sorted(names[id(p)] for g in optimizer.param_groups for p in g["params"]),
        "group_lrs": {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]},
        # a stayer's state: the very same dict, holding the very same, unchanged tensors
        "stayers_kept": all(optimizer.state[by_name[n]] is kept[n][0]
                            and all(torch.equal(optimizer.state[by_name[n]][k], v) for k, v in kept[n][1].items())
                            for n in stayer_params) and bool(stayer_params),
        "with_state_after_retarget": sorted(names[id(p)] for p in optimizer.state),
    }
    info["losses"].append(step(model, optimizer, 5))
    info["steps_after"] = {names[id(p)]: int(s["step"]) for p, s in optimizer.state.items()}
    final = full_weights(model)
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in before.items()}, os.path.join(out, "before.safetensors"))
        save_file({n: t.contiguous() for n, t in final.items()}, os.path.join(out, "final.safetensors"))
    return info


def main() -> int:
    checkpoint, out = sys.argv[1:3]
    with process_group():
        write_rank_info(out, run(checkpoint, out))
    return 0


if __name__ == "__main__":
    exit_after(main)

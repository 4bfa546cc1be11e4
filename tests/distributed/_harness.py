"""What every test worker does around its own work: join the gloo process group (through DeepSpeed for
ZeRO-3), write its rank's JSON, and exit without interpreter teardown."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator

import torch.distributed as dist


@contextlib.contextmanager
def process_group(zero3: bool = False) -> Iterator[None]:
    if zero3:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        # (not `import deepspeed.comm.torch as ...`: that binds deepspeed.comm's attribute `torch`, which is
        # the torch package itself.) On the CPU accelerator DeepSpeed's torch backend JIT-compiles a
        # shared-memory all-reduce op the first time it starts (~45 s on 2 cores, and it needs a compiler);
        # plain gloo is all the tests need.
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
        if hasattr(ds_comm_torch, "build_shm_op"):
            ds_comm_torch.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def zero3_config(batch: int) -> dict:
    """DeepSpeed ZeRO-3 on the CPU, fp32 (no "bf16"/"fp16" sections), every parameter partitioned."""
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        # Threshold 0: partition every parameter. With the default (1e5 elements) all of a tiny model's
        # parameters would stay whole on every rank, and p.numel() would look right by accident.
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def write_rank_info(out: str, info: dict) -> None:
    """``out/rank<r>.json``, then wait for every rank."""
    info["world_size"] = dist.get_world_size()
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    dist.barrier()


def exit_after(main: Callable[[], int]) -> None:
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every output is written and closed. Skip interpreter teardown: a gloo thread still joinable at exit
    # sometimes aborts the process ("terminate called without an active exception", exit -6) after the
    # work is done, which would fail the run for nothing.
    os._exit(code)

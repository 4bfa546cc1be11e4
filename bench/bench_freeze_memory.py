"""Training memory and step time: full fine-tune against Spectrum-50 and Spectrum-25 via ``freeze()``.

One small synthetic Llama (float32, low-rank signal added to the block matrices so that SNRs differ)
is built, saved once and scanned with ``spectrum_fast.scan``. Then each configuration trains a few
steps (AdamW, batch 4 x 128 random tokens, causal LM loss) on a fresh copy of the same weights:

* ``full``        every parameter trainable, embeddings and ``lm_head`` included;
* ``spectrum50``  ``freeze(model, result, top=0.5)``: embeddings, ``lm_head`` and norms frozen;
* ``spectrum25``  the same with ``top=0.25``.

Measured per configuration: gradient, optimizer-state and weight bytes (the "training state"), the
median step time (forward + backward + optimizer step, first step excluded as warm-up) and the
process's peak RSS. The benchmark checks itself: the trainable count must equal the selected
modules' parameters, gradients must be 4 bytes and AdamW moments 8 bytes per trainable parameter.
Exit status 1 if a check fails.

    python bench/bench_freeze_memory.py [--json OUT.json] [--steps N]

Every configuration runs in its own child process (this same file with ``--child``), and so does
building the checkpoint: Linux carries a process's peak RSS over into the programs it starts, so a
parent that once held a model would put a floor under every later measurement. The parent imports
only the standard library and stays small.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import machine_info  # bench/ is on sys.path when a script there runs

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "freeze_memory.json"

SEED = 1234
LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 8000,
    "tie_word_embeddings": False,
}
SIGNAL_RANK = 8
BATCH = 4
SEQ_LEN = 128
LR = 1e-5
THREADS = 2
# name -> top (None: full fine-tune)
CONFIGS: dict[str, float | None] = {"full": None, "spectrum50": 0.5, "spectrum25": 0.25}

# Llama-3-8B (public config): untied 128256 x 4096 embeddings and head out of 8.03e9 parameters.
# Used only to put this model's embedding share next to the paper's model in the notes.
LLAMA3_8B_PARAMS = 8_030_261_248
LLAMA3_8B_EMBED_HEAD = 2 * 128_256 * 4096

MB = 2**20


# --------------------------------------------------------------------------------------------------
# Children (`--child build WORKDIR` and `--child train WORKDIR CONFIG OUT`)
# --------------------------------------------------------------------------------------------------

def child_build(workdir: Path) -> None:
    """Build the synthetic checkpoint (float32), save it and write its scan next to it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import spectrum_fast

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIG))
    gen = torch.Generator().manual_seed(SEED + 1)
    n_layers = LLAMA_CONFIG["num_hidden_layers"]
    # A Gaussian init has no singular values above the Marchenko-Pastur bulk edge, so all SNRs would
    # be alike and the selection a matter of noise. A rank-8 term whose strength differs per layer
    # (jittered per matrix, so no two matrices of a type tie) spreads the SNRs as training does.
    layer_strength = 0.3 + 2.7 * torch.rand(n_layers, generator=gen)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for p in layer.parameters():
                if p.ndim != 2:
                    continue
                m, n = p.shape
                edge = float(p.std()) * (math.sqrt(m) + math.sqrt(n))  # bulk edge of the init's spectrum
                scale = float(layer_strength[i]) * (0.8 + 0.4 * float(torch.rand((), generator=gen)))
                u = torch.linalg.qr(torch.randn(m, SIGNAL_RANK, generator=gen))[0]
                v = torch.linalg.qr(torch.randn(n, SIGNAL_RANK, generator=gen))[0]
                p.add_((u * (scale * edge)) @ v.T)
    model_dir = workdir / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    result = spectrum_fast.scan(model_dir, progress=False)
    (workdir / "scan.json").write_text(json.dumps(result.to_dict()))


def _current_rss_mb() -> float:
    """Resident set size now (not the high-water mark), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def child_train(workdir: Path, config: str, steps: int, out: Path) -> None:
    """Train one configuration for ``steps`` steps and write what it measured."""
    import resource

    import torch
    from transformers import LlamaForCausalLM

    import spectrum_fast

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    torch.set_num_threads(THREADS)
    device = os.environ.get("SPECTRUM_BENCH_DEVICE", "cpu")  # set by the parent's --device
    rss_import = peak_mb()
    model = LlamaForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32).to(device)
    model.train()
    rss_loaded_peak, rss_loaded_now = peak_mb(), _current_rss_mb()

    params = dict(model.named_parameters())
    top = CONFIGS[config]
    selected: list[str] = []
    if top is None:
        for p in params.values():
            p.requires_grad_(True)
        expected = sum(p.numel() for p in params.values())
        reported = expected
    else:
        result = spectrum_fast.load_result(workdir / "scan.json")
        selected = result.select(top).modules
        report = spectrum_fast.freeze(model, result, top=top)
        reported = report.trainable_params
        # Independent of freeze(): every parameter owned by a selected module, by name.
        expected = sum(p.numel() for name, p in params.items()
                       if any(name.startswith(mod + ".") for mod in selected))
    trainable = [p for p in params.values() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=LR)

    # The same token batches in every configuration.
    gen = torch.Generator().manual_seed(SEED + 2)
    vocab = LLAMA_CONFIG["vocab_size"]
    batches = torch.randint(0, vocab, (steps, BATCH, SEQ_LEN), generator=gen).to(device)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    cpu_times: list[float] = []
    losses: list[float] = []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batches[step], labels=batches[step]).loss
        loss.backward()
        opt.step()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(float(loss.detach()))

    # Grads of the last backward are still there: zero_grad runs at the start of a step.
    with_grad = {name for name, p in params.items() if p.grad is not None}
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None)
    moment_bytes = counter_bytes = 0
    for state in opt.state.values():
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            # AdamW keeps exp_avg / exp_avg_sq (parameter-sized) and a scalar step counter per tensor.
            if key == "step":
                counter_bytes += value.nbytes
            else:
                moment_bytes += value.nbytes
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    embed_head = sum(p.numel() for name, p in params.items()
                     if name in ("model.embed_tokens.weight", "lm_head.weight"))
    norms = sum(p.numel() for name, p in params.items() if "norm" in name)
    blocks_2d = sum(p.numel() for name, p in params.items() if name.startswith("model.layers.") and p.ndim == 2)
    # Module types counted from the model itself (model.layers.<i>.<type>.weight), not from the library.
    type_sizes: dict[str, int] = {}
    for name, p in params.items():
        if name.startswith("model.layers.") and p.ndim == 2:
            mtype = name.split(".", 3)[3].removesuffix(".weight")
            type_sizes[mtype] = type_sizes.get(mtype, 0) + 1

    out.write_text(json.dumps({
        "config": config, "top": top, "selected_modules": selected,
        "trainable_params": n_trainable, "reported_trainable_params": reported,
        "expected_trainable_params": expected, "total_params": sum(p.numel() for p in params.values()),
        "trainable_tensors": len(trainable),
        "tensors_with_grad_equal_trainable": with_grad == {n for n, p in params.items() if p.requires_grad},
        "grad_bytes": grad_bytes, "moment_bytes": moment_bytes, "counter_bytes": counter_bytes,
        "optimizer_bytes": moment_bytes + counter_bytes, "weight_bytes": weight_bytes,
        "embed_head_params": embed_head, "norm_params": norms, "block_matrix_params": blocks_2d,
        "block_type_sizes": type_sizes,
        "step_times_s": times, "step_cpu_times_s": cpu_times, "losses": losses,
        "rss_after_import_mb": rss_import, "peak_rss_after_load_mb": rss_loaded_peak,
        "rss_after_load_mb": rss_loaded_now,
        "peak_rss_mb": peak_mb(), "torch_threads": torch.get_num_threads(), "device": device,
        "cuda_max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
    }))


# --------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------

def run_child(args: list[str], steps: int) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--steps", str(steps), "--child", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child {args[0]} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("spectrum_fast", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def check(runs: dict[str, dict[str, Any]], steps: int) -> list[str]:
    """Every self-consistency rule that failed, as readable lines (empty: all passed)."""
    failures = []
    for name, r in runs.items():
        if len(r["step_times_s"]) != steps:
            failures.append(f"{name}: ran {len(r['step_times_s'])} steps, {steps} requested")
    totals = {r["total_params"] for r in runs.values()}
    if len(totals) != 1:
        failures.append(f"total parameter counts differ between configurations: {sorted(totals)}")
    for name, r in runs.items():
        t = r["trainable_params"]
        if t != r["expected_trainable_params"]:
            failures.append(f"{name}: {t:,} trainable parameters, but the selected modules hold "
                            f"{r['expected_trainable_params']:,}")
        if t != r["reported_trainable_params"]:
            failures.append(f"{name}: FreezeReport says {r['reported_trainable_params']:,} trainable, "
                            f"requires_grad says {t:,}")
        if r["grad_bytes"] != 4 * t:
            failures.append(f"{name}: gradient bytes {r['grad_bytes']:,} != 4 x {t:,} trainable")
        if r["moment_bytes"] != 8 * t:
            failures.append(f"{name}: AdamW moment bytes {r['moment_bytes']:,} != 8 x {t:,} trainable")
        # One scalar step counter (float32, or float64 with capturable/differentiable) per tensor.
        if r["counter_bytes"] > 8 * r["trainable_tensors"]:
            failures.append(f"{name}: step counters take {r['counter_bytes']:,} bytes "
                            f"for {r['trainable_tensors']} tensors")
        if not r["tensors_with_grad_equal_trainable"]:
            failures.append(f"{name}: the tensors with a gradient are not exactly the trainable ones")
        if not all(math.isfinite(x) for x in r["losses"]):
            failures.append(f"{name}: non-finite loss {r['losses']}")
        if r["top"] is not None:
            # SPEC §3: floor(len * top) modules of each type (1e-9: 0.3 * 10 must give 3).
            want = sum(math.floor(n * r["top"] + 1e-9) for n in r["block_type_sizes"].values())
            if len(r["selected_modules"]) != want:
                failures.append(f"{name}: {len(r['selected_modules'])} modules selected, expected {want}")
    if runs["full"]["trainable_params"] != runs["full"]["total_params"]:
        failures.append("full: not every parameter is trainable")
    return failures


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    full = runs["full"]
    full_state = full["weight_bytes"] + full["grad_bytes"] + full["optimizer_bytes"]
    full_step = statistics.median(full["step_times_s"][1:])
    full_cpu = statistics.median(full["step_cpu_times_s"][1:])
    out = {}
    for name, r in runs.items():
        state = r["weight_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
        step = statistics.median(r["step_times_s"][1:])  # the first step is warm-up
        # CPU seconds of the process: less disturbed than wall time when other work shares the cores.
        cpu = statistics.median(r["step_cpu_times_s"][1:])

        def less(x: float, base: float) -> float:
            return round(100 * (1 - x / base), 2) if base else 0.0

        out[name] = {
            "top": r["top"],
            "trainable_params": r["trainable_params"],
            "total_params": r["total_params"],
            "trainable_fraction": round(r["trainable_params"] / r["total_params"], 4),
            "n_selected_modules": len(r["selected_modules"]),
            "grad_bytes": r["grad_bytes"],
            "optimizer_bytes": r["optimizer_bytes"],
            "optimizer_step_counter_bytes": r["counter_bytes"],
            "weight_bytes": r["weight_bytes"],
            "training_state_bytes": state,
            "training_state_mb": round(state / MB, 1),
            "grad_reduction_pct": less(r["grad_bytes"], full["grad_bytes"]),
            "optimizer_reduction_pct": less(r["optimizer_bytes"], full["optimizer_bytes"]),
            "training_state_reduction_pct": less(state, full_state),
            "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "peak_rss_reduction_pct": less(r["peak_rss_mb"], full["peak_rss_mb"]),
            "cuda_max_memory_allocated_mb": r.get("cuda_max_memory_allocated_mb"),
            "cuda_max_memory_reduction_pct": (less(r["cuda_max_memory_allocated_mb"], full["cuda_max_memory_allocated_mb"])
                                              if r.get("cuda_max_memory_allocated_mb") else None),
            "rss_after_import_mb": round(r["rss_after_import_mb"], 1),
            "peak_rss_after_load_mb": round(r["peak_rss_after_load_mb"], 1),
            "rss_after_load_mb": round(r["rss_after_load_mb"], 1),
            "median_step_s": round(step, 4),
            "step_times_s": [round(t, 4) for t in r["step_times_s"]],
            "speedup_vs_full": round(full_step / step, 3),
            "median_step_cpu_s": round(cpu, 4),
            "step_cpu_times_s": [round(t, 4) for t in r["step_cpu_times_s"]],
            "cpu_time_speedup_vs_full": round(full_cpu / cpu, 3),
            "losses": [round(x, 4) for x in r["losses"]],
            "selected_modules": r["selected_modules"],
        }
    return out


def notes(runs: dict[str, dict[str, Any]], summary: dict[str, dict[str, Any]],
          load: tuple[float, float] | None) -> str:
    """Why the numbers differ from the paper's, with this run's own shares.

    ``load``: the 1-minute load average before and after the run, since timings on a shared machine
    depend on it.
    """
    full, s50, s25 = runs["full"], summary["spectrum50"], summary["spectrum25"]
    total = full["total_params"]
    eh = full["embed_head_params"]
    full_state = summary["full"]["training_state_bytes"]
    # Every parameter costs 16 bytes in full FT here (fp32 weight + grad + 2 AdamW moments), so the
    # embeddings' share of the training state equals their share of the parameters.
    eh_state_share = 16 * eh / full_state
    paper_eh_share = LLAMA3_8B_EMBED_HEAD / LLAMA3_8B_PARAMS
    # The reference tool's YAML (and `spectrum_fast freeze`'s, by default) also unfreezes embeddings
    # and head; each such parameter adds its gradient and two moments (12 bytes in fp32).
    with_eh = {k: 100 * (1 - (s["training_state_bytes"] + 12 * eh) / full_state) for k, s in (("50", s50), ("25", s25))}
    # Backward only has to reach the lowest layer holding a trainable module.
    lowest = {k: min(int(m.split(".")[2]) for m in runs[f"spectrum{k}"]["selected_modules"]) for k in ("50", "25")}
    peak = full["peak_rss_mb"]
    base = full["rss_after_import_mb"]
    state_mb = full_state / MB
    other = peak - base - state_mb
    return (
        "The paper's 17.7% / 23.1% (Spectrum-50 / -25 vs full FT) are peak GPU memory per GPU on "
        "Llama-3-8B under DeepSpeed ZeRO-3 in bf16 mixed precision: states are sharded over 8 GPUs, "
        "while activations, gathered parameters and communication buffers are per GPU and do not "
        "shrink with freezing, so they dilute the saving; and the reference tool's axolotl YAML "
        "unfreezes embeddings and lm_head on top of the selected modules. This benchmark instead measures one fp32 CPU "
        "process without sharding, so the training state (weights + grads + AdamW moments, 16 B per "
        "trainable parameter, 4 B per frozen one) is the bulk of the difference. Measured shares: "
        f"embeddings + lm_head are {100 * eh / total:.1f}% of the {total / 1e6:.1f}M parameters and "
        f"thus {100 * eh_state_share:.1f}% of the full-FT training state ({state_mb:.0f} MB), against "
        f"{100 * paper_eh_share:.1f}% for Llama-3-8B; block matrices are "
        f"{100 * full['block_matrix_params'] / total:.1f}%, norms {100 * full['norm_params'] / total:.2f}%. "
        "Freezing embeddings and head (freeze()'s default) therefore removes a much larger slice here "
        f"than on an 8B model: training state -{s50['training_state_reduction_pct']:.1f}% / "
        f"-{s25['training_state_reduction_pct']:.1f}%; with embeddings and head trainable as in the "
        f"paper it would be -{with_eh['50']:.1f}% / -{with_eh['25']:.1f}% (computed: +12 B per "
        "parameter). In peak RSS of the full-FT process "
        f"({peak:.0f} MB), {base:.0f} MB ({100 * base / peak:.0f}%) is the interpreter with torch and "
        f"transformers imported before any model exists, {state_mb:.0f} MB ({100 * state_mb / peak:.0f}%) "
        f"the training state, and {other:.0f} MB ({100 * other / peak:.0f}%) activations, autograd "
        "buffers, loader transients and allocator slack (batch 4 x 128 tokens is small, so activations "
        "are a minor part here, unlike the paper's long sequences); the fixed import baseline is why the "
        f"RSS reductions (-{s50['peak_rss_reduction_pct']:.1f}% / -{s25['peak_rss_reduction_pct']:.1f}%) "
        "are smaller than the state reductions. Step time: frozen modules skip their weight-gradient "
        "matmuls and AdamW updates, but backward must still reach the lowest layer holding a trainable "
        f"module (layer {lowest['50']} / {lowest['25']} here; from there up every "
        "layer's input-gradient matmuls remain), and the forward pass and the lm_head logits over an "
        f"{LLAMA_CONFIG['vocab_size']}-token vocabulary are paid by every configuration: speedup "
        f"x{s50['speedup_vs_full']:.2f} / x{s25['speedup_vs_full']:.2f} in wall time, "
        f"x{s50['cpu_time_speedup_vs_full']:.2f} / x{s25['cpu_time_speedup_vs_full']:.2f} in process CPU "
        f"time, on {THREADS} CPU threads (the "
        "paper reports 37% less time on GPUs with ZeRO-3, where smaller gradient reductions also save "
        "communication). Medians over few steps on a shared CPU are noisy"
        + (f"; the 1-minute load average was {load[0]:.1f} before and {load[1]:.1f} after the run on "
           f"{os.cpu_count()} CPUs" if load else "") + "."
    )


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\nmachine: {m['cpu_model']}, {m['cpu_count']} CPUs; {m['platform']}")
    c = report["model"]
    print(f"model: Llama {c['config']['num_hidden_layers']} layers, hidden {c['config']['hidden_size']}, "
          f"vocab {c['config']['vocab_size']}, {c['total_params'] / 1e6:.1f}M params fp32; "
          f"AdamW, batch {BATCH} x {SEQ_LEN}, {report['steps']} steps (first is warm-up); "
          f"load average {m['loadavg_1min_before']} before, {m['loadavg_1min_after']} after\n")
    head = (f"{'config':12s}{'trainable':>16s}{'grads MB':>10s}{'optim MB':>10s}{'weights MB':>11s}"
            f"{'state MB':>10s}{'state -%':>9s}{'peak RSS MB':>12s}{'RSS -%':>8s}{'wall s':>8s}{'speedup':>9s}"
            f"{'cpu s':>8s}{'speedup':>9s}")
    print(head)
    print("-" * len(head))
    for name, s in report["configs"].items():
        print(f"{name:12s}{s['trainable_params'] / 1e6:8.2f}M ({100 * s['trainable_fraction']:4.1f}%)"
              f"{s['grad_bytes'] / MB:10.1f}{s['optimizer_bytes'] / MB:10.1f}{s['weight_bytes'] / MB:11.1f}"
              f"{s['training_state_mb']:10.1f}{s['training_state_reduction_pct']:9.1f}"
              f"{s['peak_rss_mb']:12.0f}{s['peak_rss_reduction_pct']:8.1f}"
              f"{s['median_step_s']:8.3f}{s['speedup_vs_full']:8.2f}x"
              f"{s['median_step_cpu_s']:8.3f}{s['cpu_time_speedup_vs_full']:8.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"result file (default {DEFAULT_JSON})")
    ap.add_argument("--steps", type=int, default=10, help="training steps per configuration; the first is warm-up")
    ap.add_argument("--device", default="cpu", help="torch device for training (cuda: also records "
                    "torch.cuda.max_memory_allocated per configuration)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is warm-up and not timed)")

    if args.child:
        kind, workdir, *rest = args.child
        if kind == "build":
            child_build(Path(workdir))
        else:
            config, out = rest
            child_train(Path(workdir), config, args.steps, Path(out))
        return 0

    os.environ["SPECTRUM_BENCH_DEVICE"] = args.device  # read by the training children
    t_start = time.perf_counter()
    load_before = _loadavg()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="spectrum_fast_freeze_bench_") as tmp:
        workdir = Path(tmp)
        print("building and scanning the checkpoint ...", file=sys.stderr)
        run_child(["build", str(workdir)], args.steps)
        for config in CONFIGS:
            out = workdir / f"{config}.json"
            run_child(["train", str(workdir), config, str(out)], args.steps)
            runs[config] = json.loads(out.read_text())
            r = runs[config]
            print(f"  {config:11s} trainable {r['trainable_params']:>11,}  peak RSS {r['peak_rss_mb']:6.0f} MB  "
                  f"steps {', '.join(f'{t:.2f}' for t in r['step_times_s'])} s", file=sys.stderr)
        ckpt_bytes = sum(f.stat().st_size for f in (workdir / "model").glob("*.safetensors"))

    import resource

    load_after = _loadavg()
    load = (load_before, load_after) if load_before is not None and load_after is not None else None
    failures = check(runs, args.steps)
    summary = summarize(runs)
    full = runs["full"]
    report = {
        "benchmark": "freeze_memory",
        "machine": {**machine_info(), "loadavg_1min_before": load_before, "loadavg_1min_after": load_after},
        "versions": library_versions(),
        "model": {"config": LLAMA_CONFIG, "dtype": "float32", "seed": SEED, "signal_rank": SIGNAL_RANK,
                  "checkpoint_mb": round(ckpt_bytes / MB, 1), "total_params": full["total_params"],
                  "embed_head_params": full["embed_head_params"], "norm_params": full["norm_params"],
                  "block_matrix_params": full["block_matrix_params"]},
        "training": {"optimizer": "torch.optim.AdamW", "lr": LR, "batch": BATCH, "seq_len": SEQ_LEN,
                     "loss": "causal LM (labels = input_ids)", "torch_threads": THREADS},
        "steps": args.steps,
        "configs": summary,
        "notes": notes(runs, summary, load),
        # Children start from the parent's peak RSS, so it must stay well below theirs.
        "parent_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "checks_passed": not failures,
        "check_failures": failures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\n{report['notes']}\n\nwrote {args.json} ({report['wall_s']} s)")
    if failures:
        print("FAIL:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

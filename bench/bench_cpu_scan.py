"""CPU benchmark: ``spectrum_fast.scan`` against the reference method on a synthetic Llama checkpoint.

The reference method is what the Spectrum tool does: load the whole model with ``transformers`` in
float32, then ``torch.linalg.svdvals`` every block matrix and apply the SNR formula (SPEC.md §1).
Each side runs in its own fresh Python process, timed from spawn to exit (interpreter start, imports
and loading included, as a user would experience it), with its peak RSS taken from ``wait4`` for that
one process. The page cache is warmed before every measured run so neither side pays for the disk.

The benchmark checks its own result: the selections at ``top=0.5`` and ``top=0.25`` must be the same
(the reference's selection is recomputed here from its SNRs with the SPEC §3 rule, independently of
the library), and the largest relative SNR difference is reported. Exit status 1 if they differ.

    python bench/bench_cpu_scan.py [--workdir DIR] [--json OUT.json] [--repeat N]

Only the standard library is imported at module level: the same file is the entry point of both
child processes, and neither should pay for the other's imports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _machine import machine_info  # bench/ is on sys.path when a script there runs

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = Path("/tmp/spectrum_fast_bench")
DEFAULT_JSON = HERE / "results" / "cpu_scan.json"
TOPS = (0.5, 0.25)
GOAL_SPEEDUP = 3.0
GOAL_RSS_RATIO = 1.0 / 3.0

# Bump when the checkpoint recipe changes, so a cached checkpoint from an older recipe is rebuilt.
CHECKPOINT_RECIPE = 1
SEED = 1234
LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


# --------------------------------------------------------------------------------------------------
# Names and selection (SPEC.md §2, §3), written out here so the check does not trust the library.
# --------------------------------------------------------------------------------------------------

def _first_numeric(parts: list[str]) -> int | None:
    return next((i for i, p in enumerate(parts) if p.isdigit()), None)


def scanned_module(param_name: str, ndim: int) -> str | None:
    """The module name of a parameter the scan covers (2-D ``*.weight`` in a numbered block), else None."""
    if ndim != 2 or not param_name.endswith(".weight"):
        return None
    if _first_numeric(param_name.split(".")) is None:
        return None
    return param_name[: -len(".weight")]


def module_type(module: str) -> str:
    parts = module.split(".")
    i = _first_numeric(parts)
    assert i is not None
    return ".".join(parts[i + 1:])


def reference_selection(snrs: dict[str, float], top: float) -> set[str]:
    """Per type: sort by SNR descending, ties by name, keep the first ``floor(len * top)``; never NaN."""
    groups: dict[str, list[str]] = {}
    for module in snrs:
        groups.setdefault(module_type(module), []).append(module)
    chosen: set[str] = set()
    for members in groups.values():
        keep = math.floor(len(members) * top + 1e-9)  # 1e-9: 0.3 * 10 must give 3, not 2
        ranked = sorted((m for m in members if not math.isnan(snrs[m])), key=lambda m: (-snrs[m], m))
        chosen.update(ranked[:keep])
    return chosen


def tightest_cut(snrs: dict[str, float], top: float) -> float | None:
    """Smallest relative SNR gap between the last kept and first dropped module of any type.

    Tells how much numerical slack the selection has: a gap near 1e-5 would make a selection
    mismatch a matter of rounding rather than a bug.
    """
    groups: dict[str, list[float]] = {}
    for module, snr in snrs.items():
        groups.setdefault(module_type(module), []).append(snr)
    gaps = []
    for values in groups.values():
        keep = math.floor(len(values) * top + 1e-9)
        ranked = sorted(values, reverse=True)
        if 0 < keep < len(ranked):
            gaps.append((ranked[keep - 1] - ranked[keep]) / abs(ranked[keep - 1]))
    return min(gaps) if gaps else None


# --------------------------------------------------------------------------------------------------
# Synthetic checkpoint
# --------------------------------------------------------------------------------------------------

def build_checkpoint(model_dir: Path) -> None:
    """A randomly initialised Llama whose block matrices carry a low-rank signal, saved in bf16.

    Pure Gaussian matrices have no singular values above the Marchenko-Pastur edge, so every SNR
    would be about the same and the selection would be decided by noise. Adding a few spikes of
    decaying strength, with a strength and rank drawn per layer and matrix, spreads the SNRs the way
    trained weights do, and puts some singular values near ``tau``, where the fast path's guard must
    work. Everything is drawn from seeded generators, so the checkpoint is the same on every machine
    with the same torch version.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(**LLAMA_CONFIG)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    n_layers = config.num_hidden_layers
    # One strength per layer, so whole layers rank differently (as in trained models) ...
    layer_scale = 0.6 + 3.0 * torch.rand(n_layers, generator=gen)
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = scanned_module(name, p.ndim)
            if module is None:
                continue
            layer = int(name.split(".")[_first_numeric(name.split("."))])  # type: ignore[index]
            m, n = p.shape
            # ... jittered per matrix, so no two matrices of a type tie.
            scale = float(layer_scale[layer]) * (0.8 + 0.4 * float(torch.rand((), generator=gen)))
            rank = int(torch.randint(8, 33, (), generator=gen))
            # Bulk edge of the Gaussian init: std * (sqrt(m) + sqrt(n)). Spikes start above it and
            # decay geometrically, so the weakest ones sit near or under the edge.
            edge = float(p.std()) * (math.sqrt(m) + math.sqrt(n))
            strengths = scale * edge * 0.85 ** torch.arange(rank, dtype=torch.float32)
            u = torch.linalg.qr(torch.randn(m, rank, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0]
            p.add_((u * strengths) @ v.T)
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)


def ensure_checkpoint(workdir: Path) -> Path:
    """The cached checkpoint directory, built on first use (atomically, so a crash leaves no half)."""
    model_dir = workdir / f"llama-synthetic-r{CHECKPOINT_RECIPE}"
    stamp = model_dir / "bench_recipe.json"
    recipe = {"recipe": CHECKPOINT_RECIPE, "seed": SEED, "config": LLAMA_CONFIG}
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return model_dir
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"building the synthetic checkpoint in {model_dir} (once) ...", file=sys.stderr)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        staging = Path(tmp) / "model"
        # In a child process: Linux carries a process's peak RSS over into the programs it starts
        # (the high-water mark survives fork and exec), so a parent that once held the model in
        # memory would inflate every later measurement. The parent stays small instead.
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "build", str(staging), "-"],
                       check=True)
        (staging / "bench_recipe.json").write_text(json.dumps(recipe))
        if model_dir.exists():
            import shutil

            shutil.rmtree(model_dir)
        staging.rename(model_dir)
    print(f"  built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model_dir


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def warm_page_cache(model_dir: Path) -> None:
    """Read every weight file once so both sides find them in the page cache."""
    # A small reused buffer: the parent's own peak RSS is a floor for its children's (see above).
    buf = bytearray(4 << 20)
    for f in weight_files(model_dir):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# --------------------------------------------------------------------------------------------------
# Child processes (run as `python bench_cpu_scan.py --child {reference,ours} MODEL_DIR OUT.json`;
# `--child build DIR -` builds the checkpoint)
# --------------------------------------------------------------------------------------------------

def child_reference(model_dir: Path, out: Path) -> None:
    """The reference method: whole model in float32, torch SVD of every block matrix."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    t_import = time.perf_counter()
    # `dtype` is the current name of the former `torch_dtype` argument (kept only as a deprecated alias).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t_load = time.perf_counter()
    snrs: dict[str, float] = {}
    slowest = (0.0, "")
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = scanned_module(name, p.ndim)
            if module is None:
                continue
            t_matrix = time.perf_counter()
            w = p.detach().float()
            s = torch.linalg.svdvals(w)
            q75, q25 = torch.quantile(s, torch.tensor([0.75, 0.25], dtype=s.dtype))
            sigma = (q75 - q25) / 1.349
            m, n = w.shape
            tau = sigma * (1 + math.sqrt(min(m, n) / max(m, n)))
            signal = s[s > tau].sum()
            below = s[s <= tau]
            noise = below.sum() if below.numel() else torch.tensor(1.0)
            snrs[module] = float((signal / noise) / s.max())
            slowest = max(slowest, (time.perf_counter() - t_matrix, module))
    t_done = time.perf_counter()
    _write_child(out, snrs, {"import_s": t_import - t0, "load_s": t_load - t_import,
                             "compute_s": t_done - t_load, "slowest_matrix_s": slowest[0],
                             "slowest_matrix": slowest[1], "torch_threads": torch.get_num_threads()})


def child_ours(model_dir: Path, out: Path) -> None:
    """spectrum_fast's streamed scan, plus its own selections (checked against the reference's)."""
    t0 = time.perf_counter()
    import spectrum_fast

    t_import = time.perf_counter()
    result = spectrum_fast.scan(model_dir, progress=False)
    t_done = time.perf_counter()
    methods: dict[str, int] = {}
    for r in result.records:
        methods[str(r.method)] = methods.get(str(r.method), 0) + 1
    _write_child(out, {r.module: r.snr for r in result.records},
                 {"import_s": t_import - t0, "compute_s": t_done - t_import, "methods": methods,
                  "selections": {str(top): result.select(top=top).modules for top in TOPS}})


def _write_child(out: Path, snrs: dict[str, float], info: dict[str, Any]) -> None:
    import resource

    info["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps({"snr": snrs, "info": info}))


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One measured child process."""

    wall_s: float
    peak_rss_mb: float
    snr: dict[str, float]
    info: dict[str, Any]


def run_child(kind: str, model_dir: Path, scratch: Path) -> Run:
    """Spawn one child, time it spawn-to-exit, and take its peak RSS from ``wait4`` (this child only)."""
    out = scratch / f"{kind}.json"
    log = scratch / f"{kind}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(model_dir), str(out)]
    with open(log, "wb") as log_fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT)
        # wait4 instead of proc.wait(): RUSAGE_CHILDREN would report the max over every child so far.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped; keep Popen from waiting again
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed (exit {proc.returncode}); its output:\n{log.read_text()[-4000:]}")
    data = json.loads(out.read_text())
    return Run(wall, usage.ru_maxrss / 1024, data["snr"], data["info"])


def warm_imports() -> None:
    """Load both sides' libraries once so that neither measured run pays for a cold disk."""
    subprocess.run([sys.executable, "-c", "import torch, transformers, spectrum_fast, scipy.linalg"],
                   check=True)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("spectrum_fast", "torch", "transformers", "numpy", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def compare(ref: Run, ours: Run) -> dict[str, Any]:
    """Selections and SNR agreement; the reference's selection comes from the SPEC rule, not the library."""
    if set(ref.snr) != set(ours.snr):
        only_ref, only_ours = sorted(set(ref.snr) - set(ours.snr)), sorted(set(ours.snr) - set(ref.snr))
        return {"modules_equal": False, "only_reference": only_ref, "only_ours": only_ours,
                "selections_equal": False}
    rel = {m: abs(ours.snr[m] - ref.snr[m]) / abs(ref.snr[m]) for m in ref.snr}
    worst = max(rel, key=rel.__getitem__)
    selections = {}
    for top in TOPS:
        want = reference_selection(ref.snr, top)
        got = set(ours.info["selections"][str(top)])
        selections[str(top)] = {"equal": want == got, "n_selected": len(want),
                                "missing": sorted(want - got), "extra": sorted(got - want),
                                "tightest_cut_rel_gap": tightest_cut(ref.snr, top)}
    return {"modules_equal": True, "n_modules": len(ref.snr), "max_rel_snr_diff": rel[worst],
            "max_rel_snr_diff_module": worst,
            "selections": selections, "selections_equal": all(s["equal"] for s in selections.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"where the synthetic checkpoint is cached (default {DEFAULT_WORKDIR})")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"result file (default {DEFAULT_JSON})")
    ap.add_argument("--repeat", type=int, default=1, help="measured runs per side; the minimum counts")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        kind, model_dir, out = args.child
        if kind == "build":
            build_checkpoint(Path(model_dir))
        else:
            {"reference": child_reference, "ours": child_ours}[kind](Path(model_dir), Path(out))
        return 0
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    model_dir = ensure_checkpoint(args.workdir)
    ckpt_bytes = sum(f.stat().st_size for f in weight_files(model_dir))
    warm_imports()
    runs: dict[str, list[Run]] = {"reference": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="spectrum_fast_bench_") as tmp:
        for i in range(args.repeat):
            # Alternate the sides so that drift (thermal, other load) hits both alike.
            for kind in ("reference", "ours"):
                warm_page_cache(model_dir)
                run = run_child(kind, model_dir, Path(tmp))
                print(f"  run {i + 1}/{args.repeat} {kind:9s}: {run.wall_s:7.2f} s, "
                      f"{run.peak_rss_mb:7.0f} MB peak RSS", file=sys.stderr)
                runs[kind].append(run)
    # Minimum over repeats: the least disturbed run of each side (its SNRs are identical every time).
    ref = min(runs["reference"], key=lambda r: r.wall_s)
    ours = min(runs["ours"], key=lambda r: r.wall_s)
    ref_rss = min(r.peak_rss_mb for r in runs["reference"])
    our_rss = min(r.peak_rss_mb for r in runs["ours"])

    import resource

    # Children start from the parent's peak RSS (see ensure_checkpoint), so it must stay below theirs.
    parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    check = compare(ref, ours)
    speedup = ref.wall_s / ours.wall_s
    rss_ratio = our_rss / ref_rss
    report = {
        "benchmark": "cpu_scan",
        "machine": machine_info(),
        "versions": library_versions(),
        "checkpoint": {"path": str(model_dir), "bytes": ckpt_bytes, "mb": round(ckpt_bytes / 2**20, 1),
                       "dtype": "bf16", "config": LLAMA_CONFIG, "recipe": CHECKPOINT_RECIPE},
        "repeat": args.repeat,
        "parent_peak_rss_mb": round(parent_rss, 1),
        "reference": {"method": "transformers from_pretrained(float32) + torch.linalg.svdvals",
                      "wall_s": round(ref.wall_s, 3), "peak_rss_mb": round(ref_rss, 1),
                      "all_wall_s": [round(r.wall_s, 3) for r in runs["reference"]],
                      "breakdown": _rounded(ref.info)},
        "ours": {"method": "spectrum_fast.scan(progress=False)",
                 "wall_s": round(ours.wall_s, 3), "peak_rss_mb": round(our_rss, 1),
                 "all_wall_s": [round(r.wall_s, 3) for r in runs["ours"]],
                 "breakdown": _rounded({k: v for k, v in ours.info.items() if k != "selections"})},
        "speedup": round(speedup, 3),
        "rss_ratio": round(rss_ratio, 4),
        "goals": {"speedup_min": GOAL_SPEEDUP, "rss_ratio_max": round(GOAL_RSS_RATIO, 4),
                  "speedup_met": speedup >= GOAL_SPEEDUP, "rss_ratio_met": rss_ratio <= GOAL_RSS_RATIO},
        "check": check,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {args.json}")
    if not check["selections_equal"]:
        print("FAIL: the selections differ from the reference's", file=sys.stderr)
        return 1
    return 0


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def print_table(r: dict[str, Any]) -> None:
    m, c, g = r["machine"], r["check"], r["goals"]
    print(f"\nmachine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['mem_gib']} GiB; {m['platform']}")
    print(f"checkpoint: synthetic Llama ({r['checkpoint']['mb']} MB bf16), "
          f"{c.get('n_modules', '?')} block matrices; runs per side: {r['repeat']} (min)\n")
    print(f"{'':12s}{'wall s':>10s}{'peak RSS MB':>14s}")
    for side in ("reference", "ours"):
        print(f"{side:12s}{r[side]['wall_s']:10.2f}{r[side]['peak_rss_mb']:14.0f}")
    ok = {True: "met", False: "NOT met"}
    print(f"\nspeedup   {r['speedup']:8.2f}x   goal >= {g['speedup_min']:g}x     {ok[g['speedup_met']]}")
    print(f"rss ratio {r['rss_ratio']:8.3f}    goal <= {g['rss_ratio_max']:.3f}    {ok[g['rss_ratio_met']]}")
    if c["modules_equal"]:
        print(f"max rel SNR diff {c['max_rel_snr_diff']:.2e} ({c['max_rel_snr_diff_module']})")
        for top, s in c["selections"].items():
            gap = s["tightest_cut_rel_gap"]
            gap_txt = "n/a" if gap is None else f"{gap:.1e}"
            print(f"selection top={top}: {'identical' if s['equal'] else 'DIFFERENT'} "
                  f"({s['n_selected']} modules; tightest cut gap {gap_txt})"
                  + ("" if s["equal"] else f" missing {s['missing']} extra {s['extra']}"))
    else:
        print(f"module sets differ: only reference {c['only_reference']}, only ours {c['only_ours']}")


if __name__ == "__main__":
    sys.exit(main())

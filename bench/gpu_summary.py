"""What a device run decided, from the files `bench/gpu_check.sh` leaves in its results folder: tests, the
two-stage solver against `Dsyevd` per size, the fastest chase variant, bands per multiprocessor and crews,
the Mistral-shaped scan against the issue's goals, the 100B+ extrapolations, the disk read-ahead and the
sanitizers. Every line names the file and field it comes from; a missing file or field says so.

    python bench/gpu_summary.py /tmp/gpu_check_out

`gpu_check.sh` prints it at the end of each call, so the call's output tail carries the verdicts. The settings
it suggests are the defaults to change in the source (`twostage.CHASE_VARIANT`, `DeviceBands.BLOCKS_PER_SM`,
`twostage.CREWS`, `cuda_engine.WARM_THREADS`, `cuda_engine.twostage_mode`'s and `cuda_engine.syevd_algorithm`'s
defaults). `python bench/gpu_summary.py --route GPU_CHECK_JSON TWOSTAGE_JSON` prints the float64 route the
scale stage takes (SPECTRUM_FAST_TWOSTAGE: `gpu` or `0`).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_twostage import usable


def _goal(row: dict, met_key: str, seconds: bool = False) -> str:
    """", goal met" (or NOT met; with ``seconds``, ", goal N s met") by ``row[met_key]``, for a model with a
    goal; else nothing."""
    if "goal_s" not in row:
        return ""
    goal = f"goal {row['goal_s']:.0f} s" if seconds else "goal"
    return f", {goal} {'met' if row.get(met_key) else 'NOT met'}"


def _load(folder: Path, name: str) -> dict | None:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def tests(folder: Path) -> list[str]:
    try:
        text = (folder / "tests.log").read_text(errors="replace")
    except OSError:
        return ["tests: no tests.log"]
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    # the short summary's FAILED lines, or the failures' headers (`-rs` alone leaves FAILED lines out)
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.MULTILINE))
                    | set(re.findall(r"^_{3,} (\S+) _{3,}$", text, flags=re.MULTILINE)))
    return [f"tests: {lines[-1].strip('= ') if lines else 'no pytest summary (cut short?)'}"] + \
        [f"  failed: {name}" for name in failed]


def twostage(doc: dict | None, band: int = 32) -> tuple[list[str], dict]:
    """Lines, and the settings it suggests (empty where the data does not decide)."""
    if doc is None:
        return ["two-stage: no twostage_gpu.json"], {}
    out, settings = [], {}
    for row in doc.get("rows", []):
        k = row.get("k")
        if "error" in row:
            out.append(f"k={k}: {row['error']}")
            continue
        good = [e for e in row.get("gpu", []) if usable(e)]
        bad = [e for e in row.get("gpu", []) if e not in good]
        syevd = row.get("syevd_fp64_s")
        for e in bad:
            why = e.get("error") or f"max_err {e.get('max_err'):.1e}"
            out.append(f"k={k} b={e.get('b')} variant {e.get('variant')}: not usable ({why})")
        if not good or not syevd:
            out.append(f"k={k}: no usable two-stage entry (Dsyevd {syevd} s)")
            continue
        best = min(good, key=lambda e: e["s_per_matrix"])
        out.append(f"k={k}: Dsyevd {syevd:.4f} s; best two-stage b={best['b']} variant {best['variant']} "
                   f"{best['s_per_matrix']:.4f} s/matrix (stage 1 {best['stage1_s_per_matrix']:.4f}, stages 2-3 "
                   f"{best['stage23_s_per_matrix']:.4f}; a launch of {best['launch']}: {best['stage23_launch_s']:.2f} s), "
                   f"{syevd / best['s_per_matrix']:.1f}x, err {best['max_err']:.1e}")
        settings.setdefault("twostage_wins", {})[k] = syevd / best["s_per_matrix"] > 1.0
        if len(good) > 1:
            out.append("  variants: " + ", ".join(f"b={e['b']}/v{e['variant']} {e['s_per_matrix']:.4f}"
                                                  for e in sorted(good, key=lambda e: e["s_per_matrix"])))
        sweep = [s for s in row.get("launch_sweep", []) if isinstance(s, dict) and "s_per_matrix" in s]
        if sweep:
            fastest = min(sweep, key=lambda s: s["s_per_matrix"])
            out.append("  bands per launch: " + ", ".join(f"{s['launch']}: {s['launch_s']:.2f} s" for s in sweep)
                       + f" (held per SM {sweep[0].get('held_per_sm')})")
            settings["launch_per_sm_fastest"] = fastest["launch"]
        crews = [c for c in row.get("crews_sweep", []) if isinstance(c, dict) and "s_per_matrix" in c]
        if crews:
            out.append("  crews: " + ", ".join(f"{c['crews']}: {c['s_per_matrix']:.5f} s/matrix" for c in crews))
            settings["crews_sweep"] = {c["crews"]: c["s_per_matrix"] for c in crews}
        if isinstance(row.get("stage3_launch_s"), float):
            out.append(f"  bisection alone, one launch: {row['stage3_launch_s']:.2f} s")
    compared = {e.get("variant") for row in doc.get("rows", []) for e in row.get("gpu", []) if e.get("b") == band}
    if "best_variant" in doc and len(compared) > 1:
        settings["chase_variant"] = doc["best_variant"]
        out.append(f"fastest chase variant at b={band}: {doc['best_variant']} (twostage.CHASE_VARIANT)")
    elif "best_variant" in doc:  # a fresh machine's scale stage measures one variant only
        out.append(f"chase variant {doc['best_variant']} at b={band} (the only one measured: no comparison)")
    return out, settings


def syevd(doc: dict | None) -> tuple[list[str], dict]:
    """cuSOLVER's Xsyevd algorithms per k (bench_gpu.py's syevd part), and the choice it made."""
    part = (doc or {}).get("syevd")
    if part is None:
        return ["Xsyevd algorithms: no gpu_check.json syevd"], {}
    if "error" in part:
        return [f"Xsyevd algorithms: {part['error']}"], {}
    out = [f"Xsyevd algorithms (cuSOLVER {part.get('cusolver')}, built with {part.get('cusolver_built')}):"]
    by_k: dict = {}
    for r in part.get("rows", []):
        key = (r["k"], "fp64" if r["fp64"] else "fp32")
        by_k.setdefault(key, []).append(f"alg {r['alg']} " + (f"{r['s']:.4f} s (diff {r['max_rel_diff_vs_alg0_fp64']:.1e})"
                                                              if "s" in r else r.get("error", "?")))
    out += [f"  k={k} {prec}: " + "; ".join(v) for (k, prec), v in sorted(by_k.items())]
    out.append(f"  choice: SPECTRUM_FAST_SYEVD_ALG={part.get('choice')} (cuda_engine.syevd_algorithm's default if not 0)")
    return out, ({"syevd_alg": part["choice"]} if part.get("choice", "0") != "0" else {})


def _mistral_goals(s: float, ref: float | None, loop: float | None) -> list[str]:
    goals = [("under 10 s", s < 10)]
    if ref:
        goals.append((f">= 20x reference ({ref / s:.1f}x)", ref / s >= 20))
    if loop:
        goals.append((f">= 2x torch loop ({loop / s:.2f}x)", loop / s >= 2))
    return [f"  goal {name}: {'met' if ok else 'NOT met'}" for name, ok in goals]


def mistral(doc: dict | None) -> list[str]:
    if doc is None or "end_to_end" not in doc:
        return ["Mistral-7B shapes: no gpu_check.json end_to_end"]
    e = doc["end_to_end"]
    ref = e.get("reference_svdvals_scaled_to_32_layers_s")
    loop = e.get("torch_gram_eigvalsh_loop_s")
    out = [(f"Mistral-7B shapes, syevd route (SPECTRUM_FAST_SYEVD_ALG={e.get('syevd_alg', '0')}): {e.get('ours_s')} s; "
           f"reference {ref} s; torch loop {loop} s")]
    if "ours_default_syevd_s" in e:
        out.append(f"  with cuSOLVER's default algorithm: {e['ours_default_syevd_s']:.2f} s "
                   f"({e.get('speedup_vs_default_syevd', 0):.2f}x), SNRs within {e.get('max_snr_rel_diff_vs_default_syevd')}, "
                   f"selections equal {e.get('selections_equal_to_default_syevd')}")
    if isinstance(e.get("ours_s"), (int, float)):
        out += _mistral_goals(e["ours_s"], ref, loop)
    two = e.get("twostage", {})
    if "s" not in two:
        return out + [f"  two-stage route: {two.get('error', 'not measured')}"]
    s = two["s"]
    out.append(f"  two-stage route: {s:.2f} s, SNRs within {two.get('max_snr_rel_diff_vs_syevd_route')} of the syevd "
               f"route, selections equal {two.get('selections_equal')}, x floor {two.get('vs_floor')}")
    return out + _mistral_goals(s, ref, loop)


def route(gpu_check: dict | None, twostage_doc: dict | None) -> str:
    """The float64 route for the 100B+ scans: ``"gpu"`` (SPECTRUM_FAST_TWOSTAGE=gpu, the native band solver) or
    ``"0"`` (the engine's Xsyevd with the chosen algorithm), whichever took less per matrix at the largest k
    both measured; the band solver where the Xsyevd algorithms were not compared (as before they existed)."""
    part = (gpu_check or {}).get("syevd") or {}
    choice = part.get("choice", "0")
    alg = int(choice.split(":")[0])
    syevd_s = {r["k"]: r["s"] for r in part.get("rows", []) if r.get("fp64") and r.get("alg") == alg and "s" in r}
    band_s = {}
    for row in (twostage_doc or {}).get("rows", []):
        good = [e for e in row.get("gpu", []) if usable(e)]
        if good:
            band_s[row["k"]] = min(e["s_per_matrix"] for e in good)
    both = sorted(set(syevd_s) & set(band_s))
    if not both:
        return "0" if syevd_s and not band_s and choice != "0" else "gpu"
    return "gpu" if band_s[both[-1]] < syevd_s[both[-1]] else "0"


def scale(doc: dict | None) -> tuple[list[str], dict]:
    if doc is None:
        return ["100B+: no scale_gpu.json"], {}
    rates = doc.get("rates", {})
    out, settings = [], {}
    seq, ahead = rates.get("disk_sequential_Bps"), rates.get("disk_readahead_Bps")
    if seq and ahead:
        out.append(f"disk: {seq / 1e9:.2f} GB/s one stream, {ahead / 1e9:.2f} GB/s as the read-ahead reads "
                   f"({ahead / seq:.2f}x; WARM_THREADS {'stays' if ahead >= seq else 'back to 1'})")
        settings["warm_threads_help"] = ahead >= seq
    for m in doc.get("models", []):
        if "error" in m:
            out.append(f"{m.get('model')}: {m['error']}")
            continue
        e2e = m.get("e2e", {})
        steady = e2e.get("steady", {})
        e2e_text = ""
        if "measured_s" in e2e:
            e2e_text = (f"; end to end over {m.get('layers_generated')} layers {e2e['measured_s']:.1f} s against "
                        f"{e2e['predicted_s']:.1f} s predicted")
            if "full_scan_estimate_s" in e2e:
                e2e_text += (f"; the whole model at that overlap {e2e['full_scan_estimate_s']:.0f} s"
                             + _goal(m, "meets_goal_with_measured_overlap"))
        elif "error" in e2e:
            e2e_text = f"; end to end: {e2e['error']}"
        if "full_scan_estimate_s" in steady:
            e2e_text += (f"; {steady['copies']}x the generated layers {steady['measured_s']:.1f} s: the whole model "
                         f"at that rate {steady['full_scan_estimate_s']:.0f} s" + _goal(m, "meets_goal_steady"))
        floor = m.get("floors", {}).get("floor_s")
        out.append(f"{m.get('model')}: extrapolated {m.get('extrapolated_s', float('nan')):.0f} s (floor "
                   f"{floor if floor is None else round(floor)} s){_goal(m, 'meets_goal', seconds=True)}{e2e_text}")
    return out, settings


def sanitizers(folder: Path) -> list[str]:
    try:
        text = (folder / "sanitize.log").read_text(errors="replace")
    except OSError:
        return ["sanitizers: no sanitize.log"]
    # tool -> verdict, from the step's header, the tool's summary (memcheck and synccheck: ERROR SUMMARY;
    # racecheck: RACECHECK SUMMARY) and the step's exit status (a summary of 0 with a failing program is no pass)
    verdicts: dict[str, str] = {}
    tool = None
    for line in text.splitlines():
        header = re.match(r"== .*--tool (\w+)", line)
        rc = re.match(r"== rc (\d+)\b", line)
        errors = re.search(r"ERROR SUMMARY: (\d+) errors?", line)
        races = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", line)
        if header:
            tool = header.group(1)
            verdicts[tool] = "no summary"
        elif tool is None:
            continue
        elif errors:
            verdicts[tool] = f"{errors.group(1)} errors"
        elif races:
            verdicts[tool] = f"{races.group(1)} hazards ({races.group(2)} errors, {races.group(3)} warnings)"
        elif rc and rc.group(1) in ("124", "137") and verdicts[tool] == "no summary":
            verdicts[tool] = "no verdict (out of time?)"
        elif rc and rc.group(1) != "0":
            verdicts[tool] += f", exit status {rc.group(1)}"
    out = [f"sanitizer {name}: {verdict}" for name, verdict in verdicts.items()]
    return out or ["sanitizers: none ran"]


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["--route"]:  # gpu_check.sh: SPECTRUM_FAST_TWOSTAGE for the scale stage
        gpu_check, twostage_json = (Path(a) for a in args[1:3])
        print(route(_load(gpu_check.parent, gpu_check.name), _load(twostage_json.parent, twostage_json.name)))
        return 0
    folder = Path(args[0] if args else "/tmp/gpu_check_out")
    lines = tests(folder)
    two_lines, settings = twostage(_load(folder, "twostage_gpu.json"))
    syevd_lines, syevd_settings = syevd(_load(folder, "gpu_check.json"))
    settings.update(syevd_settings)
    lines += two_lines + syevd_lines + mistral(_load(folder, "gpu_check.json"))
    scale_lines, scale_settings = scale(_load(folder, "scale_gpu.json"))
    lines += scale_lines + sanitizers(folder)
    settings.update(scale_settings)
    print("\n".join(["== summary (bench/gpu_summary.py)"] + lines + [f"settings: {json.dumps(settings, default=str)}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

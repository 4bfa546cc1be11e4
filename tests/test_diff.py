"""``python -m spectrum_fast.diff A B``: exact changes, selection churn and rank correlations, checked independently."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from spectrum_fast import MatrixRecord, ScanResult
from spectrum_fast.compare import ENTER_COLOR, ScanDiff, change, diff, main, render_diff, spearman

from .conftest import REFERENCE_RESULTS, ref_select

needs_reference = pytest.mark.skipif(not REFERENCE_RESULTS.is_dir(), reason="../shared/reference-results not present")
DOWN, Q = "mlp.down_proj", "self_attn.q_proj"
SNR_A = {DOWN: [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0], Q: [0.5, 0.25, 2.0, 8.0, 1.0, 4.0]}
SNR_B = {DOWN: [7.0, 2.0, math.nan, 4.5, 5.0, 0.5], Q: [0.5, 0.375, 2.0, math.inf, 1.25, 3.0, 1.0]}


def _scan(model: str, snrs: dict[str, list[float]]) -> ScanResult:
    recs = [MatrixRecord(f"model.layers.{i}.{t}", t, s, status="ok" if not math.isnan(s) else "nonfinite")
            for t, values in snrs.items() for i, s in enumerate(values)]
    return ScanResult(model, model.replace("/", "-"), recs)


def _maps(res: ScanResult) -> tuple[dict[str, float], dict[str, str]]:
    return {r.module: r.snr for r in res.records}, {r.module: r.type for r in res.records}


@pytest.fixture
def ab() -> tuple[ScanResult, ScanResult]:
    return _scan("org/base", SNR_A), _scan("org/tuned", SNR_B)


def test_changes_are_exact(ab):
    a, b = ab
    d = diff(a, b, top=0.5)
    assert d.only_a == ["model.layers.6.mlp.down_proj"] and d.only_b == ["model.layers.6.self_attn.q_proj"]
    assert len(d.changes) == 12
    for c in d.changes:
        t, i = c.type, int(c.module.split(".")[2])
        sa, sb = SNR_A[t][i], SNR_B[t][i]
        assert (c.snr_a, c.snr_b) == (sa, sb) or math.isnan(sb)
        if math.isnan(sb):
            assert math.isnan(c.delta) and math.isnan(c.rel) and math.isnan(c.log2_ratio)
        elif math.isinf(sb):
            assert c.delta == math.inf and c.rel == math.inf and c.log2_ratio == math.inf
        else:
            assert c.delta == sb - sa and c.rel == (sb - sa) / sa and c.log2_ratio == math.log2(sb / sa)
    by = {c.module: c for c in d.changes}
    assert by["model.layers.0.mlp.down_proj"].delta == 6.0 and by["model.layers.0.mlp.down_proj"].rel == 6.0
    assert by["model.layers.1.self_attn.q_proj"].log2_ratio == math.log2(1.5)


def test_entering_and_leaving_match_the_reference_rule(ab):
    a, b = ab
    for top in (0.25, 0.5, 1.0):
        d = diff(a, b, top=top)
        sel_a, sel_b = ref_select(*_maps(a), top), ref_select(*_maps(b), top)
        both = {r.module for r in a.records} & {r.module for r in b.records}
        assert set(d.entering) == (sel_b - sel_a) & both
        assert set(d.leaving) == (sel_a - sel_b) & both
        assert {c.module for c in d.changes if c.selected_a} == sel_a & both
    d = diff(a, b, top=0.5)
    assert "model.layers.0.mlp.down_proj" in d.entering and "model.layers.5.mlp.down_proj" in d.leaving


def test_spearman_per_type_matches_scipy(ab):
    a, b = ab
    d = diff(a, b)
    for t in (DOWN, Q):
        pairs = [(x, y) for x, y in zip(SNR_A[t], SNR_B[t]) if not (math.isnan(x) or math.isnan(y))]
        xs, ys = zip(*pairs)
        assert d.spearman_n[t] == len(pairs)
        assert d.spearman[t] == pytest.approx(float(spearmanr(xs, ys).statistic), abs=1e-12)
    rng = np.random.default_rng(1)
    for n in (2, 3, 10, 200):
        x = rng.integers(0, 6, n).astype(float)  # many ties
        y = x + rng.integers(-2, 3, n)
        if np.ptp(x) and np.ptp(y):
            assert spearman(x, y) == pytest.approx(float(spearmanr(x, y).statistic), abs=1e-12)
    # undefined cases are NaN, without the warning scipy would give (warnings are errors here)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])) and math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([math.inf] * 3, [1.0, 2.0, 3.0]))


def test_change_edge_cases():
    assert change(2.0, 2.0) == (0.0, 0.0, 0.0) and change(math.inf, math.inf) == (0.0, 0.0, 0.0)
    assert change(math.inf, 4.0) == (-math.inf, -1.0, -math.inf)
    assert change(0.0, 3.0) == (3.0, math.inf, math.inf)
    assert change(3.0, 0.0) == (-3.0, -1.0, -math.inf)
    assert all(math.isnan(x) for x in change(math.nan, 1.0) + change(1.0, math.nan))


def test_identical_scans(ab):
    a, _ = ab
    d = diff(a, _scan("org/base", SNR_A))
    assert d.movers() == [] and d.entering == [] and d.leaving == [] and not d.only_a and not d.only_b
    assert all(c.delta == 0 and c.rel == 0 and c.log2_ratio == 0 for c in d.changes)
    assert d.spearman == {DOWN: 1.0, Q: 1.0}
    assert "top movers: none" in d.summary() and "0 enter, 0 leave" in d.summary()


def test_movers_order(ab):
    d = diff(*ab)
    moved = d.movers(None)
    assert moved[0].module == "model.layers.3.self_attn.q_proj"  # finite -> inf moves most
    mags = [abs(c.log2_ratio) for c in moved]
    assert mags == sorted(mags, reverse=True) and all(m > 0 for m in mags)
    assert {c.module for c in moved} == {c.module for c in d.changes
                                        if not math.isnan(c.log2_ratio) and c.log2_ratio != 0}


def test_cli_summary_and_json_round_trip(ab, tmp_path, capsys):
    a, b = ab
    pa, pb = a.save(tmp_path / "a")[0], b.save(tmp_path / "b")[1]  # ours vs the reference-compatible file
    report = tmp_path / "r" / "diff.json"
    assert main([str(pa), str(pb), "--json", str(report), "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "in both: 12; only in A: 1; only in B: 1" in out and "top movers (log2 B/A):" in out
    d = diff(pa, pb)  # the reference-compatible file keeps the slug, not the model id
    assert d.model_b == "org-tuned" and f"{len(d.entering)} enter, {len(d.leaving)} leave" in out
    assert out.count("\n  ") >= 3
    raw = json.loads(report.read_text())
    assert raw["format"] == "spectrum_fast.diff" and raw["entering"] == d.entering and raw["only_b"] == d.only_b
    back = ScanDiff.load_json(report)
    assert json.dumps(back.to_dict(), sort_keys=True) == json.dumps(d.to_dict(), sort_keys=True)
    assert "NaN" in report.read_text() and "Infinity" in report.read_text()


def test_cli_errors_are_one_line(ab, tmp_path, capsys):
    a, _ = ab
    pa = a.save(tmp_path)[1]
    assert main([str(pa), str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err and err.startswith("python -m spectrum_fast.diff: error:")
    assert main([str(pa), str(pa), "--top", "50"]) == 2
    assert "did you mean 0.5?" in capsys.readouterr().err
    assert main([str(pa), str(pa), "--out", str(tmp_path / "x.gif")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_plot_of_the_change(ab, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    d = diff(*ab)
    r = render_diff(d)
    img = imread(r.save(tmp_path / "d.png"))[..., :3]
    assert r.grid.columns == [DOWN, Q] and r.grid.layers == list(range(7))
    logs = r.cells["log2_ratio"]
    assert logs[0, 0] == math.log2(7.0) and logs[1, 0] == 0.0 and math.isnan(logs[2, 0])
    assert r.cells["degenerate"][2, 0] and not r.cells["degenerate"][6, 0]  # only in A: no ratio, not degenerate

    def centre(i, j):
        row, col = r.pixel(r.heatmap, j, i)
        return img[row - 2:row + 3, col - 2:col + 3].reshape(-1, 3).mean(axis=0)

    assert centre(0, 0)[0] > centre(0, 0)[2] + 0.3  # up: red
    assert centre(5, 0)[2] > centre(5, 0)[0] + 0.3  # down: blue
    assert np.all(centre(1, 0) > 0.9)  # unchanged: white
    assert np.ptp(centre(2, 0)) < 0.03 and centre(2, 0).max() < 0.9  # NaN on one side: grey

    green = np.array([int(ENTER_COLOR[k:k + 2], 16) / 255 for k in (1, 3, 5)])
    for i in range(6):
        for j, t in enumerate((DOWN, Q)):
            row, col = r.pixel(r.heatmap, j, i - 0.5 + 0.14)
            px = img[row - 1:row + 2, col - 1:col + 2].reshape(-1, 3)
            is_green = bool(np.any(np.abs(px - green).max(axis=1) < 0.1))
            row, col = r.pixel(r.heatmap, j, i - 0.5 + 0.26)
            is_black = bool(np.any(img[row - 1:row + 2, col - 1:col + 2].max(axis=2) < 0.1))
            m = f"model.layers.{i}.{t}"
            assert is_green == (m in d.entering) and is_black == (m in d.leaving), m
    html = r.save(tmp_path / "d.html").read_text()
    assert "data:image/png;base64," in html and "model.layers.6.self_attn.q_proj" in html and "only in B" in html


@needs_reference
def test_reference_revisions(capsys):
    a = ScanResult.load(REFERENCE_RESULTS / "snr_results_meta-llama-Meta-Llama-3-70B.json")
    b = ScanResult.load(REFERENCE_RESULTS / "snr_results_meta-llama-Meta-Llama-3.1-70B.json")
    d = diff(a, b, top=0.5)
    both = {r.module for r in a.records} & {r.module for r in b.records}
    sel_a, sel_b = ref_select(*_maps(a), 0.5), ref_select(*_maps(b), 0.5)
    assert set(d.entering) == (sel_b - sel_a) & both and set(d.leaving) == (sel_a - sel_b) & both
    assert "lm_head" in d.only_b and not d.only_a and len(d.changes) == len(a.records)
    sa, sb = _maps(a)[0], _maps(b)[0]
    names = sorted(m for m in both if a[m].type == "mlp.down_proj")
    assert d.spearman["mlp.down_proj"] == pytest.approx(
        float(spearmanr([sa[m] for m in names], [sb[m] for m in names]).statistic), abs=1e-12)
    assert math.isnan(d.spearman["model.norm"])  # a single module: no correlation

"""report compare: two unit populations against numpy/brute-force references (issue 16)."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from misbench.cli.main import cli

COLUMNS = ["layer", "unit", "status", "mis", "mis_confidence", "mis_ci_low", "mis_ci_high", "conf_ci_low",
           "conf_ci_high", "n_tasks"]


def write_scores(path, layers: dict):
    """mis.csv with given per-layer confidences (NaN = constant unit); mis = the confidence rounded to 1/20."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for layer, conf in layers.items():
            for unit, c in enumerate(conf):
                if np.isnan(c):
                    w.writerow([layer, unit, "constant", "", "", "", "", "", "", 20])
                else:
                    w.writerow([layer, unit, "ok", round(c * 20) / 20, c, "", "", "", "", 20])
    return path


def test_compare_means_rank_sum_and_balanced_means(tmp_path):
    rng = np.random.default_rng(0)
    a = {"conv1": rng.uniform(0.6, 1, 30), "conv2": np.r_[rng.uniform(0.5, 0.9, 12), np.nan]}
    b = {"sae": rng.uniform(0.4, 0.95, 40), "softmax": rng.uniform(0.3, 0.6, 5)}
    write_scores(tmp_path / "a.csv", a)
    write_scores(tmp_path / "b.csv", b)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(cli, ["report", "compare", "--scores", f"neurons={tmp_path / 'a.csv'}",
                                   "--scores", f"features={tmp_path / 'b.csv'}", "--out", str(out), "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(r["population"], r["layer"]) for r in rows] == [("neurons", "conv1"), ("neurons", "conv2"),
                                                              ("features", "sae"), ("features", "softmax")]
    for r in rows:
        ref = {**a, **b}[r["layer"]]
        ref = ref[np.isfinite(ref)]
        assert float(r["mis_confidence"]) == pytest.approx(ref.mean(), abs=1e-6)
        assert int(r["n_units"]) == len(ref)
        assert float(r["conf_ci_low"]) < ref.mean() < float(r["conf_ci_high"])
    summary = json.loads((out / "compare.json").read_text())
    neurons, features = summary["populations"]
    # layer-balanced: mean of layer means, not the pooled mean; class units (softmax) kept apart
    assert neurons["feature_mean"]["mis_confidence"] == pytest.approx(np.mean([a["conv1"].mean(), np.nanmean(a["conv2"])]))
    assert features["feature_mean"]["mis_confidence"] == pytest.approx(b["sae"].mean())
    assert features["class_mean"]["mis_confidence"] == pytest.approx(b["softmax"].mean())
    # rank-sum against a brute-force U over all pairs of non-constant units
    xa = np.r_[a["conv1"], a["conv2"][:-1]]
    xb = np.r_[b["sae"], b["softmax"]]
    u = sum((x > y) + 0.5 * (x == y) for x in xa for y in xb)
    test = summary["comparisons"][0]["rank_sum_mis_confidence"]
    assert test["u"] == pytest.approx(u) and test["n_a"] == 42 and test["n_b"] == 45
    assert test["prob_a_greater"] == pytest.approx(u / (42 * 45))
    assert 0 < test["p"] < 1e-3  # neurons are clearly higher here
    assert (out / "compare.png").stat().st_size > 1000 and "compare.png" in (out / "report.html").read_text()
    # the same page as the other reports: header, contents, figure with its SVG, CSV links, no dict dumps
    page = (out / "report.html").read_text()
    assert "<header id='header'>" in page and "<nav id='toc' " in page and "href='#compare'" in page
    assert (out / "compare.svg").exists() and 'href="compare.svg"' in page
    assert "href='compare.csv'" in page and "<pre>" not in page and "{'" not in page and '{"' not in page
    # the rank-sum test the page states is the one compare.json holds
    assert f"U={u:.4g}" in page and f"p={test['p']:.3g}" in page


def test_compare_selects_layers_and_refuses_unknown(tmp_path):
    rng = np.random.default_rng(1)
    write_scores(tmp_path / "m.csv", {"layer3": rng.uniform(0, 1, 10), "sae3": rng.uniform(0, 1, 12)})
    out = tmp_path / "cmp"
    res = CliRunner().invoke(cli, ["report", "compare", "--scores", f"ch={tmp_path / 'm.csv'}:layer3",
                                   "--scores", f"sae={tmp_path / 'm.csv'}:sae3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "compare.json").read_text())
    assert summary["comparisons"][0]["rank_sum_mis"]["n_a"] == 10
    assert summary["comparisons"][0]["rank_sum_mis"]["n_b"] == 12
    res = CliRunner().invoke(cli, ["report", "compare", "--scores", f"x={tmp_path / 'm.csv'}:nope",
                                   "--scores", f"y={tmp_path / 'm.csv'}", "--out", str(tmp_path / "cmp2")])
    assert res.exit_code != 0 and "nope" in res.output and "layer3" in res.output

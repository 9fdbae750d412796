import json
import os
import pickle
import re

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import stats

from conftest import write_acts
import misbench
from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.reports.figures import sweep_figure
from misbench.reports.importer import import_scores
from misbench.reports.stats import correlation
from misbench.reports.sweep import sweep_report
from misbench.reports.figures import DPI
from misbench.reports.tables import read_scores
from misbench.activations.store import open_activations


def test_correlation_equals_scipy_and_interval_and_p_are_one_method():
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = 0.5 * x + rng.normal(size=60)
    c = correlation(x, y, seed=3)
    ref = stats.pearsonr(x, y)
    assert c["pearson_r"] == pytest.approx(ref.statistic)
    assert c["pearson_ci"] == pytest.approx(list(ref.confidence_interval(0.95)))  # scipy's Fisher interval
    assert c["pearson_p"] == pytest.approx(2 * stats.norm.sf(abs(np.arctanh(ref.statistic)) * np.sqrt(57)))
    assert c["pearson_p"] == pytest.approx(ref.pvalue, rel=0.5)  # close to the exact t-test's
    assert c["spearman_rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert c["spearman_p"] == pytest.approx(stats.spearmanr(x, y).pvalue, rel=0.5)
    assert c["spearman_ci"][0] <= c["spearman_rho"] <= c["spearman_ci"][1]
    assert correlation(x, y, seed=3) == c == correlation(x, y, seed=4)  # no random draws
    # the interval excludes 0 exactly when p < 0.05, for every data set (a bootstrap interval beside the t-test's
    # p disagreed: r = -0.81 with [-0.98, +0.01] beside p = 0.005 over 10 classes)
    for trial in range(300):
        n = int(rng.integers(4, 30))
        a = rng.normal(size=n)
        b = rng.normal(size=n) + rng.normal() * a
        k = correlation(a, b)
        for name, p in (("pearson_ci", k["pearson_p"]), ("spearman_ci", k["spearman_p"])):
            lo, hi = k[name]
            assert (lo > 0 or hi < 0) == (p < 0.05), (n, k)
    with_nan = correlation(np.append(x, np.nan), np.append(y, 1.0), seed=3)
    assert with_nan["n"] == 60 and with_nan["pearson_r"] == pytest.approx(c["pearson_r"])


def _mis_csv(path, values, layer="softmax", constant=()):
    lines = ["layer,unit,status,mis,mis_confidence,mis_ci_low,mis_ci_high,conf_ci_low,conf_ci_high,n_tasks"]
    for u, v in enumerate(values):
        if u in constant:
            lines.append(f"{layer},{u},constant,,,,,,,0")
        else:
            lines.append(f"{layer},{u},ok,{v:.2f},{v},,,,,20")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sweep_uses_each_runs_own_rate(tmp_path):
    # every run has the same MIS: joining by value would scramble rates; correlations must be undefined
    rows = ["name,method,rate,mis_confidence,mis,schedule,epochs,top1"]
    rates = [0.2, 0.4, 0.6, 0.8, 0.0]
    for k, r in enumerate(rates):
        rows.append(f"run{k},{'none' if r == 0 else 'structured'},{r},0.7,0.75,oneshot,{0 if k == 3 else 5},{0.9 - r / 2}")
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    summary = sweep_report(tmp_path / "runs.csv", tmp_path / "out")
    assert summary["correlation_rate_mis_confidence"]["pearson_r"] is None
    assert summary["correlation_rate_top1"]["pearson_r"] == pytest.approx(-1.0)
    sweep = (tmp_path / "out" / "sweep.csv").read_text().splitlines()
    assert sweep[0].startswith("name,method,schedule,rate,n_units,mis,mis_confidence,class_mis,class_mis_confidence,top1")
    assert [float(line.split(",")[3]) for line in sweep[1:]] == rates
    # now with scores files: the correlation uses rates against per-run means
    rows = ["name,method,rate,scores"]
    means = []
    for k, r in enumerate([0.2, 0.4, 0.6, 0.8]):
        values = np.clip(0.5 + 0.3 * r + np.random.default_rng(k).normal(0, 0.05, 10), 0, 1)
        _mis_csv(tmp_path / f"m{k}.csv", values, layer="conv1", constant=(9,))
        means.append(values[:9].mean())
        rows.append(f"r{k},unstructured,{r},m{k}.csv")
    (tmp_path / "runs2.csv").write_text("\n".join(rows) + "\n")
    summary = sweep_report(tmp_path / "runs2.csv", tmp_path / "out2")
    expected = stats.pearsonr([0.2, 0.4, 0.6, 0.8], means).statistic
    assert summary["correlation_rate_mis_confidence"]["pearson_r"] == pytest.approx(expected, rel=1e-5)
    assert summary["correlation_rate_mis_confidence"]["n"] == 4
    layers = (tmp_path / "out2" / "sweep_layers.csv").read_text().splitlines()
    assert layers[1].startswith("r0,unstructured,oneshot,0.2,conv1,feature,9,1,")


def test_sweep_figure_has_the_expected_axes_and_lines(tmp_path):
    runs = [{"name": f"{m}{r}", "method": m, "schedule": s, "rate": r, "mis_confidence": 0.6 + r / 10,
             "epochs": e, "conf_p05": 0.5, "conf_p95": 0.8}
            for m, s, e in (("structured", "oneshot", 5), ("connection", "iterative", 5), ("structured", "oneshot", 0))
            for r in (0.2, 0.4, 0.6)]
    fig = sweep_figure(runs, "mis_confidence", tmp_path / "f.png", "mean MIS confidence", band=("conf_p05", "conf_p95"))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "pruning rate" and ax.get_ylabel() == "mean MIS confidence"
    labels = sorted(ax.get_legend_handles_labels()[1])
    assert labels == ["connection, iterative", "structured, oneshot", "structured, oneshot, not retrained"]
    black = [line for line in ax.get_lines() if "not retrained" in line.get_label()][0]
    assert black.get_color() == "black" and list(black.get_xdata()) == [0.2, 0.4, 0.6] and black.get_linestyle() == ":"
    assert len(ax.collections) == 3  # one set of 5-95% bars per line
    runs.append({"name": "control", "method": "none", "schedule": "oneshot", "rate": 0.0, "mis_confidence": 0.55,
                 "epochs": 5, "conf_p05": 0.5, "conf_p95": 0.8})
    fig = sweep_figure(runs, "mis_confidence", tmp_path / "g.png", "mean MIS confidence")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert "unpruned" not in lines  # the control starts the retrained lines instead
    assert list(lines["structured, oneshot"].get_xdata()) == [0.0, 0.2, 0.4, 0.6]
    assert list(lines["structured, oneshot, not retrained"].get_xdata()) == [0.2, 0.4, 0.6]
    with Image.open(tmp_path / "f.png") as img:  # the pixel size the page shows it at (100 %)
        assert img.size == tuple(round(v * DPI) for v in fig.get_size_inches())


def test_import_round_trip_and_options(tmp_path):
    frame = pd.DataFrame({"layer": ["conv1_conv"] * 3 + ["conv1_bn"] * 3 + ["fc"] * 2, "unit": [0, 1, 2, 0, 1, 2, 0, 1],
                          "mis": [0.9, 0.75, 1.0, 0.8, 0.7, 1.0, 0.55, 0.6],
                          "mis_confidence": [0.72, 0.64, 0.9999, 0.7, 0.6, 0.9999, 0.52, 0.58],
                          "layer_type": [0, 0, 0, 1, 1, 1, 2, 2]})
    path = tmp_path / "published.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"scores": frame, "layer_types": {"Conv2d": 0, "BatchNorm2d": 1, "Linear": 2}}, handle)
    summary = import_scores(path, tmp_path / "all.csv")
    rows = read_scores(tmp_path / "all.csv")
    assert [(r["layer"], r["unit"], r["mis"], r["mis_confidence"]) for r in rows] == list(
        zip(frame.layer, frame.unit, frame.mis, frame.mis_confidence))
    assert summary["mean_mis_confidence"] == pytest.approx(frame.mis_confidence.mean())
    misbench.import_scores(path, tmp_path / "nobn.csv", drop_types="BatchNorm2d", constant="conv1_conv:2")  # the API
    rows = read_scores(tmp_path / "nobn.csv")
    assert len(rows) == 5 and {r["layer"] for r in rows} == {"conv1_conv", "fc"}
    assert rows[2]["status"] == "constant" and np.isnan(rows[2]["mis"])
    summary = import_scores(path, tmp_path / "sat.csv", constant_above=0.999)
    assert summary["n_ok"] == 6
    with pytest.raises(MisbenchError, match="layer types are"):
        import_scores(path, tmp_path / "x.csv", drop_layer_types=["Conv3d"])


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"scores": Evil(), "layer_types": {}}))
    with pytest.raises(MisbenchError, match="refusing to unpickle"):
        import_scores(path, tmp_path / "out.csv")
    assert not marker.exists() and not (tmp_path / "out.csv").exists()
    r = CliRunner().invoke(cli, ["import-scores", str(path), "--out", str(tmp_path / "out.csv")])
    assert r.exit_code == 1 and "refusing" in r.output and not marker.exists()


def test_classwise_report_with_unit_pictures_stays_inside_its_folder(property_folder, tmp_path):
    root, props = property_folder
    n = len(props["hue"])
    rng = np.random.default_rng(0)
    labels = np.array([int(p.parent.name.split("_")[1]) for p in sorted(root.rglob("*.png"))])
    logits = rng.normal(size=(n, 3)).astype(np.float32)
    logits[np.arange(n), labels] += np.array([3.0, 0.5, -1.0])[labels]  # class accuracies differ
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    acts = write_acts(tmp_path / "acts.h5", root, {"softmax": soft}, labels=labels, logits=logits)
    runner = CliRunner()
    r = runner.invoke(cli, ["score", str(acts), "--layer", "softmax", "--out", str(tmp_path / "mis.csv"), "--similarity",
                            "pixel", "--image-size", "32", "--tasks-out", str(tmp_path / "tasks.h5"), "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "report"
    r = runner.invoke(cli, ["report", "classwise", "--scores", str(tmp_path / "mis.csv"), "--acts", str(acts),
                            "--tasks", str(tmp_path / "tasks.h5"), "--unit", "softmax:1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    table = (out / "classwise.csv").read_text().splitlines()
    assert table[0] == "class,name,n,accuracy,mis,mis_confidence,purity,pool,class_images,alpha,alpha_source"
    assert len(table) == 4
    assert all(line.endswith(",default") for line in table[1:]) and summary["alpha_warning"]
    acc = [float(line.split(",")[3]) for line in table[1:]]
    conf = [float(line.split(",")[5]) for line in table[1:]]
    assert summary["correlation_accuracy_mis_confidence"]["pearson_r"] == pytest.approx(stats.pearsonr(acc, conf).statistic)
    manual = [np.mean(logits[labels == c].argmax(1) == c) for c in range(3)]
    assert acc == pytest.approx(manual, abs=1e-6)
    html = (out / "report.html").read_text()
    links = [link for link in re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", html) if not link.startswith(("#", "data:"))]
    assert links and all((out / link).resolve().is_relative_to(out.resolve()) and (out / link).exists() for link in links)
    assert "units/softmax_1.png" in links and not re.search(r"https?://", html)
    # the task gallery as the rest of the report: about 900 px wide, text >= 8 pt (11 px at 100 dpi), its alt text
    # naming the run (a classwise report's unit pages are those of "scores") and the unit
    with Image.open(out / "units/softmax_1.png") as img:
        assert 700 <= img.size[0] <= 1000, img.size
    svg = (out / "units/softmax_1.svg").read_text()
    sizes = [float(v) for v in re.findall(r"font(?:-size)?:\s*(?:[a-z]+\s+)*([\d.]+)px", svg)]
    assert sizes and min(sizes) >= 8, min(sizes)
    assert re.search(r"<img[^>]*src='units/softmax_1.png'[^>]*alt='scores softmax:1: ", html)
    # a requested unit without tasks is refused, not silently dropped; an unscored unit is named plainly
    r = runner.invoke(cli, ["report", "classwise", "--scores", str(tmp_path / "mis.csv"), "--acts", str(acts),
                            "--unit", "softmax:1", "--out", str(tmp_path / "r2")])
    assert r.exit_code == 1 and "give --tasks" in r.output and not (tmp_path / "r2").exists()
    r = runner.invoke(cli, ["report", "classwise", "--scores", str(tmp_path / "mis.csv"), "--acts", str(acts),
                            "--tasks", str(tmp_path / "tasks.h5"), "--unit", "softmax:9", "--out", str(tmp_path / "r3")])
    assert r.exit_code == 1 and "(scored units of softmax: 0, 1, 2)" in r.output and "np." not in r.output


def test_classwise_report_says_which_class_units_it_used(property_folder, tmp_path):
    from misbench.reports.classwise import classwise_report

    root, props = property_folder
    labels = np.array([int(p.parent.name.split("_")[1]) for p in sorted(root.rglob("*.png"))])
    logits = np.random.default_rng(1).normal(size=(len(labels), 3)).astype(np.float32)
    acts = write_acts(tmp_path / "acts.h5", root, {"logits": logits}, labels=labels, logits=logits)
    r = CliRunner().invoke(cli, ["score", str(acts), "--layer", "logits", "--out", str(tmp_path / "mis.csv"),
                                 "--similarity", "pixel", "--image-size", "16", "--bootstrap", "20"])
    assert r.exit_code == 0, r.output
    summary = classwise_report(tmp_path / "mis.csv", tmp_path / "report", acts=acts)  # no softmax: the logits
    assert summary["layer"] == "logits" and summary["class_units"] == "pre-softmax logits"
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["class_units"] == "pre-softmax logits"


def test_a_requested_constant_unit_is_reported_not_fatal(property_folder, tmp_path):
    # a colleague's bug: one constant unit in [report] units stopped the whole report step
    from misbench.reports.gallery import unit_galleries

    root, _ = property_folder
    n = len(list(root.rglob("*.png")))
    feat = np.random.default_rng(2).normal(size=(n, 3))
    feat[:, 2] = 0.5
    acts = write_acts(tmp_path / "acts.h5", root, {"feat": feat})
    r = CliRunner().invoke(cli, ["score", str(acts), "--layer", "feat", "--out", str(tmp_path / "mis.csv"), "--similarity",
                                 "pixel", "--image-size", "16", "--tasks", "6", "--bootstrap", "20",
                                 "--tasks-out", str(tmp_path / "tasks.h5")])
    assert r.exit_code == 0, r.output
    made = unit_galleries(tmp_path / "out", read_scores(tmp_path / "mis.csv"), tmp_path / "tasks.h5", acts, ["feat:2"])
    by_unit = {(m["layer"], m["unit"]): m for m in made}
    assert "constant unit" in by_unit[("feat", 2)]["skipped"]
    pictured = [m for m in made if "path" in m]
    assert pictured and all((tmp_path / "out" / m["path"]).exists() for m in pictured)
    with open_activations(acts) as a:  # the activation values shown are the unit's own
        column = a.activations("feat")[:, pictured[0]["unit"]]
    with h5py.File(tmp_path / "tasks.h5", "r") as t:
        k = list(t["feat"]["unit"][...]).index(pictured[0]["unit"])
        rows = t["feat"]["pos_expl"][k][0]
    assert pictured[0]["pos_expl"][0] == pytest.approx(column[rows].tolist())


def test_sweep_says_why_requested_units_are_not_pictured(property_folder, tmp_path, caplog):
    """Unit pictures need tasks.h5 and acts.h5 beside the header run's scores; without them a requested unit
    is named in a warning instead of disappearing."""
    root, _ = property_folder
    n = len(list(root.rglob("*.png")))
    acts = write_acts(tmp_path / "acts.h5", root, {"feat": np.random.default_rng(3).normal(size=(n, 3))})
    r = CliRunner().invoke(cli, ["score", str(acts), "--layer", "feat", "--out", str(tmp_path / "mis.csv"),
                                 "--similarity", "pixel", "--image-size", "16", "--tasks", "6", "--bootstrap", "20"])
    assert r.exit_code == 0, r.output
    (tmp_path / "runs.csv").write_text("name,method,rate,scores\nrun,none,0,mis.csv\n")
    with caplog.at_level("WARNING", logger="misbench.reports.build"):
        r = CliRunner().invoke(cli, ["report", "sweep", "--runs", str(tmp_path / "runs.csv"), "--unit", "feat:1",
                                     "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    assert "feat:1 not pictured" in caplog.text and "tasks.h5" in caplog.text


def test_a_warning_takes_one_line_cut_at_its_first_colon_outside_parentheses(tmp_path):
    from misbench.reports.html import render_html

    page = render_html(tmp_path, "t", [], None, [
        "sparse units (top pool: filled by ties) are left out of the means of 2 runs: a 3, b 4",
        "class units' top pools larger than their classes in 1 of 2 runs (base): in base, 1 of 10 class units ...",
        "no colon here"])
    assert re.findall(r"<summary>warning: ([^<]*)</summary>", page) == [
        "sparse units (top pool: filled by ties) are left out of the means of 2 runs",
        "class units&#x27; top pools larger than their classes in 1 of 2 runs (base)"]
    assert "<p class='warning'>warning: no colon here</p>" in page

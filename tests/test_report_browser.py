"""The report a researcher reads first, opened in a real headless browser (Debian's chromium via Playwright)."""

import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from conftest import write_acts
from misbench.cli.main import cli
from misbench.activations.evaluate import evaluate_acts
from misbench.runtime.fileio import write_json
from misbench.reports.tables import read_csv_rows


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium on this machine: `make assets` installs Debian's chromium (apt-get, as root); "
                    "it could not be installed here")
    pytest.importorskip("playwright.sync_api", reason="pip package playwright missing: `make install` installs it")
    return exe


def _run(root, out, labels, rng, accuracy_boost, feat_noise):
    """One run: acts.h5 (a feature layer with one constant unit, and softmax), mis.csv + tasks.h5, eval.json."""
    n = len(labels)
    logits = rng.normal(size=(n, 3)).astype(np.float32)
    logits[np.arange(n), labels] += np.asarray(accuracy_boost)[labels]
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    feat = rng.normal(size=(n, 4)) * feat_noise + np.arange(n)[:, None] % 7
    feat[:, 3] = 1.0  # a constant unit: no tasks, nothing to picture
    out.mkdir(parents=True)
    acts = write_acts(out / "acts.h5", root, {"feat": feat, "softmax": soft}, labels=labels, logits=logits)
    r = CliRunner().invoke(cli, ["score", str(acts), "--layer", "feat", "--layer", "softmax", "--out", str(out / "mis.csv"),
                                 "--similarity", "pixel", "--image-size", "16", "--tasks", "8", "--bootstrap", "30",
                                 "--tasks-out", str(out / "tasks.h5")])
    assert r.exit_code == 0, r.output
    write_json(out / "eval.json", evaluate_acts(acts))


@pytest.fixture(scope="module")
def study_report(property_folder, tmp_path_factory):
    root, _ = property_folder
    base = tmp_path_factory.mktemp("browser")
    labels = np.array([int(p.parent.name.split("_")[1]) for p in sorted(root.rglob("*.png"))])
    rng = np.random.default_rng(0)
    _run(root, base / "runs" / "control", labels, rng, [3.0, 0.5, -1.0], 0.1)
    _run(root, base / "runs" / "pruned", labels, rng, [1.0, 0.0, -0.5], 2.0)
    (base / "runs.csv").write_text("name,method,rate,scores,eval\n"
                                   "control,none,0,runs/control/mis.csv,runs/control/eval.json\n"
                                   "pruned,structured,0.5,runs/pruned/mis.csv,runs/pruned/eval.json\n")
    out = base / "report"
    r = CliRunner().invoke(cli, ["report", "sweep", "--runs", str(base / "runs.csv"), "--out", str(out),
                                 "--unit", "feat:3"])  # a constant unit asked for: reported, not fatal
    assert r.exit_code == 0, r.output
    return out


def test_report_opens_in_a_headless_browser_with_every_image_and_no_console_error(study_report):
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    out = study_report
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
            page.goto((out / "report.html").as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])")
            header = page.inner_text("#header")
            summary_rows = page.eval_on_selector_all("#summary table.csv tr", "rows => rows.map(r => r.innerText)")
            scatters = page.eval_on_selector_all("img.scatter", "els => els.map(e => e.naturalWidth)")
            toc = page.eval_on_selector_all("#toc a", "els => els.map(e => e.getAttribute('href'))")
            ids = page.eval_on_selector_all("section[id]", "els => els.map(e => '#' + e.id)")
            body = page.inner_text("body")
        finally:
            browser.close()
    assert errors == []
    assert len(images) >= 8 and all(width > 0 for _, width in images), images
    for label in ("model", "checkpoint sha256", "images (N)", "unit selection", "tasks per unit", "explanations per task",
                  "similarity backend", "backend fingerprint", "alpha source", "misbench version"):
        assert label in header
    assert "pixel" in header and "450" in header and "warning: mis_confidence uses an uncalibrated alpha" in header
    sweep = read_csv_rows(out / "sweep.csv")
    assert len(summary_rows) == 1 + len(sweep) and summary_rows[1].split("\t")[0] == "control"
    assert len(scatters) == 2 and all(w > 0 for w in scatters)
    assert toc == ids  # the table of contents names every section
    assert "feat:3" in body and "constant unit" in body
    assert not re.search(r"\{\s*\"", body)  # no dict dumps


def test_report_figures_agree_with_its_tables(study_report):
    out = study_report
    for run in ("control", "pruned"):
        table = read_csv_rows(out / "classwise" / run / "classwise.csv")
        acc = [float(r["accuracy"]) for r in table]
        conf = [float(r["mis_confidence"]) for r in table]
        svg = (out / "classwise" / run / "classwise_scatter.svg").read_text()
        assert f"r={stats.pearsonr(acc, conf).statistic:.3f}" in svg and f"n={len(table)}" in svg
    for png in out.rglob("*.png"):  # every figure has its SVG twin
        assert png.with_suffix(".svg").exists(), png
    html = (out / "report.html").read_text()
    csvs = {p.relative_to(out).as_posix() for p in out.rglob("*.csv")}
    assert csvs and all(f"href='{c}'" in html for c in csvs)
    paired = read_csv_rows(out / "paired.csv")
    assert paired and "paired.png" in json.loads((out / "summary.json").read_text())["figures"]

"""The report a researcher reads first, opened in a real headless browser (Debian's chromium via Playwright):
findings on the first screen with the tables' numbers, every table link resolves, every unit-page image
loads, no console error, no horizontal scroll on a phone, page weight within the budget. It also makes the
screenshots of docs/reports.md (MISBENCH_SCREENSHOTS=DIR)."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from conftest import write_acts
from misbench.cli.main import cli
from misbench.activations.evaluate import evaluate_acts
from misbench.runtime.fileio import write_json
from misbench.reports.tables import read_csv_rows
from misbench.reports.units import INDEX_BYTES_PER_UNIT, UNIT_PAGE_BYTES, page_weight


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
    """A tiny generated study's report; MISBENCH_REPORT=DIR checks a built report instead (the demo's, for
    docs/reports.md's screenshots)."""
    if os.environ.get("MISBENCH_REPORT"):
        return Path(os.environ["MISBENCH_REPORT"]).resolve()
    root, _ = property_folder
    base = tmp_path_factory.mktemp("browser")
    labels = np.array([int(p.parent.name.split("_")[1]) for p in sorted(root.rglob("*.png"))])
    rng = np.random.default_rng(0)
    _run(root, base / "runs" / "control", labels, rng, [3.0, 0.5, -1.0], 0.1)
    _run(root, base / "runs" / "pruned", labels, rng, [1.0, 0.0, -0.5], 2.0)
    _run(root, base / "runs" / "pruned8", labels, rng, [0.5, 0.0, -0.5], 4.0)
    (base / "runs.csv").write_text("name,method,rate,scores,eval\n"
                                   "control,none,0,runs/control/mis.csv,runs/control/eval.json\n"
                                   "pruned,structured,0.5,runs/pruned/mis.csv,runs/pruned/eval.json\n"
                                   "pruned8,structured,0.8,runs/pruned8/mis.csv,runs/pruned8/eval.json\n")
    out = base / "report"
    r = CliRunner().invoke(cli, ["report", "sweep", "--runs", str(base / "runs.csv"), "--out", str(out),
                                 "--unit", "feat:3"])  # a constant unit asked for: reported, not fatal
    assert r.exit_code == 0, r.output
    return out


def _compact(png) -> None:
    """A screenshot for the docs in 256 colours (about a third of the bytes; text stays sharp)."""
    from PIL import Image

    with Image.open(png) as img:
        small = img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def _browse(exe, pages: list, width: int, height: int, shots: dict = None):
    """Open each page at width x height; per page: images (src, loaded), horizontal overflow, console errors,
    and what `probe` (a JS expression) returns."""
    from playwright.sync_api import sync_playwright

    found = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            for path, probe in pages:
                page = browser.new_page(viewport={"width": width, "height": height})
                errors = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
                page.goto(Path(path).as_uri(), wait_until="load")
                if shots and path in shots:
                    page.screenshot(path=shots[path])
                    _compact(shots[path])
                # lazy images: load them all, then read their sizes
                page.evaluate("() => Promise.all([...document.images].map(i => {i.loading = 'eager'; "
                              "return i.decode().catch(() => null)}))")
                images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth, "
                                                          "e.getAttribute('alt')])")
                overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
                found[path] = {"images": images, "overflow": overflow, "errors": list(errors),
                               "probe": page.evaluate(probe) if probe else None}
                page.close()
        finally:
            browser.close()
    return found


FINDINGS_PROBE = ("() => {const b = document.querySelector('#findings').getBoundingClientRect(); "
                  "return {bottom: b.bottom, text: document.querySelector('#findings').innerText, "
                  "links: [...document.querySelectorAll('table.csv a')].map(a => a.getAttribute('href')), "
                  "figs: [...document.querySelectorAll('figure img')].filter(i => i.offsetParent !== null)"
                  ".map(i => [i.naturalWidth, i.clientWidth])}}")


def _num(x) -> str:
    return f"{float(x):.3g}"


def test_report_findings_links_images_and_layout_in_a_headless_browser(study_report):
    exe = _chromium()
    out = study_report
    report = out / "report.html"
    shots_dir = os.environ.get("MISBENCH_SCREENSHOTS")
    shots = {str(report): str(Path(shots_dir) / "report-first-screen.png")} if shots_dir else None
    wide = _browse(exe, [(str(report), FINDINGS_PROBE)], 1440, 900, shots)[str(report)]
    assert wide["errors"] == [] and wide["overflow"] <= 0
    probe = wide["probe"]
    assert 0 < probe["bottom"] <= 900  # the findings box is on the first screen
    assert all(n > 0 and n == c for n, c in probe["figs"]), probe["figs"]  # figures at 100 % (text >= 10 px)

    # the findings' numbers are the tables': r of rate against sweep.csv's confidence (scipy on the table) ...
    text = probe["text"]
    sweep = [s for s in read_csv_rows(out / "sweep.csv") if s["method"] != "random" and s["mis_confidence"]]
    r = stats.pearsonr([float(s["rate"]) for s in sweep], [float(s["mis_confidence"]) for s in sweep])
    # Fisher's z gives the interval and p from 4 runs on (reports/stats.py); below that both are n/a
    # (atanh(r) normal with standard error 1/sqrt(n-3): scipy's interval, p from the normal distribution)
    # sweep.csv rounds its values, so a near-zero r from the table may differ from the report's in the third
    # significant digit: compared within 1e-3 (r, interval) and 2e-3 (p), not as text
    n = len(sweep)
    found = re.search(r"across n = (\d+) runs, .*? Pearson r = (\S+) \(95 % CI \[(\S+), (\S+)\]\), p = (\S+?)\.?(?:\s|$)", text)
    assert found and int(found[1]) == n, text
    if n >= 4:
        ci = r.confidence_interval()
        fisher_p = 2 * stats.norm.sf(abs(np.arctanh(r.statistic)) * np.sqrt(n - 3))
        np.testing.assert_allclose([float(found[k]) for k in (2, 3, 4)], [r.statistic, ci.low, ci.high], atol=1e-3)
        assert abs(float(found[5]) - fisher_p) < 2e-3, (found[5], fisher_p)
    else:
        assert float(found[2]) == pytest.approx(r.statistic, abs=1e-3) and found.groups()[2:] == ("n/a",) * 3
    # ... and the paired line is paired.csv's row of the run it names
    m = re.search(r"the largest difference, ([^:]+): Δ MIS confidence = (\S+) \(95 % CI \[(\S+), (\S+)\]\), p = (\S+), "
                  r"n = (\d+) units", text)
    assert m, text
    row = next(p for p in read_csv_rows(out / "paired.csv") if p["name"] == m[1] and p["layer"] == "features")
    p_col = "p_confidence" if row.get("p_confidence") not in (None, "") else "wilcoxon_p_confidence"
    assert m.groups()[1:] == (_num(row["diff_mis_confidence"]), _num(row["diff_conf_ci_low"]),
                              _num(row["diff_conf_ci_high"]), _num(row[p_col]), row["n_pairs"])
    others = [abs(float(p["diff_mis_confidence"])) for p in read_csv_rows(out / "paired.csv") if p["layer"] == "features" and p["method"] != "random"]
    assert abs(float(row["diff_mis_confidence"])) == max(others)
    cw = read_csv_rows(out / "classwise" / "control" / "classwise.csv")
    rc = stats.pearsonr([float(c["accuracy"]) for c in cw], [float(c["mis_confidence"]) for c in cw])
    assert f"in control, Pearson r = {_num(rc.statistic)}" in text
    # ... and it says when the class units' top pools hold other classes' images (classwise.csv's purity)
    purity = {run.name: np.mean([float(c["purity"]) for c in read_csv_rows(run / "classwise.csv")])
              for run in (out / "classwise").iterdir()}
    impure = {name: p for name, p in purity.items() if p < 0.9}
    if impure:
        worst = min(impure, key=impure.get)
        assert (f"the class pools are impure in {len(impure)} of {len(purity)} runs (mean purity below 0.9; "
                f"lowest: {worst}, {_num(impure[worst])})") in text, text
    else:
        assert "impure" not in text

    # every link from a table row resolves; the units it links have pages whose images all load
    links = probe["links"]
    unit_pages = [out / h for h in links if re.search(r"units/.+/\d+\.html$", h)]
    assert links and all((out / h).is_file() for h in links) and unit_pages
    layer_index = unit_pages[0].parent / "index.html"
    constant = out / "units" / "control" / "feat" / "3.html"  # the generated study's constant unit
    phone_pages = [report, layer_index, unit_pages[0]] + ([constant] if constant.exists() else [])
    if shots_dir:
        shots = {str(layer_index): str(Path(shots_dir) / "units-layer-index.png"),
                 str(unit_pages[0]): str(Path(shots_dir) / "unit-page.png")}
    seen = _browse(exe, [(str(p), None) for p in dict.fromkeys(unit_pages + phone_pages[1:])], 1440, 900, shots)
    for path, got in seen.items():
        assert got["errors"] == [] and got["images"], path
        assert all(width > 0 for _, width, _ in got["images"]), (path, got["images"])
        run_unit = re.search(r"units/([^/]+)/([^/]+)/(\d+|index)\.html", path)
        assert all(run_unit[1] in alt and (run_unit[3] == "index" or f"{run_unit[2]}:{run_unit[3]}" in alt)
                   for _, _, alt in got["images"]), got["images"]  # alt texts name run and unit
    # on a phone: no horizontal scroll of the page itself
    phone = _browse(exe, [(str(p), None) for p in phone_pages], 390, 844)
    assert all(got["overflow"] <= 0 and got["errors"] == [] for got in phone.values()), phone

def test_report_reads_first_and_prints(study_report):
    out = study_report
    html = (out / "report.html").read_text()
    assert "<html lang='en'>" in html and "name='viewport'" in html and "@media print" in html
    assert "<details id='settings'>" in html and html.count("<caption>") >= 3
    # the findings come before the settings and the contents
    assert html.index("id='findings'") < html.index("id='settings'") < html.index("id='toc'")
    # the contents list the sections, not the folded parts under them (each run's class-wise table)
    toc = re.search(r"<nav id='toc'.*?</nav>", html, re.S)[0]
    folded = re.findall(r"<section id='([^']+)'><h2>[^<]*</h2><details>", html)
    assert folded and not any(f"href='#{anchor}'" in toc for anchor in folded), folded
    assert all(f"href='#{anchor}'" in toc for anchor in re.findall(r"<section id='([^']+)'>", html)
               if anchor not in folded and anchor != "findings")
    body = re.sub(r"<[^>]+>", " ", html)
    if not os.environ.get("MISBENCH_REPORT"):  # the generated study asked for its constant unit
        assert "feat:3" in body and "constant unit" in body
    assert not re.search(r"\{\s*\"", body)  # no dict dumps


def test_report_figures_agree_with_its_tables(study_report):
    out = study_report
    for run in sorted(p.name for p in (out / "classwise").iterdir()):
        table = read_csv_rows(out / "classwise" / run / "classwise.csv")
        acc = [float(r["accuracy"]) for r in table]
        conf = [float(r["mis_confidence"]) for r in table]
        svg = (out / "classwise" / run / "classwise_scatter.svg").read_text()
        assert f"r={stats.pearsonr(acc, conf).statistic:.3f}" in svg and f"n={len(table)}" in svg
        assert f"r={stats.pearsonr(acc, conf).statistic:.3f}" in (out / "classwise_runs.svg").read_text()
    for png in out.rglob("*.png"):  # every figure has its SVG twin, and no text under 8 pt (11 px at 100 dpi)
        svg = png.with_suffix(".svg")
        assert svg.exists(), png
        sizes = [float(s) for s in re.findall(r"font(?:-size)?:\s*(?:[a-z]+\s+)*([\d.]+)px", svg.read_text())]
        assert sizes and min(sizes) >= 8, (svg, min(sizes))
    html = (out / "report.html").read_text()
    csvs = {p.relative_to(out).as_posix() for p in out.rglob("*.csv")}
    assert csvs and all(f"href='{c}'" in html for c in csvs)
    paired = read_csv_rows(out / "paired.csv")
    assert paired and "paired.png" in json.loads((out / "summary.json").read_text())["figures"]


def test_every_run_has_unit_pages_linked_from_its_rows_sharing_thumbnails(study_report):
    out = study_report
    report = out / "report.html"
    html = report.read_text()
    links = set(re.findall(r"href='([^']+)'", html))
    # every run with scores has its pages, linked from its rows of the summary table and of the table of layers
    layer_rows = read_csv_rows(out / "sweep_layers.csv")
    runs = {r["name"] for r in layer_rows}
    assert runs and all(f"units/{run}/index.html" in links for run in runs), links
    assert all(f"units/{r['name']}/{r['layer']}/index.html" in links for r in layer_rows), links
    for run in runs:  # the summary table's row of the run
        assert re.search(rf"<tr><td><a href='units/{re.escape(run)}/index.html'>{re.escape(run)}</a></td><td>", html), run
    # every unit with tasks shows them, in every layer (not only the first layer the pages are made for)
    pages = [page for run in runs for page in (out / "units" / run).glob("*/[0-9]*.html")]
    scored = [page for page in pages if "<th scope='row'>status</th><td>ok</td>" in page.read_text()]
    assert len({page.parent for page in scored}) > 1 and all("<h2>Tasks</h2>" in page.read_text() for page in scored)
    # thumbnails are made once per image, shared by every run's pages (the runs score the same images)
    shown = {run: {m for page in (out / "units" / run).rglob("*.html")
                   for m in re.findall(r"src='../../img/([^']+)'", page.read_text())} for run in runs}
    thumbs = {p.name for p in (out / "units" / "img").glob("*.jpg")}
    assert thumbs == set().union(*shown.values()) and len(thumbs) < sum(len(v) for v in shown.values())

    # page weight within the documented budget (docs/reports.md), for every run
    for run in runs:
        run_dir = out / "units" / run
        for index in run_dir.glob("*/index.html"):
            tiles = index.read_text().count("class='tile'")
            assert page_weight(index) <= INDEX_BYTES_PER_UNIT * tiles, index
        assert max(page_weight(p) for p in run_dir.glob("*/[0-9]*.html")) <= UNIT_PAGE_BYTES

"""Units from Python (misbench.unit_images, plot_unit), the unit pages, runs tables in memory, and report folders
swapped in whole."""

import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.figure import Figure
from PIL import Image

import misbench
from conftest import write_acts
from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.reports import build
from misbench.reports.tables import read_csv_rows, read_scores
from misbench.reports.units import THUMB_SIZE, unit_pages


@pytest.fixture(scope="module")
def scored(property_folder, tmp_path_factory):
    root, _ = property_folder
    d = tmp_path_factory.mktemp("units")
    n = len(list(root.rglob("*.png")))
    feat = np.random.default_rng(5).normal(size=(n, 4)).astype(np.float32)
    feat[:, 3] = 2.0  # constant
    acts = write_acts(d / "acts.h5", root, {"feat": feat})
    r = CliRunner().invoke(cli, ["score", str(acts), "--layer", "feat", "--out", str(d / "mis.csv"), "--similarity",
                                 "pixel", "--image-size", "16", "--tasks", "6", "--bootstrap", "20",
                                 "--tasks-out", str(d / "tasks.h5")])
    assert r.exit_code == 0, r.output
    return d, acts, feat


def test_unit_images_are_the_units_extremes_read_back_from_the_files(scored):
    d, acts, feat = scored
    top = misbench.unit_images(acts, "feat", 1, k=5)
    order = np.argsort(-feat[:, 1], kind="stable")[:5]  # brute force: the 5 largest activations
    assert top["rows"].tolist() == order.tolist() and np.allclose(top["activations"], feat[order, 1])
    bottom = misbench.unit_images(acts, "feat", 1, k=3, side="bottom")
    assert np.allclose(bottom["activations"], np.sort(feat[:, 1])[:3])
    with misbench.open_activations(acts) as a:
        assert top["paths"] == [a.paths[r] for r in order]
        data_root = a.attrs["data_root"]
    assert top["images"].shape == (5, 64, 64, 3) and top["images"].dtype == np.uint8
    with Image.open(f"{data_root}/{top['paths'][0]}") as img:  # the image itself, resized as the model saw it
        expected = np.asarray(img.convert("RGB").resize((64, 64), Image.BILINEAR), np.int16)
    assert np.abs(top["images"][0].astype(np.int16) - expected).mean() < 8
    for kwargs, words in (({"layer": "nope", "unit": 0}, "'nope'"), ({"layer": "feat", "unit": 9}, "unit=9"),
                          ({"layer": "feat", "unit": 0, "side": "middle"}, "side='middle'"),
                          ({"layer": "feat", "unit": 0, "k": 0}, "k=0")):
        with pytest.raises(MisbenchError, match=re.escape(words)):
            misbench.unit_images(acts, **kwargs)


def test_plot_unit_returns_a_figure_with_the_activations_under_the_images(scored):
    d, acts, feat = scored
    fig = misbench.plot_unit(acts, "feat", 0, k=4, tasks=d / "tasks.h5", n_tasks=1)
    assert isinstance(fig, Figure)
    top = np.sort(feat[:, 0])[::-1][:4]
    labels = [ax.get_xlabel() for ax in fig.axes[:4]]
    assert labels == [f"{v:.3g}" for v in top]
    assert len([ax for ax in fig.axes if ax.images]) == 4 + 4 + 20  # top, bottom, one task of 9 + 2 + 9


def test_unit_pages_show_every_unit_sorted_with_its_scores(scored, tmp_path):
    d, acts, feat = scored
    scores = read_scores(d / "mis.csv")
    made = unit_pages(tmp_path, "run", scores, acts, d / "tasks.h5", k=3, n_tasks=1)
    assert set(made["units"]) == {("feat", u) for u in range(4)}
    index = (tmp_path / made["layers"]["feat"]).read_text()
    shown = [int(u) for u in re.findall(r"<strong>unit (\d+)</strong>", index)]
    ok = sorted((s for s in scores if s["status"] == "ok"), key=lambda s: -s["mis_confidence"])
    assert shown == [s["unit"] for s in ok] + [3]  # by confidence, the constant unit last
    page = (tmp_path / made["units"][("feat", 0)]).read_text()
    captions = [float(v) for v in re.findall(r"<figcaption>([-\d.e]+)</figcaption>", page)]
    assert np.allclose(captions[:3], np.sort(feat[:, 0])[::-1][:3], rtol=2e-3)  # top images' activations
    assert np.allclose(captions[3:6], np.sort(feat[:, 0])[:3], rtol=2e-3, atol=1e-3)
    row = next(s for s in scores if s["unit"] == 0)
    assert f"{float(row['mis_ci_low']):.3g}" in page and f"{float(row['conf_ci_high']):.3g}" in page
    thumbs = list((tmp_path / "units" / "img").glob("*.jpg"))
    srcs = set(re.findall(r"src='../../img/([^']+)'", "".join(p.read_text() for p in (tmp_path / "units").rglob("*.html"))))
    assert {t.name for t in thumbs} == srcs  # one thumbnail per image shown, however many units show it
    with Image.open(thumbs[0]) as img:
        assert img.size == (THUMB_SIZE, THUMB_SIZE) and img.format == "JPEG"
    with pytest.raises(MisbenchError, match="nope"):
        unit_pages(tmp_path, "run", scores, acts, layers=["nope"])


def _runs(d, epochs):
    return [{"name": "control", "method": "none", "rate": 0.0, "scores": str(d / "mis.csv"), "epochs": epochs},
            {"name": "half", "method": "structured", "rate": 0.5, "mis_confidence": 0.6, "mis": 0.7, "epochs": epochs}]


def test_report_sweep_takes_runs_in_memory_like_a_runs_csv(scored, tmp_path):
    d, acts, feat = scored
    pd.DataFrame(_runs(d, 3)).to_csv(tmp_path / "runs.csv", index=False)
    misbench.report("sweep", tmp_path / "from_csv", runs=tmp_path / "runs.csv")
    frame = pd.DataFrame(_runs(d, 0.0))  # pandas writes integer columns with NaN as floats
    frame.loc[1, "epochs"] = np.nan
    misbench.report("sweep", tmp_path / "from_frame", runs=frame)
    misbench.report("sweep", tmp_path / "from_list", runs=_runs(d, 3))
    ref = read_csv_rows(tmp_path / "from_csv" / "sweep.csv")
    for name in ("from_frame", "from_list"):
        got = read_csv_rows(tmp_path / name / "sweep.csv")
        drop = ("epochs",) if name == "from_frame" else ()
        assert [{k: v for k, v in r.items() if k not in drop} for r in got] == \
               [{k: v for k, v in r.items() if k not in drop} for r in ref]
    assert [r["epochs"] for r in read_csv_rows(tmp_path / "from_frame" / "sweep.csv")] == ["0", ""]
    bad = _runs(d, 3)
    bad[1]["epochs"] = 2.5
    with pytest.raises(MisbenchError, match=r"runs \(list\): run 'half' has epochs=.2\.5.; expected a whole number"):
        misbench.report("sweep", tmp_path / "bad", runs=bad)
    with pytest.raises(MisbenchError, match=r"runs \(DataFrame\): needs columns .*missing rate"):
        misbench.report("sweep", tmp_path / "bad", runs=pd.DataFrame(_runs(d, 3)).drop(columns="rate"))
    with pytest.raises(MisbenchError, match=r"item 0 is a str"):
        misbench.report("sweep", tmp_path / "bad", runs=["control"])
    with pytest.raises(MisbenchError, match=r"run 'half' has rate='x'"):
        misbench.report("sweep", tmp_path / "bad", runs=[_runs(d, 3)[0], {**_runs(d, 3)[1], "rate": "x"}])
    with pytest.raises(MisbenchError, match=r"unit feat:7 was not scored"):
        misbench.report("sweep", tmp_path / "bad", runs=_runs(d, 3), units=["feat:7"])
    assert not (tmp_path / "bad").exists()


def test_a_failed_build_leaves_the_old_report_as_it_was(scored, tmp_path, monkeypatch):
    d, acts, feat = scored
    out = tmp_path / "report"
    misbench.report("sweep", out, runs=_runs(d, 3))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise MisbenchError("disk trouble while writing report.html")

    monkeypatch.setattr(build, "write_html", broken)
    with pytest.raises(MisbenchError, match="disk trouble"):
        misbench.report("sweep", out, runs=_runs(d, 0), overwrite=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in tmp_path.iterdir()] == ["report"]  # no leftovers beside it


def test_bad_input_is_one_line_that_names_it(scored, tmp_path):
    """A unit that was not scored, a layer that is not in the file, a runs table with a missing column: one line
    naming the unit, layer, file or argument and column; nothing is written."""
    import h5py

    d, acts, feat = scored
    with h5py.File(d / "tasks.h5", "r") as src, h5py.File(tmp_path / "few.h5", "w") as t:
        keep = np.isin(src["feat"]["unit"][...], [0, 1])  # tasks for feat:0 and feat:1 only
        group = t.create_group("feat")
        for key in src["feat"]:
            group[key] = src["feat"][key][...][keep]
    with h5py.File(tmp_path / "other.h5", "w") as t:
        t.create_group("other")["unit"] = np.array([0])
    (tmp_path / "runs.csv").write_text(f"name,rate,scores\ncontrol,0,{d / 'mis.csv'}\n")  # no method
    cases = [
        (lambda: misbench.plot_unit(acts, "feat", 2, tasks=tmp_path / "few.h5"), ["feat:2", "not scored", "few.h5"]),
        (lambda: misbench.plot_unit(acts, "feat", 2, tasks=tmp_path / "other.h5"), ["layer 'feat'", "other.h5"]),
        (lambda: misbench.unit_images(acts, "conv9", 0), ["'conv9'", str(acts)]),
        (lambda: misbench.report("sweep", tmp_path / "r", runs=_runs(d, 3), units=["conv9:1"]),
         ["unit conv9:1 was not scored in control", "scored layers: feat"]),
        (lambda: misbench.report("sweep", tmp_path / "r", runs=tmp_path / "runs.csv"), ["runs.csv", "missing method"]),
        (lambda: misbench.report("sweep", tmp_path / "r", runs=[{"name": "a", "method": "none", "rate": 0}]),
         ["runs (list)", "missing scores|mis_confidence"]),
    ]
    for call, words in cases:
        with pytest.raises(MisbenchError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and all(w in message for w in words), (message, words)
    assert not (tmp_path / "r").exists()
    r = CliRunner().invoke(cli, ["report", "sweep", "--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "missing method" in r.output and "Traceback" not in r.output

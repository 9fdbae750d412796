"""report dictionaries (issue 24 item 7): neurons against features per layer, checked against numpy and scipy."""

import csv
import json
import re

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from conftest import make_image_folder, write_acts
from misbench.cli.main import cli
from misbench.scoring.results import MIS_COLUMNS


def _write_scores(path, layers: dict, ms: dict):
    with open(path, "w", newline="") as handle:
        w = csv.DictWriter(handle, MIS_COLUMNS + ["ms"], restval="")  # columns by name, whatever mis.csv adds
        w.writeheader()
        for layer, values in layers.items():
            for unit, v in enumerate(values):
                cell = "" if np.isnan(v) else f"{v:.6g}"
                w.writerow({"layer": layer, "unit": unit, "status": "constant" if np.isnan(v) else "ok", "mis": cell,
                            "mis_confidence": cell, "n_tasks": 0 if np.isnan(v) else 20, "alpha": 1.0,
                            "alpha_source": "user", "ms": "" if np.isnan(v) else f"{ms[layer]:.6g}"})


def test_neurons_against_features_per_layer(tmp_path):
    rng = np.random.default_rng(0)
    layers = {"block1": rng.uniform(0.5, 0.8, 30), "block1_sae": rng.uniform(0.6, 0.9, 60),
              "block2": rng.uniform(0.5, 0.8, 30), "block2_sae": rng.uniform(0.7, 1.0, 60)}
    layers["block1"][3] = np.nan  # a constant neuron: counted, left out of the means
    ms = {"block1": 0.3, "block1_sae": 0.4, "block2": 0.35, "block2_sae": 0.5}
    scores = tmp_path / "mis.csv"
    _write_scores(scores, layers, ms)
    # the activation file names each feature layer's dictionary, whose training record gives FVU, L0, dead share
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=4)
    acts = write_acts(tmp_path / "acts.h5", folder, {k: np.zeros((6, 2)) for k in layers})
    torch.save({"W_enc": torch.zeros(2, 2), "b_enc": torch.zeros(2),
                "training": {"fvu": 0.25, "l0": 3.5, "dead_share": 0.125}}, tmp_path / "sae2.pt")
    with h5py.File(acts, "r+") as h5:
        h5["layers/block2_sae"].attrs["dictionary_file"] = str(tmp_path / "sae2.pt")
    (tmp_path / "mis.json").write_text(json.dumps({"acts": str(acts)}))
    res = CliRunner().invoke(cli, ["report", "dictionaries", "--scores", str(scores), "--pair", "block1=block1_sae",
                                   "--pair", "block2=block2_sae", "--out", str(tmp_path / "rep"), "--n-boot", "400"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "rep" / "dictionaries.csv")))
    assert [(r["layer"], r["population"]) for r in rows] == [("block1", "block1"), ("block1", "block1_sae"),
                                                              ("block2", "block2"), ("block2", "block2_sae")]
    for layer, feats, r in (("block1", "block1_sae", rows[1]), ("block2", "block2_sae", rows[3])):
        a = layers[layer][np.isfinite(layers[layer])]
        b = layers[feats]
        a, b = np.array([float(f"{v:.6g}") for v in a]), np.array([float(f"{v:.6g}") for v in b])
        assert float(r["diff_mis"]) == pytest.approx(b.mean() - a.mean(), abs=1e-6)
        assert float(r["rank_sum_p"]) == pytest.approx(stats.mannwhitneyu(b, a).pvalue, rel=1e-5)
        assert float(r["diff_ci_low"]) < float(r["diff_mis"]) < float(r["diff_ci_high"])
        assert float(r["ms"]) == pytest.approx(ms[feats])
    assert rows[0]["n_units"] == "30" and rows[0]["n_scored"] == "29"
    assert (rows[3]["fvu"], rows[3]["l0"], rows[3]["dead_share"]) == ("0.25", "3.5", "0.125")
    assert rows[1]["fvu"] == ""  # a dictionary without a training record at hand
    assert (tmp_path / "rep" / "dictionaries.png").stat().st_size > 0
    assert "block2 features (block2_sae): MIS features - neurons +" in res.output
    # report.html: the table's rows are the CSV's, and the figure is on the page
    page = (tmp_path / "rep" / "report.html").read_text()
    table = page[page.index("data-csv='dictionaries.csv'"):]
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table[:table.index("</table>")])]
    assert [(c[0], c[2], c[3]) for c in cells if c] == [(r["layer"], r["population"], r["n_units"]) for r in rows]
    assert "src='dictionaries.png'" in page and res.output.endswith(f"wrote {tmp_path / 'rep' / 'report.html'}\n")
    res = CliRunner().invoke(cli, ["report", "dictionaries", "--scores", str(scores), "--pair", "block1=nope",
                                   "--out", str(tmp_path / "rep2")])
    assert res.exit_code != 0 and "layer 'nope' is not in" in res.output

"""Publishable statistics (issue 13): exact intervals, one place for summaries, layer-balanced sweeps,
paired comparisons, each run once, alpha provenance, top-k tie seeds. Each against an independent
computation (scipy, a brute-force loop, hand-built mis.csv files with known answers)."""

import json

import numpy as np
import torch
import pytest
from click.testing import CliRunner
from scipy import stats

from conftest import write_acts
from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.reports.sweep import sweep_report
from misbench.scoring.run import ScoreSettings, score
from misbench.scoring.summaries import bootstrap_mean_ci, clopper_pearson, score_summaries
from misbench.activations.topk import TopK, check_tie_order


def test_clopper_pearson_is_scipys_exact_interval_and_covers():
    assert clopper_pearson(20, 20) == pytest.approx((0.8316, 1.0), abs=1e-4)  # not [1, 1]
    for k in (0, 3, 10, 19, 20):
        ci = stats.binomtest(k, 20).proportion_ci(confidence_level=0.95, method="exact")
        assert clopper_pearson(k, 20) == pytest.approx((ci.low, ci.high), abs=1e-12)
    # coverage of a true MIS of 0.95 over 20 tasks: exact >= 95 %, the percentile bootstrap ~ 63 %
    rng = np.random.default_rng(0)
    k = rng.binomial(20, 0.95, 4000)
    table = {j: clopper_pearson(j, 20) for j in range(21)}
    covered = np.mean([table[j][0] <= 0.95 <= table[j][1] for j in k])
    assert covered >= 0.95
    def boot_covers(j):  # percentile bootstrap over the 20 decisions
        means = rng.binomial(1, j / 20, (200, 20)).mean(1)
        return np.percentile(means, 2.5) <= 0.95 <= np.percentile(means, 97.5)

    assert np.mean([boot_covers(j) for j in k[:500]]) < 0.75


def test_bootstrap_is_scipys_and_stratified_means_are_layer_balanced():
    x = np.random.default_rng(1).random(30)
    ours = bootstrap_mean_ci(x, np.random.default_rng(7), 500)
    ref = stats.bootstrap((x,), np.mean, n_resamples=500, method="percentile", random_state=np.random.default_rng(7))
    assert ours == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    a, b = np.random.default_rng(2).random(40), np.random.default_rng(3).random(5) + 1
    lo, hi = bootstrap_mean_ci([a, b], np.random.default_rng(0), 2000)
    # brute force: resample within each layer, average the two layer means
    rng = np.random.default_rng(11)
    brute = [(rng.choice(a, 40).mean() + rng.choice(b, 5).mean()) / 2 for _ in range(4000)]
    assert lo == pytest.approx(np.percentile(brute, 2.5), abs=0.02)
    assert hi == pytest.approx(np.percentile(brute, 97.5), abs=0.02)
    assert bootstrap_mean_ci([np.full(3, 0.5), np.array([0.7])], np.random.default_rng(0)) == (0.6, 0.6)


def _write_scores(path, layers: dict, alpha=10.0, source="default", meta=None):
    """layers: name -> list of mis_confidence (None = constant); mis = rounded to twentieths."""
    lines = ["layer,unit,status,mis,mis_confidence,mis_ci_low,mis_ci_high,conf_ci_low,conf_ci_high,n_tasks,alpha,"
             "alpha_source"]
    for name, values in layers.items():
        for u, v in enumerate(values):
            if v is None:
                lines.append(f"{name},{u},constant,,,,,,,0,{alpha},{source}")
            else:
                lines.append(f"{name},{u},ok,{round(v * 20) / 20},{v},,,,,20,{alpha},{source}")
    path.write_text("\n".join(lines) + "\n")
    settings = {"seed": 0, "n_boot": 300, "selection": "fair", "tasks": 20, "explanations": 9, "image_size": 64,
                "backend_fingerprint": "abc", "alpha": alpha, "alpha_source": source}
    base = {"n_rows": 1000, "data": "digits", "settings": settings}
    for key, value in (meta or {}).items():
        if key.startswith("settings."):
            settings[key.partition(".")[2]] = value
        else:
            base[key] = value
    path.with_suffix(".json").write_text(json.dumps(base))
    return path


def test_sweep_means_are_layer_balanced_feature_means_with_class_units_apart(tmp_path):
    rng = np.random.default_rng(0)
    conv_a, conv_b = list(0.8 + 0.05 * rng.random(10)), list(0.6 + 0.05 * rng.random(40))
    soft = list(0.5 + 0.05 * rng.random(10))
    _write_scores(tmp_path / "base.csv", {"a": conv_a, "b": conv_b, "softmax": soft})
    # pruning removes 30 units of b (now constant) but changes no remaining unit's score
    pruned_b = conv_b[:10] + [None] * 30
    _write_scores(tmp_path / "p.csv", {"a": conv_a, "b": pruned_b, "softmax": soft})
    (tmp_path / "runs.csv").write_text("name,method,rate,scores\nbase,none,0,base.csv\np,structured,0.6,p.csv\n")
    sweep_report(tmp_path / "runs.csv", tmp_path / "out")
    rows = {r["name"]: r for r in _csv(tmp_path / "out" / "sweep.csv")}
    for name, b in (("base", conv_b), ("p", conv_b[:10])):
        expected = (np.mean(conv_a) + np.mean(b)) / 2  # the mean over layers of each layer's mean
        assert float(rows[name]["mis_confidence"]) == pytest.approx(expected, rel=1e-5)
        assert float(rows[name]["class_mis_confidence"]) == pytest.approx(np.mean(soft), rel=1e-5)
    assert rows["p"]["n_units"] == "30" and rows["p"]["n_constant"] == "30" and rows["base"]["n_constant"] == "0"
    # pooled means move although no score changed; the paired difference is exactly zero
    pooled = [np.mean(conv_a + b + soft) for b in (conv_b, conv_b[:10])]
    assert abs(pooled[0] - pooled[1]) > 0.01
    paired = {r["layer"]: r for r in _csv(tmp_path / "out" / "paired.csv")}
    assert float(paired["features"]["diff_mis_confidence"]) == 0 and paired["features"]["n_pairs"] == "20"
    assert float(paired["features"]["wilcoxon_p_confidence"]) == 1.0
    layers = _csv(tmp_path / "out" / "sweep_layers.csv")
    assert [(r["name"], r["layer"], r["kind"]) for r in layers][:3] == [("base", "a", "feature"), ("base", "b", "feature"),
                                                                         ("base", "softmax", "class")]
    assert float(layers[4]["mis_confidence"]) == pytest.approx(np.mean(conv_b[:10]), rel=1e-5)


def _csv(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_paired_differences_against_scipy_and_incompatible_runs(tmp_path):
    rng = np.random.default_rng(4)
    base = {"a": list(0.7 + 0.1 * rng.random(25)), "b": list(0.6 + 0.1 * rng.random(15)), "softmax": [0.5] * 4}
    shifted = {k: [v + d for v, d in zip(vals, 0.03 + 0.02 * rng.standard_normal(len(vals)))] for k, vals in base.items()}
    shifted["a"][3] = None  # constant in the pruned run: not paired
    _write_scores(tmp_path / "control.csv", base)
    _write_scores(tmp_path / "p.csv", shifted)
    (tmp_path / "runs.csv").write_text("name,method,rate,scores\ncontrol,none,0,control.csv\np,unstructured,0.4,p.csv\n")
    sweep_report(tmp_path / "runs.csv", tmp_path / "out")
    layers = {r["layer"]: r for r in _csv(tmp_path / "out" / "paired_layers.csv")}
    for name in ("a", "b"):
        pairs = [(s, c) for s, c in zip(shifted[name], base[name]) if s is not None]
        diffs = np.array([round(s, 6) - round(c, 6) for s, c in pairs])  # as mis.csv stores them
        row = layers[name]
        assert int(row["n_pairs"]) == len(pairs)
        assert float(row["diff_mis_confidence"]) == pytest.approx(diffs.mean(), abs=1e-5)
        assert float(row["wilcoxon_p_confidence"]) == pytest.approx(stats.wilcoxon(diffs).pvalue, rel=1e-4)
        assert float(row["diff_conf_ci_low"]) < diffs.mean() < float(row["diff_conf_ci_high"])
    features = next(r for r in _csv(tmp_path / "out" / "paired.csv") if r["layer"] == "features")
    d_a = np.array([s - c for s, c in zip(shifted["a"], base["a"]) if s is not None])
    d_b = np.array([s - c for s, c in zip(shifted["b"], base["b"])])
    assert float(features["diff_mis_confidence"]) == pytest.approx((d_a.mean() + d_b.mean()) / 2, abs=1e-5)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["paired_baseline"] == "control"
    # incompatible runs: an error naming the setting and both files
    _write_scores(tmp_path / "p.csv", shifted, meta={"settings.backend_fingerprint": "other"})
    with pytest.raises(MisbenchError, match=r"settings.backend_fingerprint .*p.csv.*control.csv"):
        sweep_report(tmp_path / "runs.csv", tmp_path / "out2")
    _write_scores(tmp_path / "p.csv", shifted, meta={"n_rows": 500})
    with pytest.raises(MisbenchError, match="n_rows"):
        sweep_report(tmp_path / "runs.csv", tmp_path / "out2")
    _write_scores(tmp_path / "p.csv", shifted, alpha=3.0, source="user")
    r = CliRunner().invoke(cli, ["report", "sweep", "--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "o3")])
    assert r.exit_code == 1 and "settings.alpha" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["report", "sweep", "--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "o3"),
                                 "--baseline", "base"])
    assert r.exit_code == 1 and "baseline run 'base' not found" in r.output


def test_each_run_counts_once_in_correlations(tmp_path):
    # a baseline listed once per method (as the seed's table does) enters the correlation once
    rows = ["name,method,rate,mis_confidence,mis"]
    for method in ("unstructured", "structured", "connection"):
        rows.append(f"base_{method},{method},0,0.70,0.80")
    values = {0.2: 0.71, 0.4: 0.74, 0.6: 0.69, 0.8: 0.77}
    runs = [(m, r, v + k / 100) for k, m in enumerate(("unstructured", "structured")) for r, v in values.items()]
    rows += [f"{m}_{r},{m},{r},{v},0.8" for m, r, v in runs]
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    summary = sweep_report(tmp_path / "runs.csv", tmp_path / "out")
    x, y = [0.0] + [r for _, r, _ in runs], [0.70] + [v for _, _, v in runs]
    c = summary["correlation_rate_mis_confidence"]
    assert c["n"] == 9 and c["pearson_r"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert c["pearson_ci"] == pytest.approx(list(stats.pearsonr(x, y).confidence_interval(0.95)))
    assert summary["duplicate_rows"] == ["base_structured", "base_connection"] and summary["n_rows"] == 11
    assert len(_csv(tmp_path / "out" / "sweep.csv")) == 11  # every row stays in the table and figures


def test_layer_intervals_agree_between_mis_json_and_reports(tmp_path, property_folder):
    root, props = property_folder
    n = len(props["hue"])
    rng = np.random.default_rng(3)
    acts = write_acts(tmp_path / "acts.h5", root, {"l1": np.stack([props["hue"], props["brightness"]], 1),
                                                   "l2": rng.normal(size=(n, 6))})
    meta = score(acts, ["all"], ScoreSettings(similarity="pixel", image_size=16, device="cpu", n_boot=200, seed=2),
                 tmp_path / "mis.csv")
    r = CliRunner().invoke(cli, ["report", "layers", "--scores", str(tmp_path / "mis.csv"), "--out", str(tmp_path / "l")])
    assert r.exit_code == 0, r.output
    for row in _csv(tmp_path / "l" / "layers.csv"):
        js = meta["layers"][row["layer"]]
        assert float(row["conf_ci_low"]) == pytest.approx(js["mis_confidence_ci"][0], rel=1e-5)
        assert float(row["conf_ci_high"]) == pytest.approx(js["mis_confidence_ci"][1], rel=1e-5)
        assert float(row["mis_ci_low"]) == pytest.approx(js["mis_ci"][0], rel=1e-5)
        assert row["alpha_source"] == "default"
    recomputed = score_summaries(_scores(tmp_path / "mis.csv"), ["l1", "l2"], 2, 200)
    assert recomputed["feature_mean"]["mis_confidence"] == pytest.approx(
        np.mean([meta["layers"][k]["mis_confidence"] for k in ("l1", "l2")]))
    units = _csv(tmp_path / "mis.csv")
    for u in units:
        if u["status"] == "ok":
            k = round(float(u["mis"]) * 20 * 2) / 2
            assert (float(u["mis_ci_low"]), float(u["mis_ci_high"])) == pytest.approx(clopper_pearson(k, 20), abs=1e-5)
            assert float(u["alpha"]) == meta["alpha"]
    assert meta["alpha_source"] == "default" and meta["settings"]["alpha_source"] == "default"


def _scores(path):
    from misbench.reports.tables import read_scores

    return read_scores(path)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -1.0, 0.0])
def test_bad_alpha_is_refused(alpha):
    # made directly, the settings name their field (the CLI says --alpha, a config [score] alpha: runtime/schema.py)
    with pytest.raises(MisbenchError, match=r"^alpha \S+: expected a finite positive sigmoid slope"):
        ScoreSettings(alpha=alpha)


def test_user_alpha_is_recorded_and_sweep_warns_on_uncalibrated(tmp_path, property_folder):
    root, props = property_folder
    acts = write_acts(tmp_path / "acts.h5", root, {"l": np.stack([props["hue"]], 1)})
    meta = score(acts, ["l"], ScoreSettings(similarity="pixel", image_size=16, device="cpu", n_boot=50, alpha=3.5),
                 tmp_path / "mis.csv")
    assert meta["alpha"] == 3.5 and meta["alpha_source"] == "user"
    assert {(u["alpha"], u["alpha_source"]) for u in _csv(tmp_path / "mis.csv")} == {("3.5", "user")}
    r = CliRunner().invoke(cli, ["score", str(acts), "--layer", "l", "--out", str(tmp_path / "x.csv"), "--alpha", "nan",
                                 "--similarity", "pixel"])
    assert r.exit_code == 1 and "--alpha nan" in r.output and len(r.output.strip().splitlines()) == 1
    (tmp_path / "runs.csv").write_text("name,method,rate,scores\nbase,none,0,mis.csv\n")
    r = CliRunner().invoke(cli, ["report", "sweep", "--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0 and "warning: mis_confidence uses an uncalibrated alpha (user)" in r.output


def test_topk_tie_seed_is_recorded_and_other_seeds_rank_identically_or_refuse(tmp_path, property_folder):
    from misbench.datasets.sources import FolderSource
    from misbench.activations.store import SCHEMA, ActivationWriter

    root, props = property_folder
    n = len(props["hue"])
    values = np.round(props["hue"] * 4) / 4  # heavy ties: ranks 200 and 250 share a value
    distinct = props["brightness"]
    full = write_acts(tmp_path / "full.h5", root, {"tied": values[:, None], "distinct": distinct[:, None]})
    source = FolderSource(str(root), root.resolve())
    attrs = {"schema": SCHEMA, "schema_version": 1, "misbench_version": "test", "model": "test", "checkpoint_sha256": "",
             "arch": "test", "data": str(root), "data_root": str(root.resolve()), "num_classes": 3,
             "class_names": json.dumps(source.classes), "transform": "{}", "reduction": "mean", "created_utc": "",
             "layer_names": json.dumps(["tied", "distinct"])}
    writer = ActivationWriter(tmp_path / "topk.h5", attrs)
    states = {}
    for name, v in (("tied", values), ("distinct", distinct)):
        t = TopK(name, 1, 250)
        t.update(v[:, None].astype(np.float32), np.arange(n), np.arange(n))
        states[name] = t.state()
    layer_attrs = {k: {"module": k, "kind": "linear", "n_units": 1, "reduction": "mean"} for k in states}
    writer.append(np.arange(n), [source.path(i) for i in range(n)], np.zeros(n, np.int64), np.zeros((n, 3), np.float32),
                  {}, layer_attrs, np.float32, next_index=n, topk=states)
    writer.finish()
    writer.close()
    import h5py

    with h5py.File(tmp_path / "topk.h5", "r") as h5:
        assert h5["layers/tied"].attrs["tie_seed"] == 0
    settings = dict(similarity="pixel", image_size=16, device="cpu", n_boot=50)
    for seed in (0, 1):  # no ties in "distinct": every seed ranks as on the full file
        a = score(full, ["distinct"], ScoreSettings(**settings, seed=seed), tmp_path / f"f{seed}.csv")
        b = score(tmp_path / "topk.h5", ["distinct"], ScoreSettings(**settings, seed=seed), tmp_path / f"t{seed}.csv")
        assert _csv(tmp_path / f"f{seed}.csv") == _csv(tmp_path / f"t{seed}.csv") and a["layers"] == b["layers"]
    score(full, ["tied"], ScoreSettings(**settings, seed=0), tmp_path / "ft.csv")
    score(tmp_path / "topk.h5", ["tied"], ScoreSettings(**settings, seed=0), tmp_path / "tt.csv")
    assert _csv(tmp_path / "ft.csv") == _csv(tmp_path / "tt.csv")
    with pytest.raises(MisbenchError, match=r"tie seed 0.*--seed 0"):
        score(tmp_path / "topk.h5", ["tied"], ScoreSettings(**settings, seed=1), tmp_path / "t1b.csv")
    # the rule itself: refuse exactly when the value at rank `needed` ties with the last kept one
    top = np.array([[5, 4, 3, 3, 2], [5, 4, 3, 3, 3]], float)
    check_tie_order(top[:1], -top[:1], 3, 100, 0, 1, "x", "f.h5")
    with pytest.raises(MisbenchError, match="unit 0 keeps its top"):
        check_tie_order(top[1:], -top[:1], 3, 100, 0, 1, "x", "f.h5")


def _tasks_file(tmp_path, property_folder):
    root, props = property_folder
    acts = write_acts(tmp_path / "acts.h5", root, {"v": np.stack([props["brightness"], props["hue"], props["stripes"]], 1)})
    score(acts, ["v"], ScoreSettings(similarity="pixel", image_size=16, device="cpu", n_boot=20), tmp_path / "m.csv",
          tasks_out=tmp_path / "t.h5")
    import h5py

    with h5py.File(tmp_path / "t.h5", "r") as h5:
        return acts, h5["v"]["delta"][...]


def test_calibrate_reads_the_imi_trial_table_and_warns_on_anti_correlation(tmp_path, property_folder):
    acts, deltas = _tasks_file(tmp_path, property_folder)
    rng = np.random.default_rng(0)
    alpha_true = 4.0 / np.abs(deltas).mean()
    # the IMI analysis table: pandas index column, demo and catch trials, two models, extra columns
    lines = [",task_id,participant_id,is_demo,catch_trial,correct,rt,model,layer,channel,batch,mode"]
    keep_delta, keep_correct = [], []
    k = 0
    for rep in range(6):
        for unit in range(3):
            for task in range(20):
                d = deltas[unit, task]
                c = bool(rng.random() < 1 / (1 + np.exp(-alpha_true * d)))
                lines.append(f"{k},t-{rep},w{rep},False,False,{c},1200,mine,v,{unit},{task},natural")
                keep_delta.append(d)
                keep_correct.append(c)
                k += 1
    lines += [f"{k + 1},t-0,w0,True,False,False,900,mine,v,0,0,natural",  # demo trial: left out
              f"{k + 2},t-0,w0,False,True,False,900,mine,v,1,1,catch_trial",  # catch trial: left out
              f"{k + 3},t-0,w0,False,False,False,900,other,v,2,2,natural"]  # another model's trial
    (tmp_path / "imi.csv").write_text("\n".join(lines) + "\n")
    from misbench.scoring.calibrate import fit_alpha, read_responses

    with pytest.raises(MisbenchError, match="several models"):
        read_responses(tmp_path / "imi.csv", tmp_path / "t.h5")
    delta, correct = read_responses(tmp_path / "imi.csv", tmp_path / "t.h5", model="mine")
    assert np.array_equal(delta, np.array(keep_delta)) and np.array_equal(correct, np.array(keep_correct, float))
    fit = fit_alpha(delta, correct)
    # independent maximum likelihood: a dense grid over alpha
    grid = np.linspace(0.2, 3, 2801) * alpha_true
    nll = [-np.sum(np.where(correct, -np.logaddexp(0, -a * delta), -np.logaddexp(0, a * delta))) for a in grid]
    assert fit["alpha"] == pytest.approx(grid[int(np.argmin(nll))], rel=2e-3) and not fit["anti_correlated"]
    runner = CliRunner()
    r = runner.invoke(cli, ["calibrate", str(tmp_path / "imi.csv"), "--tasks", str(tmp_path / "t.h5"), "--model", "mine",
                            "--out", str(tmp_path / "fit.json")])
    assert r.exit_code == 0, r.output
    from misbench.runtime.fileio import sha256_file

    r = runner.invoke(cli, ["score", str(acts), "--layer", "v", "--out", str(tmp_path / "c.csv"), "--similarity", "pixel",
                            "--image-size", "16", "--alpha-from", str(tmp_path / "fit.json"), "--bootstrap", "20"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta["alpha"] == pytest.approx(fit["alpha"]) and meta["alpha_source"] == f"calibrated:{sha256_file(tmp_path / 'imi.csv')}"
    assert "not calibrated" not in r.output
    # anti-correlated responses: a warning, not alpha ~ 0
    anti = ["delta,correct"] + [f"{d},{int(d < 0)}" for d in deltas.ravel()]
    (tmp_path / "anti.csv").write_text("\n".join(anti) + "\n")
    r = runner.invoke(cli, ["calibrate", str(tmp_path / "anti.csv"), "--out", str(tmp_path / "anti.json")])
    assert r.exit_code == 0 and "warning: the responses are anti-correlated" in r.output
    saved = json.loads((tmp_path / "anti.json").read_text())
    assert saved["alpha"] is None and saved["fitted_slope"] < 0
    r = runner.invoke(cli, ["score", str(acts), "--layer", "v", "--out", str(tmp_path / "d.csv"), "--similarity", "pixel",
                            "--alpha-from", str(tmp_path / "anti.json")])
    assert r.exit_code == 1 and "anti.json" in r.output and "alpha=None" in r.output
    # unknown columns: one line naming the file and the column
    (tmp_path / "odd.csv").write_text("delta,correct,confidence\n0.1,1,3\n")
    r = runner.invoke(cli, ["calibrate", str(tmp_path / "odd.csv")])
    assert r.exit_code == 1 and "odd.csv: unknown column 'confidence'" in r.output and len(r.output.strip().splitlines()) == 1


class _StandIn(torch.nn.Module):
    """A DreamSim stand-in: a linear map of the pixels (weights identify it)."""

    def __init__(self, size, seed=0):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(3 * size * size, 12, generator=torch.Generator().manual_seed(seed)))

    def embed(self, images):
        return images.reshape(len(images), -1).to(self.proj.dtype) @ self.proj


def test_dreamsim_as_the_paper_ran_it(tmp_path, property_folder, monkeypatch):
    from PIL import Image
    from torchvision.transforms import functional as F

    from misbench.similarity.dreamsim import WEIGHTS_ENV, DreamSimBackend, weights_dir

    backend = DreamSimBackend(embedder=_StandIn(224))
    assert backend.image_size == 224 and backend.resample == "stretch-bicubic"
    # the model moves with the backend (score calls backend.to(device))
    backend.to(torch.float64)
    assert backend.embedder.model.proj.dtype == torch.float64
    x, y = torch.rand(3, 3, 224, 224, dtype=torch.float64), torch.rand(3, 3, 224, 224, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(backend.embedder.model.embed(x), backend.embedder.model.embed(y))
    assert torch.allclose(backend.pair_distance(x, y).double(), 1 - cos, atol=1e-5)
    # cache keys carry the weights' identity
    a, b = DreamSimBackend(embedder=_StandIn(16, 0)), DreamSimBackend(embedder=_StandIn(16, 1))
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() == DreamSimBackend(embedder=_StandIn(16, 0)).fingerprint()
    # offline: a clear error naming the flag and the variable
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.delenv("DREAMSIM_CACHE", raising=False)
    with pytest.raises(MisbenchError, match=f"--dreamsim-weights DIR or set {WEIGHTS_ENV}"):
        weights_dir(None)
    with pytest.raises(MisbenchError, match="does not exist or is empty"):
        weights_dir(str(tmp_path / "nothing"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "ensemble_lora").mkdir()
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "w"))
    assert weights_dir(None) == tmp_path / "w"
    # score: 224 px, the whole image resized bicubic (no crop), cosine distances
    root, props = property_folder
    acts = write_acts(tmp_path / "acts.h5", root, {"v": props["hue"][:, None]})
    stand_in = DreamSimBackend(embedder=_StandIn(224))
    meta = score(acts, ["v"], ScoreSettings(similarity="dreamsim", device="cpu", n_boot=20, engine="pairwise"),
                 tmp_path / "m.csv", tasks_out=tmp_path / "t.h5", backend=stand_in)
    assert meta["settings"]["image_size"] == 224 and meta["settings"]["resample"] == "stretch-bicubic"
    import h5py

    from misbench.scoring.mis import task_deltas

    with h5py.File(tmp_path / "t.h5", "r") as h5, h5py.File(acts, "r") as f:
        g = h5["v"]
        paths = [p.decode() for p in f["images/path"][...]]
        t = 3
        rows = [int(g["pos_query"][0, t]), int(g["neg_query"][0, t])]
        targets = list(g["pos_expl"][0, t]) + list(g["neg_expl"][0, t])

        def img(row):  # DreamSim's preprocessing, by hand
            with Image.open(root / paths[row]) as im:
                return F.to_tensor(F.resize(im.convert("RGB"), [224, 224], F.InterpolationMode.BICUBIC, antialias=True))

        e = {r: stand_in.embedder.model.embed(img(r)[None].double())[0] for r in set(rows + targets)}
        d = [[1 - torch.nn.functional.cosine_similarity(e[q], e[int(k)], dim=0).item() for k in targets] for q in rows]
        expected = task_deltas(np.array([d[0]]), np.array([d[1]]), 9)[0]
        assert g["delta"][0, t] == pytest.approx(expected, abs=1e-5)


def test_explanations_default_to_the_models_view(tmp_path, property_folder):
    from PIL import Image
    from torchvision.transforms import functional as F

    from misbench.datasets.images import RowImages
    from misbench.activations.store import open_activations

    root, props = property_folder
    acts = write_acts(tmp_path / "acts.h5", root, {"v": props["hue"][:, None]})
    import h5py

    with h5py.File(acts, "r+") as h5:  # the model saw resize 40, centre crop 20
        h5.attrs["transform"] = json.dumps({"resize": 40, "crop": 20, "mean": [0, 0, 0], "std": [1, 1, 1]})
        path = h5["images/path"][0].decode()
    with Image.open(root / path) as im:
        im = im.convert("RGB")
        model_view = F.to_tensor(F.resize(F.center_crop(F.resize(im, 40, antialias=True), 20), 16, antialias=True))
        raw_view = F.to_tensor(F.center_crop(F.resize(im, 16, antialias=True), 16))
    with open_activations(acts) as a:
        seen = RowImages(a, [0], 16)[0][0]
        raw = RowImages(a, [0], 16, view="raw")[0][0]
        assert torch.allclose(seen, model_view, atol=1e-6) and torch.allclose(raw, raw_view, atol=1e-6)
        assert not torch.allclose(seen, raw, atol=1e-3)
        assert RowImages(a, [0], 16).identity != RowImages(a, [0], 16, view="raw").identity  # cache keys differ
    m = score(acts, ["v"], ScoreSettings(similarity="pixel", device="cpu", n_boot=20, view="raw"), tmp_path / "r.csv")
    assert m["settings"]["view"] == "raw" and m["settings"]["image_size"] == 64
    with pytest.raises(MisbenchError, match="view: 'crop' is not allowed; expected one of model, raw"):
        ScoreSettings(view="crop")


def test_deepfeat_is_the_cosine_distance_of_normalised_stage_features():
    import torchvision

    from misbench.similarity.deepfeat import DeepFeatBackend

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None).eval()
    deep = DeepFeatBackend("mobilenet_v2", image_size=32, model=net)
    x, y = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def vector(images):  # by hand: every stage end, unit-normalised per position, 1/sqrt(HW), concatenated
        h, parts = (images - mean) / std, []
        with torch.no_grad():
            for k, module in enumerate(net.features):
                h = module(h)
                if k in deep.taps:
                    f = h / (h.norm(dim=1, keepdim=True) + 1e-10)
                    parts.append((f / (f.shape[2] * f.shape[3]) ** 0.5).flatten(1))
        return torch.cat(parts, 1)

    expected = 1 - torch.nn.functional.cosine_similarity(vector(x), vector(y))
    assert torch.allclose(deep.pair_distance(x, y), expected, atol=1e-5)
    assert torch.allclose((deep.embed(x) - deep.embed(y)).pow(2).sum(1), expected, atol=1e-5)
    assert float(expected.max()) <= 2


def test_derived_alpha_maps_the_median_task_to_three_quarters(tmp_path, property_folder):
    from misbench.scoring.calibrate import derive_alpha

    _, deltas = _tasks_file(tmp_path, property_folder)
    rule = derive_alpha(deltas)
    assert rule["median_abs_delta"] == pytest.approx(np.median(np.abs(deltas)))
    assert 1 / (1 + np.exp(-rule["alpha"] * rule["median_abs_delta"])) == pytest.approx(0.75)
    r = CliRunner().invoke(cli, ["calibrate", "--derive", str(tmp_path / "t.h5"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["alpha"] == pytest.approx(rule["alpha"])
    r = CliRunner().invoke(cli, ["calibrate", "--derive", str(tmp_path / "t.h5"), "--out", str(tmp_path / "fit.json")])
    assert r.exit_code == 1 and f"--alpha {rule['alpha']:.4g}" in r.output and "writes no calibration" in r.output
    assert not (tmp_path / "fit.json").exists()
    (tmp_path / "fit.json").write_text("{}")  # an existing --out: the --derive error comes first, not --overwrite's
    r = CliRunner().invoke(cli, ["calibrate", "--derive", str(tmp_path / "t.h5"), "--out", str(tmp_path / "fit.json")])
    assert r.exit_code == 1 and "writes no calibration" in r.output and (tmp_path / "fit.json").read_text() == "{}"


# The seed's own per-run table (its authors' Plotting/correlation-new.py): MIS confidence at rates 0-0.8 per method,
# the unpruned baseline repeated as each method's rate-0 value.
SEED_RATES = (0.0, 0.2, 0.4, 0.6, 0.8)
SEED_TABLE = {
    "structured_sgd50": (0.699678, 0.673034, 0.684253, 0.705554, 0.749621),
    "structured_adam50": (0.699678, 0.703319, 0.692476, 0.709577, 0.739509),
    "connection_random_sgd50": (0.699678, 0.670764, 0.670914, 0.678927, 0.687622),
    "connection_l1_not_retrained": (0.699678, 0.649680, 0.657086, 0.672725, 0.659024),
    "connection_l1_sgd50": (0.699678, 0.66876, 0.66879, 0.672433, 0.67687),
    "global_unstructured_sgd50": (0.699678, 0.67216, 0.670561, 0.68272, 0.697552),
    "structured_not_retrained": (0.699678, 0.67145, 0.686136, 0.66566, 0.70404),
    "structured_iterative_4x50": (0.699678, 0.7, 0.7, 0.7, 0.714553),
}


def test_the_seeds_table_counted_once(tmp_path):
    rows = ["name,method,rate,mis_confidence"]
    for method, values in SEED_TABLE.items():
        rows += [f"{method}_{rate},{method},{rate},{v}" for rate, v in zip(SEED_RATES, values)]
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    summary = sweep_report(tmp_path / "runs.csv", tmp_path / "out")
    c = summary["correlation_rate_mis_confidence"]
    pruned = [(r, v) for values in SEED_TABLE.values() for r, v in zip(SEED_RATES[1:], values[1:])]
    x, y = [0.0] + [r for r, _ in pruned], [0.699678] + [v for _, v in pruned]
    once = stats.pearsonr(x, y)
    assert c["n"] == 33 == len(x) and summary["n_rows"] == 40
    assert c["pearson_r"] == pytest.approx(once.statistic)
    assert c["pearson_p"] == pytest.approx(2 * stats.norm.sf(np.arctanh(abs(once.statistic)) * np.sqrt(30)))
    assert c["spearman_rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    # the figures docs/reproducing.md quotes: 0.38 (p 0.03) once, 0.1214 with the baseline 8 times
    assert round(once.statistic, 2) == 0.38 and round(once.pvalue, 2) == 0.03
    all_rows = [(r, v) for values in SEED_TABLE.values() for r, v in zip(SEED_RATES, values)]
    assert round(stats.pearsonr(*zip(*all_rows)).statistic, 4) == 0.1214


def test_calibrate_refuses_separated_responses_and_reads_spreadsheet_csv(tmp_path):
    """Every human right on every task: the likelihood rises without bound in alpha (checked on a grid
    here), so no alpha may be reported, let alone used by --alpha-from. A spreadsheet's "CSV UTF-8"
    (a BOM before the header) reads like the plain file."""
    from misbench.scoring.calibrate import calibration_alpha, fit_alpha

    delta = np.array([0.1, 0.2, 0.3, 0.05, 0.0, -0.4])
    correct = np.array([1, 1, 1, 1, 0, 0])
    grid = np.exp(np.linspace(0, 12, 25))
    loglik = [-np.sum(correct * np.logaddexp(0, -a * delta) + (1 - correct) * np.logaddexp(0, a * delta))
              for a in grid]
    assert np.all(np.diff(loglik) > -1e-12)  # no interior maximum: the independent reason to refuse
    fit = fit_alpha(delta, correct)
    assert fit["alpha"] is None and fit["separated"] and "separation" in fit["warning"]

    body = "correct,delta\n" + "".join(f"{c},{d}\n" for c, d in zip(correct, delta))
    (tmp_path / "plain.csv").write_text(body)
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + body.encode())
    runner = CliRunner()
    outs = []
    for name in ("plain", "excel"):
        res = runner.invoke(cli, ["calibrate", str(tmp_path / f"{name}.csv"), "--out", str(tmp_path / f"{name}.json")])
        assert res.exit_code == 0, res.output
        assert "warning:" in res.output and "separation" in res.output
        outs.append({k: v for k, v in json.loads((tmp_path / f"{name}.json").read_text()).items()
                     if k not in ("responses", "responses_sha256")})
    assert outs[0] == outs[1]
    with pytest.raises(MisbenchError, match="positive alpha"):
        calibration_alpha(tmp_path / "plain.json")

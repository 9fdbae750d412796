"""Numbers that cannot mislead (issue 20): sparse units and tie-filled pools, constants by scale, per-unit
intervals that cover, one estimand per comparison. Each against an independent computation (brute-force
loops, scipy, simulation against known means)."""

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import stats

from conftest import write_acts
from misbench.activations.order import tie_keys
from misbench.scoring.mis import density, is_constant, is_sparse, pool_ties, rank_rows
from misbench.scoring.results import load_scores
from misbench.scoring.run import ScoreSettings, score
from misbench.scoring.summaries import MAX_TRIALS_PER_TASK, confidence_intervals, score_summaries


def _csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_constant_is_relative_to_magnitude_and_stored_resolution():
    rng = np.random.default_rng(0)
    tiny = (1e-9 * rng.normal(size=450)).astype(np.float32)  # a real ordering at a small scale
    assert not is_constant(tiny) and not is_constant(tiny * np.float32(1e-20))
    wobble = np.full(450, 1000, np.float32)
    wobble[::7] = np.nextafter(np.float32(1000), np.float32(2000))  # one float32 step: rounding, not an ordering
    assert is_constant(wobble) and is_constant(np.zeros(450, np.float32))
    half = np.full(450, 1.0, np.float16)
    half[::3] = np.nextafter(np.float16(1), np.float16(2))  # 1 ulp of float16: constant in a float16 file ...
    assert is_constant(half)
    assert not is_constant(half.astype(np.float32), np.float32) and is_constant(half.astype(np.float32), np.float16)
    assert not is_constant(np.array([1000, 1001], np.float32))


def _brute_ties(values, keys, pool):
    """Rank by (value desc, key) with a plain sort, take the pool, and count its rows that share the boundary
    value with a row left outside the pool."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], keys[i]))
    inside, outside = order[:pool], order[pool:]
    boundary = values[inside[-1]]
    straddles = any(values[i] == boundary for i in outside)
    return sum(1 for i in inside if values[i] == boundary) if straddles else 0


def test_tie_counts_density_and_sparsity_against_brute_force():
    rng = np.random.default_rng(1)
    keys = tie_keys(0, "l", 0, np.arange(300))
    for trial in range(40):
        values = rng.integers(0, rng.integers(2, 30), 300).astype(np.float64)
        values[rng.random(300) < rng.random()] = 0.0  # a share of exact zeros, as a ReLU or top-k feature
        for pool in (1, 37, 120, 200):
            top, bottom = pool_ties(values, pool)
            assert top == _brute_ties(values, keys, pool)
            assert bottom == _brute_ties(-values, keys, pool)
            ranked = rank_rows(values, keys, True, pool)  # the selection's own ranking agrees on the pool
            assert sorted(values[ranked]) == sorted(values[np.argsort(-values, kind="stable")[:pool]])
            assert is_sparse(values, pool) == (values[ranked[-1]] == values.min())
        assert density(values, 300) == pytest.approx(np.mean(values > values.min()))
    assert pool_ties(np.arange(10.0), 4) == (0, 0)


def _root(acts):
    with h5py.File(acts, "r") as h5:
        return Path(h5.attrs["data_root"])


@pytest.fixture
def sparse_file(tmp_path, property_folder):
    root, props = property_folder
    hue = props["hue"]
    layers = {"v": np.stack([hue, np.maximum(hue - 0.7, 0), 1e-9 * hue], 1)}
    return write_acts(tmp_path / "acts.h5", root, layers), hue


def test_sparse_units_are_scored_counted_and_left_out_unless_kept(tmp_path, sparse_file):
    acts, hue = sparse_file
    settings = dict(similarity="pixel", image_size=16, device="cpu", n_boot=50, selection="quantile", quantile=0.4)
    meta = score(acts, ["v"], ScoreSettings(**settings), tmp_path / "mis.csv", tasks_out=tmp_path / "tasks.h5")
    rows = {int(r["unit"]): r for r in _csv(tmp_path / "mis.csv")}
    pool = int(np.ceil(0.4 * len(hue)))
    zeros = int(np.sum(hue <= 0.7))
    assert [rows[u]["status"] for u in (0, 1, 2)] == ["ok", "sparse", "ok"]  # 1e-9 * hue is no constant
    assert float(rows[1]["density"]) == pytest.approx(1 - zeros / len(hue), abs=1e-5)
    assert (int(rows[1]["top_random"]), int(rows[1]["bottom_random"])) == (pool - (len(hue) - zeros), pool)
    assert (int(rows[0]["top_random"]), int(rows[0]["bottom_random"]), float(rows[0]["density"])) == (0, 0, pytest.approx(1 - 1 / len(hue), abs=1e-5))
    assert rows[1]["mis"] != "" and rows[2]["mis"] != ""
    scaled = write_acts(tmp_path / "scaled.h5", _root(acts),
                        {"v": (1e-9 * hue)[:, None]})
    score(scaled, ["v"], ScoreSettings(**settings), tmp_path / "scaled.csv")
    assert _csv(tmp_path / "scaled.csv")[0]["mis_confidence"] == rows[0]["mis_confidence"]  # scale changes nothing
    layer = meta["layers"]["v"]
    assert layer["n_sparse"] == 1 and layer["n_units"] == 2 and meta["feature_mean"]["n_sparse"] == 1
    assert layer["mis_confidence"] == pytest.approx(np.mean([float(rows[u]["mis_confidence"]) for u in (0, 2)]),
                                                    abs=1e-6)
    kept = score(acts, ["v"], ScoreSettings(**settings, keep_sparse=True), tmp_path / "kept.csv")
    assert kept["layers"]["v"]["n_units"] == 3 and kept["feature_mean"]["sparse_included"]
    assert kept["layers"]["v"]["mis_confidence"] == pytest.approx(
        np.mean([float(rows[u]["mis_confidence"]) for u in (0, 1, 2)]), abs=1e-6)
    df = load_scores(tmp_path / "mis.csv")
    assert list(df["status"]) == ["ok", "sparse", "ok"] and df["top_random"].iloc[1] == pool - (len(hue) - zeros)
    # the per-unit confidence interval is the closed form over the stored task deltas, all units at once
    with h5py.File(tmp_path / "tasks.h5", "r") as h5:
        deltas = h5["v"]["delta"][...]
    lo, hi = confidence_intervals(1 / (1 + np.exp(-meta["alpha"] * deltas)))
    assert [float(rows[u]["conf_ci_low"]) for u in (0, 1, 2)] == pytest.approx(lo, abs=1e-5)
    assert [float(rows[u]["conf_ci_high"]) for u in (0, 1, 2)] == pytest.approx(hi, abs=1e-5)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


_HERMITE_NODES, _HERMITE_WEIGHTS = np.polynomial.hermite_e.hermegauss(120)


def _true_mean(m, s):
    """E[sigmoid(m + s Z)], Z standard normal, by Gauss-Hermite quadrature (exact to ~1e-10 here)."""
    x, w = _HERMITE_NODES, _HERMITE_WEIGHTS
    return float(np.sum(w * _sigmoid(m + s * x)) / np.sqrt(2 * np.pi))


@pytest.mark.parametrize("spread", [0.5, 1.0, 1.5, 2.0])
def test_confidence_intervals_cover_known_means_at_20_tasks(spread):
    """Task values sigmoid(alpha * delta) with alpha * delta ~ N(m, spread) across tasks (the median |alpha delta|
    is ln 3 ~ 1.1 by the default alphas' rule, so spreads up to 2 per unit are the realistic range); m is
    set so that the true mean confidence is 0.5 ... 0.95. Coverage of the 95 % interval must be >= 0.94
    (the percentile bootstrap gives 0.85-0.93 at the high means)."""
    rng = np.random.default_rng(int(spread * 10))
    for target in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        lo_m, hi_m = -10.0, 30.0
        for _ in range(100):  # bisection for m with E[sigmoid] = target
            mid = (lo_m + hi_m) / 2
            lo_m, hi_m = (mid, hi_m) if _true_mean(mid, spread) < target else (lo_m, mid)
        values = _sigmoid(rng.normal(lo_m, spread, (4000, 20)))
        lo, hi = confidence_intervals(values)
        coverage = np.mean((lo <= target) & (target <= hi))
        assert coverage >= 0.94, (spread, target, coverage)
        assert np.all((lo <= values.mean(1)) & (values.mean(1) <= hi))


def test_confidence_intervals_edge_cases_and_determinism():
    one = confidence_intervals(np.full((3, 1), 0.8))
    assert np.isnan(one[0]).all() and np.isnan(one[1]).all()  # one task: no interval (NaN, with a stated reason)
    # every task equal: the dispersion floor (a task counts as at most MAX_TRIALS_PER_TASK trials) gives the
    # exact binomial interval of that many trials, never a zero width
    T = 20
    lo, hi = confidence_intervals(np.ones((1, T)))
    n_star = MAX_TRIALS_PER_TASK * T * (stats.norm.ppf(0.975) / stats.t.ppf(0.975, T - 1)) ** 2
    assert hi[0] == 1 and lo[0] == pytest.approx(0.025 ** (1 / n_star), rel=1e-9)  # Beta(n*, 1) quantile
    # Bernoulli task values: Clopper-Pearson at the effective n, which scipy's exact binomial interval gives
    # for whole numbers (here: 10 of 20 successes, n* from the sample variance)
    x = np.array([[1.0] * 10 + [0.0] * 10])
    lo, hi = confidence_intervals(x)
    n_star = 0.25 / (x.var(ddof=1) / T) * (stats.norm.ppf(0.975) / stats.t.ppf(0.975, T - 1)) ** 2
    k = 0.5 * n_star
    assert lo[0] == pytest.approx(stats.beta.ppf(0.025, k, n_star - k + 1)) and lo[0] < 0.5 < hi[0]
    ref = stats.binomtest(10, 20).proportion_ci(0.95, method="exact")
    assert (hi[0] - lo[0]) == pytest.approx(ref.high - ref.low, rel=0.12)  # close to the plain binomial one
    rng = np.random.default_rng(0)
    many = rng.random((50, 20))
    together = confidence_intervals(many)
    alone = np.array([confidence_intervals(row[None])[0][0] for row in many])
    assert np.array_equal(together[0], alone) and np.array_equal(confidence_intervals(many)[0], together[0])


def _brute_sign_flip(layers):
    """Every sign vector by itertools, the layer-balanced mean of the flipped differences, two-sided."""
    import itertools

    d = [x for layer in layers for x in layer]
    which = [k for k, layer in enumerate(layers) for _ in layer]

    def statistic(signs):
        return np.mean([np.mean([s * x for s, x, w in zip(signs, d, which) if w == k]) for k in range(len(layers))])

    observed = statistic([1] * len(d))
    flips = [statistic(signs) for signs in itertools.product((1, -1), repeat=len(d))]
    return np.mean([abs(f) >= abs(observed) - 1e-12 for f in flips])


def test_sign_flip_test_against_brute_force_and_simulation():
    from misbench.reports.stats import sign_flip_test

    rng = np.random.default_rng(5)
    for trial in range(5):
        layers = [rng.normal(0.02 * trial, 0.05, 4), rng.normal(0.01, 0.05, 7)]
        got = sign_flip_test(layers, rng)
        assert got["exact"] and got["p"] == pytest.approx(_brute_sign_flip(layers), abs=1e-12)
    assert sign_flip_test([np.zeros(5)], rng)["p"] == 1.0
    # above EXACT_UP_TO: 10,000 random sign vectors; the estimate is within 4 standard errors of the exact p,
    # enumerated here in numpy over all 2**20 sign vectors
    layers = [rng.normal(0.012, 0.05, 8), rng.normal(0.0, 0.05, 12)]
    d = np.concatenate(layers)
    w = np.concatenate([np.full(8, 1 / 16), np.full(12, 1 / 24)])
    bits = ((np.arange(2 ** 20)[:, None] >> np.arange(20)) & 1).astype(np.int8)
    flipped = (1 - 2 * bits) @ (w * d)
    exact = np.mean(np.abs(flipped) >= abs((w * d).sum()) - 1e-12)
    got = sign_flip_test(layers, np.random.default_rng(0))
    assert not got["exact"] and got["permutations"] == 10_000
    assert abs(got["p"] - exact) < 4 * np.sqrt(exact * (1 - exact) / 10_000) + 1e-4
    assert sign_flip_test(layers, np.random.default_rng(0)) == got  # same seed, same p


def test_paired_p_is_the_sign_flip_test_of_the_layer_balanced_mean(tmp_path):
    """paired.csv's p_confidence tests the estimand its difference and interval describe: the layer-balanced mean
    of per-unit differences. A small layer with a large shift beside a big layer without one: the layer-balanced
    mean is far from 0 while the pooled Wilcoxon test (another estimand) is not significant."""
    from test_statistics import _write_scores

    rng = np.random.default_rng(2)
    base = {"small": list(0.6 + 0.1 * rng.random(6)), "big": list(0.6 + 0.1 * rng.random(60))}
    shifted = {"small": [v + 0.06 + 0.01 * rng.standard_normal() for v in base["small"]],
               "big": [v + 0.02 * rng.standard_normal() - 0.004 for v in base["big"]]}
    _write_scores(tmp_path / "control.csv", base)
    _write_scores(tmp_path / "p.csv", shifted)
    (tmp_path / "runs.csv").write_text("name,method,rate,scores\ncontrol,none,0,control.csv\np,unstructured,0.4,p.csv\n")
    from misbench.reports.sweep import sweep_report

    summary = sweep_report(tmp_path / "runs.csv", tmp_path / "out")
    row = next(r for r in _csv(tmp_path / "out" / "paired.csv") if r["layer"] == "features")
    d = {k: np.array([round(s, 6) - round(c, 6) for s, c in zip(shifted[k], base[k])]) for k in base}
    balanced = (d["small"].mean() + d["big"].mean()) / 2
    assert float(row["diff_mis_confidence"]) == pytest.approx(balanced, abs=1e-6)
    # independent: 200,000 random sign flips in a plain loop over blocks, two-sided on the same statistic
    check = np.random.default_rng(99)
    w_d = np.concatenate([d["small"] / 12, d["big"] / 120])
    hits = sum(int(np.count_nonzero(np.abs(np.where(check.random((20_000, 66)) < 0.5, -1, 1) @ w_d)
                                    >= abs(balanced) - 1e-12)) for _ in range(10))
    assert float(row["p_confidence"]) == pytest.approx(hits / 200_000, abs=0.004)
    assert float(row["p_confidence"]) < 0.05 < float(row["wilcoxon_p_confidence"])
    assert float(row["wilcoxon_p_confidence"]) == pytest.approx(stats.wilcoxon(np.concatenate(list(d.values()))).pvalue,
                                                                rel=1e-4)
    assert summary["paired_test"]["permutations"] == 10_000 and summary["paired_test"]["seed"] == 0


def test_classwise_purity_and_pool_against_brute_force(tmp_path, property_folder):
    from misbench.activations.store import open_activations
    from misbench.reports.build import classwise

    root, props = property_folder
    with open_activations(write_acts(tmp_path / "probe.h5", root, {"x": props["hue"][:, None]})) as f:
        labels, index = f.labels, f.index
    rng = np.random.default_rng(3)
    n = len(labels)
    softmax = rng.random((n, 3)) + 0.6 * (labels[:, None] == np.arange(3))  # class c drives unit c, not alone
    softmax[:40, 1] = softmax[40:80, 1].max()  # a tie group at the top of unit 1
    acts = write_acts(tmp_path / "acts.h5", root, {"softmax": softmax})
    settings = dict(similarity="pixel", image_size=16, device="cpu", n_boot=20, selection="quantile", seed=4)
    for quantile, over in ((0.4, True), (0.1, False)):
        out = tmp_path / f"q{quantile}"
        out.mkdir()
        score(acts, ["softmax"], ScoreSettings(**settings, quantile=quantile), out / "mis.csv")
        classwise(out / "mis.csv", out / "report", acts=acts)
        rows = _csv(out / "report" / "classwise.csv")
        pool = int(np.ceil(quantile * n))
        for r in rows:
            unit = int(r["class"])
            keys = tie_keys(4, "softmax", unit, index)
            order = sorted(range(n), key=lambda i: (-float(np.float32(softmax[i, unit])), keys[i]))
            assert float(r["purity"]) == pytest.approx(np.mean(labels[order[:pool]] == unit), abs=1e-6)
            assert int(r["pool"]) == pool and int(r["class_images"]) == int(np.sum(labels == unit))
        summary = __import__("json").loads((out / "report" / "summary.json").read_text())
        assert (summary["pool_warning"] is not None) == over
        assert ("warning: 3 of 3 class units have a top pool larger" in (out / "report" / "report.html").read_text()) \
            == over


def test_score_closing_line_prints_the_layer_balanced_means(tmp_path, property_folder):
    """The closing line names and prints mis.json's layer-balanced feature and class means (a pooled 'model mean'
    weighs the big layer more); recomputed here from mis.csv with pandas."""
    import pandas as pd
    from click.testing import CliRunner
    from misbench.cli.main import cli

    root, props = property_folder
    rng = np.random.default_rng(8)
    n = len(props["hue"])
    layers = {"big": np.stack([props["hue"] + 0.3 * rng.random(n) * k for k in range(6)], 1),
              "small": np.stack([props["brightness"]], 1), "softmax": rng.random((n, 3))}
    acts = write_acts(tmp_path / "acts.h5", root, layers)
    r = CliRunner().invoke(cli, ["score", str(acts), "--layer", "all", "--out", str(tmp_path / "mis.csv"),
                                 "--similarity", "pixel", "--image-size", "16", "--device", "cpu", "--bootstrap", "20"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(tmp_path / "mis.csv")
    ok = df[df.status == "ok"]
    feature = ok[ok.layer != "softmax"].groupby("layer")[["mis", "mis_confidence"]].mean().mean()
    classes = ok[ok.layer == "softmax"][["mis", "mis_confidence"]].mean()
    line = next(x for x in r.output.splitlines() if x.startswith("layer-balanced feature mean"))
    assert (f"layer-balanced feature mean: MIS {feature['mis']:.3f} confidence {feature['mis_confidence']:.3f} "
            f"(2 layers, 7 units)") in line
    assert f"layer-balanced class mean: MIS {classes['mis']:.3f} confidence {classes['mis_confidence']:.3f}" in line
    assert "left out: 0 constant, 0 sparse" in line and "model mean" not in r.output


def test_import_scores_warns_with_the_count_of_saturated_units(tmp_path, caplog):
    import pickle

    import pandas as pd
    from misbench.reports.importer import import_scores

    rng = np.random.default_rng(0)
    conf = np.concatenate([0.6 + 0.3 * rng.random(40), np.full(7, 0.9995), [1.0] * 3])
    frame = pd.DataFrame({"layer": ["conv"] * 50, "unit": range(50), "mis": np.clip(conf, 0, 1),
                          "mis_confidence": conf, "layer_type": [0] * 50})
    path = tmp_path / "published.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"scores": frame, "layer_types": {"Conv2d": 0}}, handle)
    with caplog.at_level("WARNING"):
        summary = import_scores(path, tmp_path / "a.csv")
    expected = int(np.sum(conf >= 0.999))  # 10, counted by numpy
    assert summary["n_saturated"] == expected
    assert f"{expected} of 50 scored units have mis_confidence >= 0.999" in caplog.text
    assert "--constant-above 0.999" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        marked = import_scores(path, tmp_path / "b.csv", constant_above=0.999)
    assert marked["n_saturated"] == 0 and marked["n_ok"] == 40 and "--constant-above" not in caplog.text

import csv
import json

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from conftest import make_image_folder, write_acts
from misbench.scoring.calibrate import fit_alpha
from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.scoring.mis import Tasks, rank_rows, select_fair, tie_keys
from misbench.scoring.run import MIS_COLUMNS, ScoreSettings, score
from misbench.similarity.lpips import LpipsBackend


@pytest.fixture(scope="module")
def planted(property_folder, tmp_path_factory):
    root, props = property_folder
    rng = np.random.default_rng(5)
    n = len(props["hue"])
    layers = {
        "visible": np.stack([props["brightness"], props["hue"], props["stripes"], np.full(n, 0.25)], 1),
        "noise": rng.normal(size=(n, 40)),
    }
    path = tmp_path_factory.mktemp("acts") / "acts.h5"
    return write_acts(path, root, layers), root, props


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_planted_units_with_pixel_backend(planted, tmp_path):
    acts, _, _ = planted
    meta = score(acts, ["visible", "noise"], ScoreSettings(similarity="pixel", image_size=32, device="cpu", n_boot=200),
                 tmp_path / "mis.csv", tasks_out=tmp_path / "tasks.h5")
    rows = read_csv(tmp_path / "mis.csv")
    assert list(rows[0]) == MIS_COLUMNS and len(rows) == 44
    visible = {int(r["unit"]): r for r in rows if r["layer"] == "visible"}
    assert float(visible[0]["mis"]) >= 0.95  # brightness is what pixel distance sees best
    assert visible[3]["status"] == "constant" and visible[3]["mis"] == "" and visible[3]["n_tasks"] == "0"
    noise = [float(r["mis"]) for r in rows if r["layer"] == "noise"]
    assert abs(np.mean(noise) - 0.5) < 0.1
    low, high = float(visible[0]["mis_ci_low"]), float(visible[0]["mis_ci_high"])
    assert low <= float(visible[0]["mis"]) <= high
    layer = meta["layers"]["visible"]
    assert layer["n_units"] == 3 and layer["n_constant"] == 1
    assert layer["mis"] == pytest.approx(np.mean([float(visible[u]["mis"]) for u in range(3)]))
    saved = json.loads((tmp_path / "mis.json").read_text())
    assert saved["n_rows"] == 450 and saved["settings"]["selection"] == "fair" and len(saved["acts_sha256"]) == 64


def test_tasks_follow_fair_selection_and_deltas_recompute(planted, tmp_path):
    acts, root, _ = planted
    score(acts, ["visible"], ScoreSettings(similarity="pixel", image_size=32, device="cpu", n_boot=50),
          tmp_path / "mis.csv", tasks_out=tmp_path / "tasks.h5")
    with h5py.File(acts, "r") as f:
        values = f["layers/visible/activations"][...]
        paths = [p.decode() for p in f["images/path"][...]]
    from PIL import Image
    from misbench.datasets.images import similarity_transform

    transform = similarity_transform(32)

    def image(row):
        return transform(Image.open(root / paths[row]).convert("RGB")).numpy()

    with h5py.File(tmp_path / "tasks.h5", "r") as t:
        g = t["visible"]
        assert g["pos_expl"].shape == (4, 20, 9) and g["pos_query"].shape == (4, 20)
        for unit in (0, 2):
            order = np.argsort(-values[:, unit], kind="stable")  # distinct values: ties do not arise
            rank = np.empty(450, int)
            rank[order] = np.arange(450)
            pe, pq = g["pos_expl"][unit], g["pos_query"][unit]
            ne, nq = g["neg_expl"][unit], g["neg_query"][unit]
            # explanation k of every task comes from bin k (ranks 20k..20k+19), one per task
            for k in range(9):
                assert sorted(rank[pe[:, k]]) == list(range(20 * k, 20 * k + 20))
            assert sorted(rank[pq]) == list(range(180, 200))
            bottom_rank = 449 - rank
            for k in range(9):
                assert sorted(bottom_rank[ne[:, k]]) == list(range(20 * k, 20 * k + 20))
            assert sorted(bottom_rank[nq]) == list(range(180, 200))
            top, bottom = set(pe.ravel()) | set(pq), set(ne.ravel()) | set(nq)
            assert len(top) == 200 and len(bottom) == 200 and not top & bottom
            for task in (0, 7, 19):  # the decision rule, recomputed independently from the images
                def s(q, expl):
                    return np.mean([-np.mean((image(q) - image(e)) ** 2) for e in expl])
                delta = (s(pq[task], pe[task]) - s(pq[task], ne[task])) - (s(nq[task], pe[task]) - s(nq[task], ne[task]))
                assert g["delta"][unit, task] == pytest.approx(delta, rel=1e-4, abs=1e-7)
        assert (g["pos_expl"][3] == -1).all() and np.isnan(g["delta"][3]).all()  # the constant unit


def test_a_registered_selection_is_usable_by_score(planted, tmp_path):
    """docs/contributing.md's recipe: one function and its registration make a --selection that score uses
    (its tasks in tasks.h5 are the ranks it chose, checked against a plain argsort); a name is taken once."""
    from misbench.scoring.mis import SELECTIONS, register_selection

    acts, _, _ = planted
    T, K = 5, 3

    @register_selection("dealt", per_side=lambda s, n_rows: (s.explanations + 1) * s.tasks)
    def dealt(values, rows, keys, n_rows, rng, s):  # the top (K+1)T ranks dealt out task by task, unshuffled
        sides = [rows[rank_rows(values, keys, d, (s.explanations + 1) * s.tasks)].reshape(s.tasks, -1)
                 for d in (True, False)]
        return Tasks(sides[0][:, :-1].copy(), sides[1][:, :-1].copy(), sides[0][:, -1].copy(), sides[1][:, -1].copy())

    try:
        with pytest.raises(MisbenchError, match="selection 'dealt' is registered twice"):
            register_selection("dealt", per_side=lambda s, n_rows: 1)(dealt)
        meta = score(acts, ["visible"], ScoreSettings(similarity="pixel", image_size=32, device="cpu", n_boot=50,
                                                      selection="dealt", tasks=T, explanations=K),
                     tmp_path / "mis.csv", tasks_out=tmp_path / "tasks.h5")
    finally:
        SELECTIONS.pop("dealt")
    assert meta["settings"]["selection"] == "dealt" and [r["status"] for r in meta["rows"]] == ["ok"] * 3 + ["constant"]
    with h5py.File(acts, "r") as f:
        values = f["layers/visible/activations"][...]
    with h5py.File(tmp_path / "tasks.h5", "r") as t:
        for unit in range(3):  # distinct values: no ties
            top = np.argsort(-values[:, unit], kind="stable")[:(K + 1) * T].reshape(T, K + 1)
            bottom = np.argsort(values[:, unit], kind="stable")[:(K + 1) * T].reshape(T, K + 1)
            assert (t["visible/pos_expl"][unit] == top[:, :K]).all() and (t["visible/pos_query"][unit] == top[:, K]).all()
            assert (t["visible/neg_expl"][unit] == bottom[:, :K]).all() and (t["visible/neg_query"][unit] == bottom[:, K]).all()
    # once unregistered, the name is refused again (the settings name their field since the one schema)
    with pytest.raises(MisbenchError, match="selection: 'dealt' is not allowed; expected one of fair, quantile"):
        ScoreSettings(selection="dealt")


def test_random_tie_breaks_are_seeded_not_row_order():
    acts = np.zeros(1000)
    acts[:10] = 1.0
    rows = np.arange(1000)
    a = rank_rows(acts, tie_keys(0, "l", 3, rows), descending=True)
    b = rank_rows(acts, tie_keys(0, "l", 3, rows), descending=True)
    c = rank_rows(acts, tie_keys(1, "l", 3, rows), descending=True)
    assert (a == b).all() and set(a[:10]) == set(range(10))
    assert not (a[10:30] == np.arange(10, 30)).all() and not (a == c).all()
    # a key belongs to its row: ranking a subset orders it as the full ranking does
    subset = np.sort(np.random.default_rng(0).choice(1000, 300, replace=False))
    sub = subset[rank_rows(acts[subset], tie_keys(0, "l", 3, subset), descending=True)]
    assert (sub == a[np.isin(a, subset)]).all()
    with pytest.raises(MisbenchError, match="at least 400 rows"):
        select_fair(np.arange(399.0), np.arange(399), tie_keys(0, "l", 0, np.arange(399)), 399,
                    np.random.default_rng(0))


def test_lpips_sees_hue_on_a_random_trunk(planted, tmp_path):
    acts, _, _ = planted
    torch.manual_seed(0)
    backend = LpipsBackend("alex", trunk=torchvision.models.alexnet(weights=None).features)
    hue = []
    for seed in range(4):  # 20 tasks per unit: average seeds to see past binomial noise
        score(acts, ["visible"], ScoreSettings(similarity="lpips-alex", image_size=64, device="cpu", n_boot=20,
                                               seed=seed), tmp_path / "mis.csv", backend=backend, cache_dir=tmp_path / "c",
              overwrite=True)
        hue.append(float(read_csv(tmp_path / "mis.csv")[1]["mis"]))
    assert np.mean(hue) >= 0.7  # well above chance (0.5)


def test_embed_and_pairwise_engines_agree_and_seeds_matter(planted, tmp_path):
    acts, _, _ = planted
    torch.manual_seed(0)
    backend = LpipsBackend("alex", trunk=torchvision.models.alexnet(weights=None).features)
    base = dict(similarity="lpips-alex", image_size=32, device="cpu", n_boot=50, tasks=6)
    score(acts, ["visible"], ScoreSettings(**base), tmp_path / "embed.csv", backend=backend, tasks_out=tmp_path / "e.h5")
    score(acts, ["visible"], ScoreSettings(**base, engine="pairwise"), tmp_path / "pair.csv", backend=backend,
          tasks_out=tmp_path / "p.h5")
    e, p = read_csv(tmp_path / "embed.csv"), read_csv(tmp_path / "pair.csv")
    assert [r["mis"] for r in e] == [r["mis"] for r in p]
    with h5py.File(tmp_path / "e.h5", "r") as a, h5py.File(tmp_path / "p.h5", "r") as b:
        np.testing.assert_allclose(a["visible/delta"][:3], b["visible/delta"][:3], rtol=1e-4, atol=1e-6)
        assert (a["visible/pos_expl"][...] == b["visible/pos_expl"][...]).all()
    score(acts, ["visible"], ScoreSettings(**base), tmp_path / "again.csv", backend=backend, tasks_out=tmp_path / "a.h5")
    assert read_csv(tmp_path / "again.csv") == e
    score(acts, ["visible"], ScoreSettings(**base, seed=1), tmp_path / "seed1.csv", backend=backend,
          tasks_out=tmp_path / "s1.h5")
    with h5py.File(tmp_path / "e.h5", "r") as a, h5py.File(tmp_path / "s1.h5", "r") as b:
        assert not (a["visible/pos_expl"][...] == b["visible/pos_expl"][...]).all()


def test_shards_cover_the_units_with_identical_scores(planted, tmp_path):
    acts, _, _ = planted
    settings = ScoreSettings(similarity="pixel", image_size=32, device="cpu", n_boot=50)
    score(acts, ["noise"], settings, tmp_path / "all.csv")
    parts = []
    for i in range(3):
        score(acts, ["noise"], settings, tmp_path / f"s{i}.csv", shard=(i, 3))
        parts += read_csv(tmp_path / f"s{i}.csv")
    assert sorted(parts, key=lambda r: int(r["unit"])) == read_csv(tmp_path / "all.csv")


def test_embedding_cache_is_reused(planted, tmp_path):
    acts, _, _ = planted

    class Counting(LpipsBackend):
        calls = 0

        def embed(self, images):  # dataset images only, not the blank probe that sizes the embeddings
            Counting.calls += int((images.flatten(1).abs().sum(1) > 0).sum())
            return super().embed(images)

    torch.manual_seed(0)
    backend = Counting("alex", trunk=torchvision.models.alexnet(weights=None).features)
    settings = ScoreSettings(similarity="lpips-alex", image_size=32, device="cpu", n_boot=20, tasks=4)
    score(acts, ["visible"], settings, tmp_path / "a.csv", backend=backend, cache_dir=tmp_path / "cache")
    first = Counting.calls
    assert first > 0
    score(acts, ["visible"], settings, tmp_path / "b.csv", backend=backend, cache_dir=tmp_path / "cache")
    assert Counting.calls == first and read_csv(tmp_path / "a.csv") == read_csv(tmp_path / "b.csv")


def test_score_refuses_small_and_incomplete_files(tmp_path):
    folder = make_image_folder(tmp_path / "small", classes=2, per_class=30, size=16)
    acts = write_acts(tmp_path / "small.h5", folder, {"l": np.random.default_rng(0).normal(size=(60, 2))})
    with pytest.raises(MisbenchError, match="at least 400 rows"):
        score(acts, ["l"], ScoreSettings(similarity="pixel", device="cpu"), tmp_path / "m.csv")
    with h5py.File(acts, "r+") as h5:
        h5.attrs["complete"] = False
    with pytest.raises(MisbenchError, match="--resume"):
        score(acts, ["l"], ScoreSettings(similarity="pixel", device="cpu"), tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_score_refuses_non_finite_activations(tmp_path, bad):
    """NaN/inf have no rank: a unit holding one would get tasks drawn from meaningless positions."""
    folder = make_image_folder(tmp_path / "imgs", classes=3, per_class=70, size=16)
    x = np.random.default_rng(0).normal(size=(210, 3))
    x[30:35, 1] = bad
    acts = write_acts(tmp_path / "acts.h5", folder, {"feat": x})
    settings = ScoreSettings(similarity="pixel", image_size=16, tasks=10, n_boot=10, device="cpu")
    with pytest.raises(MisbenchError) as err:
        score(acts, ["feat"], settings, tmp_path / "m.csv", tasks_out=tmp_path / "t.h5")
    paths = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    msg = str(err.value)
    assert "layer feat unit 1 has 5 non-finite" in msg and "row 30" in msg and paths[30] in msg
    assert not (tmp_path / "m.csv").exists() and not (tmp_path / "t.h5").exists()
    x[30:35, 1] = 0.0  # the same file with finite values scores
    score(write_acts(tmp_path / "ok.h5", folder, {"feat": x}), ["feat"], settings, tmp_path / "m.csv")
    assert [r["status"] for r in read_csv(tmp_path / "m.csv")] == ["ok"] * 3


def test_calibrate_recovers_alpha():
    rng = np.random.default_rng(0)
    delta = rng.normal(scale=0.1, size=4000)
    correct = rng.random(4000) < 1 / (1 + np.exp(-12.0 * delta))
    fit = fit_alpha(delta, correct)
    assert abs(fit["alpha"] - 12.0) / 12.0 < 0.1 and fit["ci_low"] < 12.0 < fit["ci_high"]
    assert fit["log_likelihood"] > fit["log_likelihood_chance"]


def test_cli_score_and_calibrate(planted, tmp_path):
    acts, _, _ = planted
    r = CliRunner().invoke(cli, ["score", str(acts), "--layer", "visible", "--out", str(tmp_path / "m.csv"),
                                 "--similarity", "pixel", "--image-size", "32", "--tasks-out", str(tmp_path / "t.h5"),
                                 "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    assert "visible" in r.output and "layer-balanced feature mean" in r.output
    rng = np.random.default_rng(1)
    lines = ["layer,unit,task,correct"] + [f"visible,{u},{t},{int(rng.random() < 0.8)}" for u in range(3) for t in range(20)]
    (tmp_path / "resp.csv").write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(cli, ["calibrate", str(tmp_path / "resp.csv"), "--tasks", str(tmp_path / "t.h5"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n"] == 60
    r = CliRunner().invoke(cli, ["score", str(acts), "--layer", "visibel", "--out", str(tmp_path / "x.csv"),
                                 "--similarity", "pixel"])
    assert r.exit_code == 1 and "visible" in r.output


def test_unit_chunks_bound_memory_and_change_nothing(planted, tmp_path):
    acts, _, _ = planted
    base = dict(similarity="pixel", image_size=32, device="cpu", n_boot=50)
    score(acts, ["noise"], ScoreSettings(**base), tmp_path / "one.csv")
    meta = score(acts, ["noise"], ScoreSettings(**base, chunk_units=7), tmp_path / "chunks.csv", cache_dir=tmp_path / "c")
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "chunks.csv").read_text()
    assert meta["settings"]["chunk_units"] == 7


def test_quantile_selection_draws_from_the_extreme_fraction():
    from misbench.scoring.mis import select_quantile

    rng = np.random.default_rng(0)
    acts = rng.normal(size=1000)
    rows = np.arange(1000)
    tasks = select_quantile(acts, rows, tie_keys(0, "l", 0, rows), 1000, np.random.default_rng(1), n_tasks=20,
                            n_expl=9, quantile=0.05)
    top, bottom = set(np.argsort(-acts)[:50]), set(np.argsort(acts)[:50])
    for t in range(20):
        assert set(tasks.pos_expl[t]) | {tasks.pos_query[t]} <= top and len(set(tasks.pos_expl[t])) == 9
        assert set(tasks.neg_expl[t]) | {tasks.neg_query[t]} <= bottom
        assert acts[tasks.pos_query[t]] < acts[tasks.pos_expl[t]].min()  # the least extreme is the query
        assert acts[tasks.neg_query[t]] > acts[tasks.neg_expl[t]].max()
    with pytest.raises(MisbenchError, match="leaves 5 images per side"):
        select_quantile(acts, rows, tie_keys(0, "l", 0, rows), 1000, np.random.default_rng(1), quantile=0.005)


def test_embedding_cache_is_shared_safely_by_concurrent_writers(tmp_path, caplog):
    """Two ranks (two cache objects on one directory) each add parts; each sees the other's on lookup;
    a damaged part is moved aside (not deleted) and costs only a re-embedding."""
    from misbench.similarity.cache import EmbeddingCache

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 5)).astype(np.float32)
    rank0, rank1 = (EmbeddingCache(tmp_path, "fp", 32, "data") for _ in range(2))
    rank0.add(np.arange(0, 6), emb[:6])
    rank1.add(np.arange(4, 10), emb[4:])
    for cache in (rank0, rank1):
        hit, got = cache.lookup(np.array([9, 0, 5, 42]))
        assert hit.tolist() == [True, True, True, False]
        np.testing.assert_array_equal(got, emb[[9, 0, 5]])
    other = EmbeddingCache(tmp_path, "other backend", 32, "data")
    assert not other.lookup(np.arange(10))[0].any()
    (tmp_path / f"{rank0.prefix}-damaged.h5").write_bytes(b"half a file")
    fresh = EmbeddingCache(tmp_path, "fp", 32, "data")
    assert "damaged" in caplog.text and (tmp_path / f"{rank0.prefix}-damaged.h5.corrupt").exists()
    hit, got = fresh.lookup(np.arange(10))
    assert hit.all() and np.array_equal(got, emb)


def test_calibration_with_an_interval_open_above_writes_strict_json(tmp_path):
    """Few responses contradict delta: the likelihood has a finite maximum but never drops by
    chi2(0.95)/2 towards large alpha, so the upper end of the interval is unbounded. The file must be
    strict JSON (no Infinity): ci_high null and ci_high_unbounded true; --alpha-from still reads it."""
    from scipy import optimize, stats

    from misbench.scoring.calibrate import calibration_alpha

    delta = np.array([0.5, 0.4, 0.3, 0.2, 0.1, -0.3, 0.6, -1e-7])
    correct = np.array([1, 1, 1, 1, 1, 0, 1, 1])  # the only contradiction: the last, at a tiny |delta|
    nll = lambda a: float(np.sum(correct * np.logaddexp(0, -a * delta) + (1 - correct) * np.logaddexp(0, a * delta)))  # noqa: E731
    best = optimize.minimize_scalar(lambda la: nll(np.exp(la)), bounds=(-12, 12), method="bounded")
    assert nll(np.exp(12)) - best.fun < stats.chi2.ppf(0.95, 1) / 2  # independent: open above
    path = tmp_path / "responses.csv"
    path.write_text("delta,correct\n" + "".join(f"{d},{c}\n" for d, c in zip(delta, correct)))
    res = CliRunner().invoke(cli, ["calibrate", str(path), "--out", str(tmp_path / "fit.json")])
    assert res.exit_code == 0, res.output
    assert "unbounded" in res.output
    text = (tmp_path / "fit.json").read_text()

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    fit = json.loads(text, parse_constant=refuse)  # strict: Infinity/NaN raise
    assert fit["ci_high"] is None and fit["ci_high_unbounded"] is True
    assert 0 <= fit["ci_low"] < fit["alpha"] and np.isclose(fit["alpha"], np.exp(best.x), rtol=1e-3)
    assert calibration_alpha(tmp_path / "fit.json")[0] == fit["alpha"]


@pytest.mark.parametrize("kind", ["distinct", "ties", "nan"])
def test_first_ranks_by_partition_equal_the_full_ranking(kind):
    """rank_rows(first=n) sorts only the rows at least as extreme as the n-th: the same positions as the
    first n of the full two-key sort, with heavy ties at the boundary and NaNs (ranked last)."""
    rng = np.random.default_rng(5)
    for n, first in ((5000, 200), (450, 200), (300, 299), (300, 300), (10, 40)):
        acts = rng.standard_normal(n)
        if kind == "ties":
            acts = np.round(acts * 2)
        elif kind == "nan":
            acts[rng.integers(0, n, n // 2)] = np.nan
        keys = tie_keys(0, "l", 3, np.arange(n))
        for descending in (True, False):
            full = np.lexsort((keys, -acts if descending else acts))[:first]
            np.testing.assert_array_equal(rank_rows(acts.astype(np.float32), keys, descending, first),
                                          rank_rows(acts.astype(np.float32), keys, descending)[:first])
            np.testing.assert_array_equal(rank_rows(acts, keys, descending, first), full)

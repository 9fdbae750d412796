"""The MonoSemanticity score against its definition computed over every pair (Pach et al. 2025, eq. 7-9)."""

import itertools
import json

import numpy as np
import pytest

from misbench.scoring.ms import ms_scores


def brute_ms(acts: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """O(N^2) per unit: min-max scaled activations, cosine similarity of every pair i < j."""
    out = []
    for a in acts.T.astype(float):
        if a.max() == a.min():
            out.append(np.nan)
            continue
        a = (a - a.min()) / (a.max() - a.min())
        num = den = 0.0
        for i, j in itertools.combinations(range(len(a)), 2):
            ni, nj = np.linalg.norm(emb[i]), np.linalg.norm(emb[j])
            cos = 0.0 if ni == 0 or nj == 0 else float(emb[i] @ emb[j]) / (ni * nj)
            num += a[i] * a[j] * cos
            den += a[i] * a[j]
        out.append(num / den if den > 0 else np.nan)
    return np.array(out)


@pytest.mark.parametrize("blocks", [dict(), dict(block_bytes=8 * 5 * 3)])
def test_ms_matches_brute_force_pairs(blocks):
    rng = np.random.default_rng(0)
    n, d = 60, 5
    emb = rng.normal(size=(n, d))
    emb[3] = 0  # a zero embedding: cosine 0 with every image
    acts = np.column_stack([
        rng.normal(size=n),                       # dense
        np.maximum(rng.normal(size=n) - 1.5, 0),  # sparse: most rows at the minimum
        emb[:, 0] * 3 + 1,                        # follows one embedding direction
        np.full(n, 2.0),                          # constant: no score
        np.eye(n)[5] * 4.0,                       # one image above the minimum: no pairs, no score
        rng.exponential(size=n).astype(np.float16),
    ])
    fast = ms_scores(acts, emb, **blocks)
    ref = brute_ms(acts, emb)
    assert np.array_equal(np.isnan(fast), np.isnan(ref)) and np.isnan(fast[[3, 4]]).all()
    np.testing.assert_allclose(fast[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=0, atol=1e-6)


def test_ms_rewards_units_whose_top_images_look_alike():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16))
    label = rng.integers(0, 4, 400)
    emb = centres[label] + 0.3 * rng.normal(size=(400, 16))
    selective = (label == 2) * rng.uniform(1, 2, 400)
    mixed = rng.uniform(0, 1, 400)
    ms = ms_scores(np.column_stack([selective, mixed]), emb)
    assert ms[0] > 0.8 and ms[1] < 0.5 and ms[0] > ms[1] + 0.3


def test_ms_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="share N"):
        ms_scores(np.zeros((5, 2)), np.zeros((4, 3)))


def test_score_metrics_ms_column_matches_pairs_over_the_backends_images(property_folder, tmp_path):
    """`score --metrics mis,ms`: an ms column after the others, equal to the pair sum over every row's image
    as the similarity sees it (pixel backend: its embedding is the image's pixels, cosine-invariant to scale)."""
    import csv

    import torch
    from click.testing import CliRunner

    from conftest import write_acts
    from misbench.activations.store import open_activations
    from misbench.cli.main import cli
    from misbench.datasets.images import RowImages
    from misbench.scoring.results import MIS_COLUMNS

    root, props = property_folder
    n = len(props["hue"])
    rng = np.random.default_rng(0)
    layer = np.stack([props["brightness"], props["hue"], rng.normal(size=n), np.full(n, 0.5)], 1).astype(np.float32)
    acts = write_acts(tmp_path / "acts.h5", root, {"l": layer})
    res = CliRunner().invoke(cli, ["score", str(acts), "--layer", "l", "--out", str(tmp_path / "mis.csv"),
                                   "--similarity", "pixel", "--image-size", "16", "--device", "cpu",
                                   "--bootstrap", "50", "--metrics", "mis,ms"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "mis.csv")))
    assert list(rows[0]) == MIS_COLUMNS + ["ms"]
    with open_activations(acts) as f:
        images = RowImages(f, np.arange(f.n_rows), 16, "model", "square")
        pixels = torch.stack([images[i][0] for i in range(len(images))]).flatten(1).double().numpy()
    e = pixels / np.linalg.norm(pixels, axis=1, keepdims=True)
    cos = e @ e.T
    upper = np.triu(np.ones((n, n), bool), 1)
    for unit in range(3):
        a = layer[:, unit].astype(float)
        a = (a - a.min()) / (a.max() - a.min())
        w = np.outer(a, a)[upper]
        assert abs(float(rows[unit]["ms"]) - (w * cos[upper]).sum() / w.sum()) < 1e-5
    assert rows[3]["status"] == "constant" and rows[3]["ms"] == ""
    meta = json.loads((tmp_path / "mis.json").read_text())
    assert meta["ms"]["rows"] == n and meta["settings"]["metrics"] == ["mis", "ms"]
    assert abs(meta["layers"]["l"]["ms"] - np.mean([float(rows[u]["ms"]) for u in range(3)])) < 1e-6
    assert "MS" in res.output
    # the default leaves the column out; an unknown metric is a one-line error
    res = CliRunner().invoke(cli, ["score", str(acts), "--layer", "l", "--out", str(tmp_path / "b.csv"),
                                   "--similarity", "pixel", "--image-size", "16", "--metrics", "mis,msx"])
    assert res.exit_code != 0 and "--metrics mis,msx: expected mis or mis,ms" in res.output


def test_score_metrics_ms_refuses_a_topk_file_before_any_scoring(tmp_path, image_folder, monkeypatch):
    """MS weighs every image: a --keep topk file is refused up front, not after the (long) MIS scoring."""
    import misbench.scoring.run
    from misbench.activations.extract import ExtractSettings, extract
    from misbench.errors import MisbenchError
    from misbench.models.loading import load_model
    from misbench.scoring.settings import ScoreSettings

    loaded = load_model("mini_inception", num_classes=3)
    acts = extract(loaded, str(image_folder), tmp_path / "k.h5", ExtractSettings(layers=("conv1.bn",), keep="topk:6"))

    def no_scoring(*args, **kwargs):
        raise AssertionError("MIS scoring ran before the topk file was refused")

    monkeypatch.setattr(misbench.scoring.run, "_score_tasks", no_scoring)
    monkeypatch.setattr(misbench.scoring.run, "prepare_model", no_scoring)
    with pytest.raises(MisbenchError, match="keeps only its top/bottom-k rows"):
        # quantile 0.5: 12 of the folder's 24 rows per side, which the up-front selection check accepts
        misbench.scoring.run.score(acts, ["conv1.bn"], ScoreSettings(similarity="pixel", metrics=("mis", "ms"),
                                                                     selection="quantile", quantile=0.5),
                                   tmp_path / "mis.csv")
    assert not (tmp_path / "mis.csv").exists()


class _RowBlocks:
    """A 2-D array that counts the rows each read takes and refuses a read of more than `most` rows."""

    def __init__(self, array, most):
        self.array, self.most, self.reads = array, most, 0
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        assert isinstance(rows, slice) and len(range(*rows.indices(self.shape[0]))) <= self.most, key
        self.reads += 1
        return self.array[key]


def test_ms_reads_activations_in_row_blocks():
    rng = np.random.default_rng(1)
    n, units, d = 50, 4, 3
    acts = rng.normal(size=(n, units))
    emb = rng.normal(size=(n, d))
    block = 8 * 4 * 3  # 3 rows of 4 units in a block
    wrapped = _RowBlocks(acts, most=3)
    got = ms_scores(wrapped, emb, block_bytes=block)
    assert wrapped.reads >= n // 3 and np.allclose(got, brute_ms(acts, emb), atol=1e-12, rtol=0)


def test_score_ms_reuses_the_mis_pass_embeddings_and_never_loads_a_layer(property_folder, tmp_path, monkeypatch):
    """With MIS and MS, every row is embedded once per run: MS reads back the MIS pass's embeddings (no cache
    given: the run's own store) and embeds only the rows MIS did not need; a layer is read in row blocks, never
    whole (ActivationFile.activations is not called); the ms column equals MS computed separately from every
    row's embedding, and the MIS columns equal a MIS-only run's."""
    import csv

    import torch

    from conftest import write_acts
    from misbench.activations.store import ActivationFile, open_activations
    from misbench.datasets.images import RowImages
    from misbench.scoring.mis import stored_value
    from misbench.scoring.run import embed_missing, score
    from misbench.scoring.settings import ScoreSettings
    from misbench.similarity import backend_from_settings

    root, props = property_folder
    n = len(props["hue"])
    rng = np.random.default_rng(0)
    layer = np.stack([props["brightness"], props["hue"], rng.normal(size=n)], 1).astype(np.float32)
    acts = write_acts(tmp_path / "acts.h5", root, {"l": layer})
    settings = ScoreSettings(similarity="pixel", image_size=16, device="cpu", n_boot=20, tasks=3,
                             metrics=("mis", "ms"))
    backend = backend_from_settings(settings)
    embedded = []
    plain = backend.embed
    monkeypatch.setattr(backend, "embed", lambda x: embedded.append(len(x)) or plain(x))
    monkeypatch.setattr(ActivationFile, "activations", lambda *a: (_ for _ in ()).throw(AssertionError("whole layer")))
    meta = score(acts, ["l"], settings, tmp_path / "mis.csv", backend=backend)
    monkeypatch.undo()
    assert embedded[0] == 1 and sum(embedded[1:]) == n  # the width probe's blank image; each row once over both
    assert meta["ms"]["embedded_images"] == n - meta["distinct_images"] and meta["embedded_images"] == \
        meta["distinct_images"] < n
    rows = list(csv.DictReader(open(tmp_path / "mis.csv")))
    # the separate path: every row embedded in one pass, MS of the whole layer in memory
    with open_activations(acts) as f:
        images = RowImages(f, np.arange(n), 16, settings.view, backend.resample)
        with torch.no_grad():
            emb, _ = embed_missing(backend, images, None, None, torch.device("cpu"), settings.batch_size)
        separate = ms_scores(f.layer("l")["activations"][...], emb)
    assert [r["ms"] for r in rows] == [str(stored_value(v)) for v in separate]
    alone = score(acts, ["l"], dataclass_replace(settings, metrics=("mis",)), tmp_path / "mis_only.csv")
    only = list(csv.DictReader(open(tmp_path / "mis_only.csv")))
    assert [{k: v for k, v in r.items() if k != "ms"} for r in rows] == only and alone["embedded_images"] == \
        meta["embedded_images"]


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)

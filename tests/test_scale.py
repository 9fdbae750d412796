"""Scoring at scale (issue 14): every image embedded once per run, the distance engines against a
brute-force reference, memory checked before embedding, and a cache that is never stale or corrupt."""

import csv
import logging

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_image_folder, write_acts
from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.datasets.images import similarity_transform
from misbench.scoring.run import ScoreSettings, score
from misbench.similarity.cache import EmbeddingCache
from misbench.similarity.pixel import PixelBackend

BASE = dict(similarity="pixel", image_size=16, device="cpu", n_boot=20, tasks=5, explanations=3)


class Counting(PixelBackend):
    """Counts dataset images embedded (the all-zero probe that sizes the embeddings is not one)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.images = 0

    def embed(self, images):
        self.images += int((images.flatten(1).abs().sum(1) > 0).sum())
        return super().embed(images)


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    folder = make_image_folder(root / "images", classes=4, per_class=25, size=20)
    rng = np.random.default_rng(3)
    return write_acts(root / "acts.h5", folder, {"a": rng.normal(size=(100, 9)), "b": rng.normal(size=(100, 8))})


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def task_rows(path) -> set:
    with h5py.File(path, "r") as h5:
        return {int(v) for name in h5 for key in ("pos_expl", "neg_expl", "pos_query", "neg_query")
                for v in h5[name][key][...].ravel()}


@pytest.mark.parametrize("resident", [False, True])
def test_each_image_is_embedded_once_across_chunks(acts, tmp_path, monkeypatch, resident):
    """Chunk by chunk through the store, or all images resident in one engine: the same images, once."""
    import misbench.scoring.run as scoring

    monkeypatch.setattr(scoring, "RESIDENT_FACTOR", 100.0 if resident else 0.0)
    backend = Counting(image_size=16)
    settings = ScoreSettings(**BASE, selection="quantile", quantile=0.3, chunk_units=2)  # 9 chunks
    meta = score(acts, ["all"], settings, tmp_path / "m.csv", tasks_out=tmp_path / "t.h5", backend=backend)
    needed = task_rows(tmp_path / "t.h5")
    assert meta["distinct_images"] == len(needed) == backend.images == meta["embedded_images"]
    assert not list(tmp_path.glob(".m.csv.emb*"))  # the run's own store is removed
    # with a cache, a second run embeds nothing and says so; parts are written while embedding
    monkeypatch.setattr(scoring, "STORE_PART_BYTES", 16 * 3 * 16 * 16 * 4)  # 16 images a part
    cached = Counting(image_size=16)
    first = score(acts, ["all"], settings, tmp_path / "c1.csv", cache_dir=tmp_path / "cache", backend=cached)
    again = score(acts, ["all"], settings, tmp_path / "c2.csv", cache_dir=tmp_path / "cache", backend=cached)
    assert first["embedded_images"] == len(needed) and again["embedded_images"] == 0
    assert again["distinct_images"] == len(needed) == cached.images
    assert len(list((tmp_path / "cache").glob("emb-*.h5"))) >= 2  # batches of 64 images, a part each
    assert read_csv(tmp_path / "m.csv") == read_csv(tmp_path / "c1.csv") == read_csv(tmp_path / "c2.csv")


def test_store_of_a_killed_run_is_removed_by_the_next(acts, tmp_path):
    """SIGKILL skips the cleanup of a run's own store (GBs at ImageNet scale): the next run beside the
    same output removes it when its process is gone, and leaves a live run's alone."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale, running = tmp_path / f".m.csv.emb.tmp{dead.pid}", tmp_path / f".m.csv.emb.tmp{live.pid}"
        for folder in (stale, running):
            folder.mkdir()
            (folder / "emb-x-y.h5").write_bytes(b"\0" * 1024)
        score(acts, ["a"], ScoreSettings(**BASE), tmp_path / "m.csv", backend=PixelBackend(image_size=16))
        assert not stale.exists() and running.exists()
        assert sorted(p.name for p in tmp_path.glob(".m.csv.emb*")) == [running.name]  # its own store is gone
    finally:
        live.kill()
        live.wait()


def _reference(acts_path, tasks_path, n_expl, alpha):
    """Brute force: each pair's pixel distance from the image files, in float64, task by task."""
    with h5py.File(acts_path, "r") as h5:
        root = h5.attrs["data_root"]
        paths = [p.decode() if isinstance(p, bytes) else p for p in h5["images/path"][...]]
    transform = similarity_transform(BASE["image_size"])
    cache = {}

    def image(row):
        if row not in cache:
            with Image.open(f"{root}/{paths[row]}") as img:
                cache[row] = transform(img.convert("RGB")).double().numpy()
        return cache[row]

    def s(q, expl):
        return np.mean([-np.mean((image(q) - image(e)) ** 2) for e in expl])

    out = {}
    with h5py.File(tasks_path, "r") as h5:
        for name in h5:
            g = h5[name]
            for k, unit in enumerate(g["unit"][...]):
                pe, ne, pq, nq = (g[key][k] for key in ("pos_expl", "neg_expl", "pos_query", "neg_query"))
                deltas = np.array([(s(pq[t], pe[t]) - s(pq[t], ne[t])) - (s(nq[t], pe[t]) - s(nq[t], ne[t]))
                                   for t in range(len(pq))])
                out[name, int(unit)] = (deltas, g["delta"][k])
    return out


@pytest.mark.parametrize("distances,chunk_units,resident", [("faiss", 3, False), ("torch", 3, False),
                                                             ("faiss", 3, True), ("faiss", 256, False),
                                                             ("gram", 3, False), ("gram", 3, True)])
def test_scores_match_a_brute_force_reference(acts, tmp_path, monkeypatch, distances, chunk_units, resident):
    import misbench.scoring.run as scoring

    monkeypatch.setattr(scoring, "RESIDENT_FACTOR", 100.0 if resident else 0.0)
    settings = ScoreSettings(**BASE, selection="quantile", quantile=0.3, chunk_units=chunk_units, distances=distances)
    meta = score(acts, ["a", "b"], settings, tmp_path / "m.csv", tasks_out=tmp_path / "t.h5")
    alpha = meta["settings"]["alpha"]
    reference = _reference(acts, tmp_path / "t.h5", BASE["explanations"], alpha)
    rows = {(r["layer"], int(r["unit"])): r for r in read_csv(tmp_path / "m.csv")}
    assert len(reference) == len(rows) == 17
    for key, (expected, stored) in reference.items():
        np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-7)
        mis = np.mean((np.sign(expected) + 1) / 2)
        conf = np.mean(1 / (1 + np.exp(-alpha * expected)))
        assert float(rows[key]["mis"]) == pytest.approx(mis, abs=1e-6), key
        assert float(rows[key]["mis_confidence"]) == pytest.approx(conf, abs=2e-6), key


def test_distance_engines_agree_to_float32_rounding(acts, tmp_path):
    """Same decisions; the confidences differ at most in float32 summation order (docs/performance.md)."""
    for name in ("faiss", "torch", "gram"):
        score(acts, ["a"], ScoreSettings(**BASE, distances=name), tmp_path / f"{name}.csv")
    faiss_rows = read_csv(tmp_path / "faiss.csv")
    for other in ("torch", "gram"):
        other_rows = read_csv(tmp_path / f"{other}.csv")
        assert [r["mis"] for r in faiss_rows] == [r["mis"] for r in other_rows]
        for a, b in zip(faiss_rows, other_rows):
            for key in ("mis_confidence", "conf_ci_low", "conf_ci_high"):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5)


def test_too_large_chunks_fail_before_embedding(acts, tmp_path, monkeypatch):
    import misbench.scoring.run as scoring

    monkeypatch.setattr(scoring, "available_memory", lambda device: (200_000, "available (test)"))
    backend = Counting(image_size=16)
    with pytest.raises(MisbenchError, match=r"--chunk-units 256: .* GiB .*use --chunk-units \d+ or fewer"):
        score(acts, ["a"], ScoreSettings(**BASE), tmp_path / "m.csv", backend=backend)
    assert backend.images == 0 and not (tmp_path / "m.csv").exists()
    r = CliRunner().invoke(cli, ["score", str(acts), "--layer", "a", "--out", str(tmp_path / "x.csv"),
                                 "--similarity", "pixel", "--image-size", "16", "--device", "cpu", "--tasks", "5",
                                 "--explanations", "3"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--chunk-units" in r.output, r.output


def test_cache_never_returns_embeddings_of_replaced_images(tmp_path):
    """Regenerating the image folder in place (same names, new pixels) must not hit the cache."""
    folder = make_image_folder(tmp_path / "images", classes=4, per_class=25, size=20, seed=0)
    acts = write_acts(tmp_path / "acts.h5", folder, {"a": np.random.default_rng(3).normal(size=(100, 4))})
    settings = ScoreSettings(**BASE, selection="quantile", quantile=0.3)
    score(acts, ["a"], settings, tmp_path / "old.csv", cache_dir=tmp_path / "cache")
    make_image_folder(tmp_path / "images", classes=4, per_class=25, size=20, seed=1)  # overwritten in place
    backend = Counting(image_size=16)
    meta = score(acts, ["a"], settings, tmp_path / "cached.csv", cache_dir=tmp_path / "cache", backend=backend)
    score(acts, ["a"], settings, tmp_path / "fresh.csv")
    assert read_csv(tmp_path / "cached.csv") == read_csv(tmp_path / "fresh.csv")
    assert read_csv(tmp_path / "cached.csv") != read_csv(tmp_path / "old.csv")
    assert meta["embedded_images"] == meta["distinct_images"] == backend.images > 0


def _overwrite_embeddings(part, value=np.nan):
    """Overwrite the first stored chunk of a part's embeddings in place (bytes on disk, no HDF5 API)."""
    with h5py.File(part, "r") as h5:
        info = h5["emb"].id.get_chunk_info(0)
        offset, size = info.byte_offset, h5["emb"].chunks[1] * 4
    with open(part, "r+b") as handle:
        handle.seek(offset)
        handle.write(np.full(size // 4, value, np.float32).tobytes())


def test_corrupt_cache_parts_are_dropped_and_recomputed(acts, tmp_path, caplog):
    settings = ScoreSettings(**BASE)
    score(acts, ["a"], settings, tmp_path / "clean.csv", cache_dir=tmp_path / "cache")
    parts = sorted((tmp_path / "cache").glob("emb-*.h5"))
    assert len(parts) == 1
    _overwrite_embeddings(parts[0])
    backend = Counting(image_size=16)
    with caplog.at_level(logging.WARNING):
        meta = score(acts, ["a"], settings, tmp_path / "again.csv", cache_dir=tmp_path / "cache", backend=backend)
    assert all(r["mis_confidence"] != "nan" for r in read_csv(tmp_path / "again.csv"))
    assert read_csv(tmp_path / "again.csv") == read_csv(tmp_path / "clean.csv")
    assert "damaged" in caplog.text and parts[0].with_name(parts[0].name + ".corrupt").exists()
    assert meta["embedded_images"] == meta["distinct_images"] == backend.images


def test_cache_part_with_valid_checksum_but_non_finite_values_is_dropped(tmp_path, caplog):
    cache = EmbeddingCache(tmp_path, "fp", 16, "data")
    good = np.ones((4, 3), np.float32)
    bad = good.copy()
    bad[2, 1] = np.inf
    cache.add([b"k0", b"k1"], bad[:2])
    cache.add([b"k2", b"k3"], bad[2:])
    with caplog.at_level(logging.WARNING):
        hit, emb = EmbeddingCache(tmp_path, "fp", 16, "data").lookup([b"k0", b"k1", b"k2", b"k3"])
    assert hit.tolist() == [True, True, False, False] and np.array_equal(emb, good[:2])
    assert "non-finite" in caplog.text


@pytest.mark.parametrize("ties", [False, True])
def test_streaming_topk_equals_brute_force(ties):
    """Both update paths (few new values merged into the kept order; many re-sorted) keep exactly the
    ranks 1..K of all rows, ties broken by the images' tie keys as `score` ranks them."""
    from misbench.scoring.mis import tie_keys
    from misbench.activations.topk import TOPK_SEED, TopK

    rng = np.random.default_rng(0)
    values = rng.normal(size=(3000, 40))
    if ties:
        values = np.round(values * 2) / 2
    values[:, 3] = np.linspace(0, 1, 3000)  # rising: every batch enters the top side
    items = rng.permutation(10_000)[:3000]
    state = TopK("l", 40, 25)
    for start in range(0, 3000, 32):
        rows = np.arange(start, min(3000, start + 32))
        state.update(values[rows], rows, items[rows])
    s = state.state()
    for unit in range(40):
        keys = tie_keys(TOPK_SEED, "l", unit, items)
        assert np.array_equal(s["top_index"][unit], np.lexsort((keys, -values[:, unit]))[:25]), unit
        assert np.array_equal(s["bottom_index"][unit], np.lexsort((keys, values[:, unit]))[:25]), unit
        assert np.array_equal(s["top_item"][unit], items[s["top_index"][unit]])
        np.testing.assert_array_equal(s["bottom_value"][unit], values[s["bottom_index"][unit], unit])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_streaming_topk_pools_equal_brute_force_across_batch_sizes_states_and_resumes(dtype):
    """The candidate pools (compacted when full, ranked by state()) keep exactly the ranks 1..K of all
    rows on both sides: batches smaller and larger than a pool's room, heavy ties (float16 rounds many
    values together), state() taken mid-stream, and a TopK resumed from a saved state; checked against
    a brute-force two-key sort of every row."""
    from misbench.activations.topk import TOPK_SEED, TopK
    from misbench.scoring.mis import tie_keys

    rng = np.random.default_rng(3)
    n, units, k = 2500, 12, 40
    values = (rng.normal(size=(n, units)) * np.r_[1, 1, 1, 0.01, np.ones(units - 4)]).astype(dtype)
    values[:, 1] = np.round(values[:, 1])  # a handful of distinct values: ties decide
    values[:, 2] = -np.linspace(0, 1, n).astype(dtype)  # falling: every batch enters the bottom side
    items = rng.permutation(50_000)[:n]
    sizes = rng.choice([1, 7, 33, 120, 300], size=200)
    bounds = np.minimum(np.r_[0, np.cumsum(sizes)], n)
    state = TopK("lay", units, k)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            break
        rows = np.arange(a, b)
        state.update(values[rows], rows, items[rows])
        if a < 1200 <= b:  # a commit mid-stream, then a resumed extraction continues from the saved state
            saved = {key: np.array(v) for key, v in state.state().items()}
            state = TopK("lay", units, k, saved)
    s = state.state()
    for unit in range(units):
        keys = tie_keys(TOPK_SEED, "lay", unit, items)
        v = values[:, unit].astype(np.float64)
        assert np.array_equal(s["top_index"][unit], np.lexsort((keys, -v))[:k]), unit
        assert np.array_equal(s["bottom_index"][unit], np.lexsort((keys, v))[:k]), unit
        assert np.array_equal(s["bottom_item"][unit], items[s["bottom_index"][unit]])
        np.testing.assert_array_equal(s["top_value"][unit], v[s["top_index"][unit]])
    np.testing.assert_allclose(s["sum"], values.astype(np.float64).sum(0))


def test_score_refuses_images_regenerated_in_place_since_extraction(tmp_path):
    """extract records each image's content digest (first 128 bits of the sha256 of its bytes); score
    re-hashes every image it reads back and refuses one regenerated in place (same name, new pixels),
    with or without an embedding cache, naming the folder and the fix. Checked against hashlib directly."""
    import hashlib

    import torch

    from misbench.activations.extract import ExtractSettings, extract
    from misbench.models.loading import load_model

    folder = make_image_folder(tmp_path / "images", classes=4, per_class=25, size=20, seed=0)
    torch.manual_seed(0)
    acts = extract(load_model("mini_inception", num_classes=4), str(folder), tmp_path / "acts.h5",
                   ExtractSettings(layers=("conv1.bn",), batch_size=32, resize=16, crop=16, workers=0))
    with h5py.File(acts, "r") as h5:
        paths = [p.decode() for p in h5["images/path"][...]]
        stored = list(h5["images/sha256"][...])
    assert stored == [hashlib.sha256((folder / p).read_bytes()).hexdigest()[:32].encode() for p in paths]
    settings = ScoreSettings(**BASE, selection="quantile", quantile=0.3)
    score(acts, ["conv1.bn"], settings, tmp_path / "before.csv", tasks_out=tmp_path / "tasks.h5")
    with h5py.File(tmp_path / "tasks.h5", "r") as h5:
        used = int(h5["conv1.bn/pos_query"][0, 0])  # an image scoring reads
    image = folder / paths[used]
    Image.fromarray(255 - np.asarray(Image.open(image).convert("RGB"))).save(image)  # same name, new pixels
    for cache in (None, tmp_path / "cache"):
        with pytest.raises(MisbenchError, match=f"{folder.resolve()}: 1 of the .* other content.*{paths[used]}.*re-extract"):
            score(acts, ["conv1.bn"], settings, tmp_path / "after.csv", cache_dir=cache)
        assert not (tmp_path / "after.csv").exists()
    res = CliRunner().invoke(cli, ["score", str(acts), "--layer", "conv1.bn", "--out", str(tmp_path / "cli.csv"),
                                   "--similarity", "pixel", "--image-size", "16", "--selection", "quantile",
                                   "--quantile", "0.3", "--tasks", "5", "--explanations", "3", "--device", "cpu"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and "re-extract" in res.output


def test_gram_engine_scores_a_googlenet_shaped_file_as_faiss_did(tmp_path):
    """The CPU default (float64 matrix products) against FAISS' float32 per-pair kernel, the engine before
    it, on GoogLeNet's first three layers (320 units, fair selection, 420 images): the same tasks and
    decisions, deltas within 1e-6 of the distances they are made of (pixel distances are <= 1), and
    nearer a float64 brute force than FAISS' (16 units checked pair by pair)."""
    folder = make_image_folder(tmp_path / "images", classes=4, per_class=105, size=20)
    rng = np.random.default_rng(5)
    acts = write_acts(tmp_path / "acts.h5", folder, {name: rng.normal(size=(420, units)) for name, units in
                                                     (("conv1.bn", 64), ("conv2.bn", 64), ("conv3.bn", 192))})
    settings = dict(similarity="pixel", image_size=16, device="cpu", n_boot=20)
    deltas, rows = {}, {}
    for name in ("faiss", "gram"):
        score(acts, ["all"], ScoreSettings(**settings, distances=name), tmp_path / f"{name}.csv",
              tasks_out=tmp_path / f"{name}.h5")
        rows[name] = read_csv(tmp_path / f"{name}.csv")
        with h5py.File(tmp_path / f"{name}.h5", "r") as h5:
            deltas[name] = np.concatenate([h5[g]["delta"][...].ravel() for g in h5])
            for g in h5:
                for key in ("pos_expl", "neg_expl", "pos_query", "neg_query"):
                    deltas[name, g, key] = h5[g][key][...]
    assert len(rows["gram"]) == 320 and all(np.array_equal(deltas["faiss", *k[1:]], v) for k, v in deltas.items()
                                            if isinstance(k, tuple) and k[0] == "gram")
    assert np.array_equal(np.sign(deltas["faiss"]), np.sign(deltas["gram"]))
    assert np.abs(deltas["faiss"] - deltas["gram"]).max() <= 1e-6
    assert [r["mis"] for r in rows["faiss"]] == [r["mis"] for r in rows["gram"]]
    for a, b in zip(rows["faiss"], rows["gram"]):
        assert float(a["mis_confidence"]) == pytest.approx(float(b["mis_confidence"]), rel=1e-6, abs=1e-9)
    base = dict(BASE, explanations=9)
    errors = {}
    for name in ("faiss", "gram"):
        with h5py.File(tmp_path / f"{name}.h5", "r") as h5, h5py.File(tmp_path / "one.h5", "w") as one:
            for key in ("unit", "delta", "pos_expl", "neg_expl", "pos_query", "neg_query"):
                one[f"conv1.bn/{key}"] = h5["conv1.bn"][key][:16]
        reference = _reference(acts, tmp_path / "one.h5", base["explanations"], 1.0)
        errors[name] = max(np.abs(expected - stored).max() for expected, stored in reference.values())
    assert errors["gram"] <= errors["faiss"] and errors["gram"] <= 1e-7

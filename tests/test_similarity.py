import lpips
import numpy as np
import pytest
import torch

from misbench.similarity import EmbeddingIndex, build_backend
from misbench.similarity.lpips import LpipsBackend
from misbench.similarity.deepfeat import DeepFeatBackend


def lpips_pair(net):
    """The lpips package with a random trunk, and our backend on the very same trunk weights."""
    torch.manual_seed(0)
    reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    import torchvision

    arch = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}[net]
    features = torchvision.models.get_model(arch, weights=None).features
    state = {}
    for key, value in reference.net.state_dict().items():  # net.sliceK.IDX.param -> IDX.param
        _, idx, param = key.split(".", 2)
        state[f"{idx}.{param}"] = value
    missing, unexpected = features.load_state_dict(state, strict=False)
    assert not unexpected and all(int(k.split(".")[0]) >= 13 for k in missing)  # only layers LPIPS never uses
    ours = LpipsBackend(net, trunk=features)
    return reference, ours


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
@pytest.mark.parametrize("size", [32, 64])
def test_lpips_embedding_distance_equals_lpips_package(net, size):
    reference, ours = lpips_pair(net)
    g = torch.Generator().manual_seed(size)
    x, y = torch.rand(6, 3, size, size, generator=g), torch.rand(6, 3, size, size, generator=g)
    with torch.no_grad():
        expected = reference(x, y, normalize=True).flatten()
    ex, ey = ours.embed(x), ours.embed(y)
    np.testing.assert_allclose((ex - ey).pow(2).sum(1).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.pair_distance(x, y).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    heads = [getattr(ours, f"head{k}") for k in range(len(ours.cuts))]
    assert all((h >= 0).all() for h in heads)


def test_pixel_and_deepfeat_embeddings_match_their_direct_metric():
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    pixel = build_backend("pixel", image_size=32)
    np.testing.assert_allclose((pixel.embed(x) - pixel.embed(y)).pow(2).sum(1).numpy(),
                               ((x - y) ** 2).mean(dim=(1, 2, 3)).numpy(), rtol=1e-5)
    import torchvision

    deep = DeepFeatBackend("mobilenet_v2", image_size=32, model=torchvision.models.mobilenet_v2(weights=None).eval())
    assert len(deep.taps) >= 4
    np.testing.assert_allclose((deep.embed(x) - deep.embed(y)).pow(2).sum(1).numpy(),
                               deep.pair_distance(x, y).numpy(), rtol=1e-4)


def test_dreamsim_stand_in_gives_cosine_distance():
    from misbench.similarity.dreamsim import DreamSimBackend

    torch.manual_seed(0)
    projection = torch.randn(3 * 16 * 16, 24)
    stand_in = lambda images: images.reshape(len(images), -1) @ projection  # noqa: E731
    backend = DreamSimBackend(image_size=16, embedder=stand_in)
    x, y = torch.rand(5, 3, 16, 16), torch.rand(5, 3, 16, 16)
    cos = torch.nn.functional.cosine_similarity(stand_in(x), stand_in(y))
    np.testing.assert_allclose((backend.embed(x) - backend.embed(y)).pow(2).sum(1).numpy(), (1 - cos).numpy(), atol=1e-5)
    np.testing.assert_allclose(backend.pair_distance(x, y).numpy(), (1 - cos).numpy(), atol=1e-5)


def test_faiss_index_equals_brute_force():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 37)).astype(np.float32)
    rows = rng.permutation(1000)[:200]
    index = EmbeddingIndex(rows, emb)
    queries = rng.normal(size=(5, 37)).astype(np.float32)
    dist, nn = index.search(queries, 7)
    brute = ((queries[:, None] - emb[None]) ** 2).sum(-1)
    order = np.argsort(brute, axis=1)[:, :7]
    assert (nn == rows[order]).all()
    np.testing.assert_allclose(dist, np.take_along_axis(brute, order, 1), rtol=1e-4)
    q_rows, t_rows = rows[[3, 10]], rows[rng.integers(0, 200, (2, 9))]
    lookup = {r: k for k, r in enumerate(rows)}
    expected = np.array([[((emb[lookup[q]] - emb[lookup[t]]) ** 2).sum() for t in ts] for q, ts in zip(q_rows, t_rows)])
    np.testing.assert_allclose(index.distances(q_rows, t_rows), expected, rtol=1e-5)


def test_faiss_pair_distances_are_the_bits_of_index_flat_subset_distances():
    """The faiss engine reads pairs in place (pairwise_indexed_L2sqr) instead of gathering queries for
    IndexFlatL2.compute_distance_subset, which it used before: the same kernel, so the same float32 bits
    (and mis.csv stays byte-identical), at dims that take FAISS' SIMD paths and their remainders."""
    import faiss

    rng = np.random.default_rng(3)
    for dim in (7, 64, 1003):
        emb = rng.normal(size=(120, dim)).astype(np.float32)
        rows = rng.permutation(500)[:120]
        q_pos, t_pos = rng.integers(0, 120, 300), rng.integers(0, 120, (300, 18))
        flat = faiss.IndexFlatL2(dim)
        flat.add(emb)
        before = np.empty((300, 18), np.float32)
        queries, labels = np.ascontiguousarray(emb[q_pos]), np.ascontiguousarray(t_pos.astype(np.int64))
        flat.compute_distance_subset(300, faiss.swig_ptr(queries), 18, faiss.swig_ptr(before), faiss.swig_ptr(labels))
        now = EmbeddingIndex(rows, emb).distances(rows[q_pos], rows[t_pos])
        assert now.dtype == np.float32 and np.array_equal(now.view(np.uint32), before.view(np.uint32))


def test_unknown_backend_is_a_clear_error():
    from misbench.errors import MisbenchError

    with pytest.raises(MisbenchError, match="unknown similarity 'lpips-alexx'.*lpips-alex"):
        build_backend("lpips-alexx")


def test_score_settings_reach_only_the_backends_that_register_them(monkeypatch):
    """DreamSim's weights directory is a setting its registration names: score builds it like any backend."""
    from misbench.scoring.settings import ScoreSettings
    from misbench.similarity import base
    from misbench.similarity.pixel import PixelBackend

    seen = []
    for name in ("dreamsim", "pixel"):
        monkeypatch.setitem(base.BACKENDS, name, lambda _name=name, **kw: seen.append((_name, kw)) or PixelBackend())
    base.backend_from_settings(ScoreSettings(similarity="dreamsim", dreamsim_weights="/w"))
    base.backend_from_settings(ScoreSettings(similarity="pixel", image_size=16, dreamsim_weights="/w"))
    assert seen == [("dreamsim", {"weights": "/w"}), ("pixel", {"image_size": 16})]


@pytest.mark.parametrize("dense", [False, True])
def test_gram_distances_equal_a_float64_brute_force(dense, monkeypatch):
    """The CPU engine, from all dot products at once (in one column slice and in many) or through FAISS'
    per-pair kernel, against a float64 sum of (a - b)^2 pair by pair: to float32 rounding from the dot
    products (to FAISS' float32 sums otherwise), 0 exactly for the same image, and equal rows for two
    copies of an image."""
    from misbench.similarity import gram
    from misbench.similarity.index import GramDistances

    rng = np.random.default_rng(0)
    emb = (rng.normal(size=(120, 300)) + 5).astype(np.float32)  # offset: ||a||^2 >> distances
    emb[7] = emb[3]  # a duplicate image
    rows = rng.permutation(1000)[:120]
    queries = rows[rng.integers(0, 120, (90, 2))]
    queries[:5] = rows[[3, 7]]
    targets = rows[rng.integers(0, 120, (90, 18))]
    targets[:5, 0] = rows[3]
    at = {r: k for k, r in enumerate(rows)}
    e64 = emb.astype(np.float64)
    expected = np.array([[[((e64[at[q]] - e64[at[t]]) ** 2).sum() for t in ts] for q in qs]
                         for qs, ts in zip(queries, targets)])
    monkeypatch.setattr(GramDistances, "DENSE_SHARE", 10 ** 6 if dense else 0)
    for block in (gram.BLOCK_BYTES, 120 * 8 * 7):  # one slice of columns; slices of 7 columns
        monkeypatch.setattr(gram, "BLOCK_BYTES", block)
        engine = GramDistances(rows, emb)
        d = engine.task_distances(queries, targets)
        assert (engine._dots is not None) == dense
        np.testing.assert_allclose(d, expected, rtol=2e-7 if dense else 1e-5)
        assert (d[:5, :, 0] == 0).all() and np.array_equal(d[:5, 0], d[:5, 1])
        np.testing.assert_array_equal(engine.distances(queries[:, 0], targets), d[:, 0])

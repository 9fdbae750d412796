"""The fast paths (channels-last, pinned memory, FAISS GPU index, mixed precision) are the same code on
every device; these tests run on every device present (CPU here, CUDA where there is one)."""

import numpy as np
import pytest
import torch

from conftest import DEVICES, write_acts
from misbench.runtime.device import AMP_DTYPES, prepare_model, resolve_device, to_device
from misbench.activations.extract import ExtractSettings, extract
from misbench.datasets.images import RowImages
from misbench.models.loading import load_model
from misbench.scoring.run import ScoreSettings, embed_rows, score
from misbench.similarity.lpips import LpipsBackend
from misbench.activations.store import open_activations


@pytest.mark.parametrize("device", DEVICES)
def test_extraction_on_device_equals_cpu_forward(tmp_path, image_folder, device):
    torch.manual_seed(0)
    loaded = load_model("mini_inception", num_classes=3)
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    out = extract(loaded, str(image_folder), tmp_path / "a.h5",
                  ExtractSettings(layers=("softmax", "conv1.bn"), device=device, batch_size=8))
    reference = load_model("mini_inception", num_classes=3)
    reference.model.load_state_dict(state)
    ref = extract(reference, str(image_folder), tmp_path / "b.h5", ExtractSettings(layers=("softmax", "conv1.bn"),
                                                                                    device="cpu", batch_size=8))
    with open_activations(out) as a, open_activations(ref) as b:
        np.testing.assert_allclose(a.activations("conv1.bn"), b.activations("conv1.bn"), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_on_device_matches_the_pairwise_reference(property_folder, tmp_path, device):
    root, props = property_folder
    acts = write_acts(tmp_path / "acts.h5", root, {"v": np.stack([props["brightness"], props["hue"]], 1)})
    base = dict(similarity="pixel", image_size=16, n_boot=20, tasks=5)
    score(acts, ["v"], ScoreSettings(**base, device=device), tmp_path / "d.csv", tasks_out=tmp_path / "d.h5")
    score(acts, ["v"], ScoreSettings(**base, device="cpu", engine="pairwise"), tmp_path / "p.csv")
    d = [line.split(",")[3] for line in (tmp_path / "d.csv").read_text().splitlines()]
    p = [line.split(",")[3] for line in (tmp_path / "p.csv").read_text().splitlines()]
    assert d == p


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_extraction_is_close_to_float32(tmp_path, image_folder, device):
    torch.manual_seed(0)
    loaded = load_model("mini_inception", num_classes=3)
    settings = dict(layers=("softmax", "conv"), device=device, batch_size=8)
    exact = extract(loaded, str(image_folder), tmp_path / "exact.h5", ExtractSettings(**settings))
    mixed = extract(loaded, str(image_folder), tmp_path / "amp.h5", ExtractSettings(**settings, amp=True))
    # float16 keeps 11 significant bits, bfloat16 8; errors add up over the network's layers
    tol = 1e-2 if AMP_DTYPES[torch.device(device).type] == torch.float16 else 5e-2
    with open_activations(exact) as a, open_activations(mixed) as b:
        assert b.attrs["settings"] != a.attrs["settings"]  # amp is recorded: the files are not interchangeable
        for name in a.layer_names:
            x, y = a.activations(name), b.activations(name)
            assert y.dtype == np.float32 and np.isfinite(y).all()
            scale = np.abs(x).max()
            np.testing.assert_allclose(y, x, atol=tol * scale, rtol=0)
            assert not np.array_equal(x, y) or name == "softmax"  # autocast did run


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_embeddings_keep_the_geometry(image_folder, tmp_path, device):
    acts = write_acts(tmp_path / "acts.h5", image_folder, {"v": np.zeros((24, 1))})  # 3 classes x 8
    with open_activations(acts) as f:
        images = RowImages(f, np.arange(f.n_rows), 32)
        torch.manual_seed(0)
        backend = LpipsBackend("alex", pretrained=False).to(resolve_device(device)).eval()
        exact = embed_rows(backend, images, resolve_device(device), batch_size=8, workers=2)  # rows survive pickling
        mixed = embed_rows(backend, images, resolve_device(device), batch_size=8, amp=True)
    rows = images.rows
    e, m = exact.vectors(rows), mixed.vectors(rows)
    assert not np.array_equal(e, m)
    cos = (e * m).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(m, axis=1)
    assert cos.min() > 0.999
    # the nearest neighbours, which decide MIS tasks, barely move
    everyone = np.tile(rows, (len(rows), 1))
    d_exact, d_mixed = exact.distances(rows, everyone), mixed.distances(rows, everyone)
    agree = (d_exact.argsort(1)[:, 1] == d_mixed.argsort(1)[:, 1]).mean()
    assert agree > 0.9


def test_under_torchrun_each_rank_uses_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:0") == torch.device("cuda", 3)  # an explicit index would stack ranks on one GPU
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_distances_on_device_equal_a_float64_reference(device, monkeypatch):
    """The scoring distance engine on each device (auto picks torch on CUDA), in one block and in
    many, against a float64 brute force; FAISS on CPU agrees as well."""
    import misbench.similarity.index as index

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 64)).astype(np.float32)
    rows = rng.permutation(5000)[:300]
    queries = rows[rng.integers(0, 300, 700)]
    targets = rows[rng.integers(0, 300, (700, 18))]
    at = {r: k for k, r in enumerate(rows)}
    e64 = emb.astype(np.float64)
    expected = np.array([[((e64[at[q]] - e64[at[t]]) ** 2).sum() for t in ts] for q, ts in zip(queries, targets)])
    engine = index.TorchDistances(rows, emb, resolve_device(device))
    np.testing.assert_allclose(engine.distances(queries, targets), expected, rtol=1e-5)
    monkeypatch.setattr(index, "BLOCK_BYTES", 18 * 64 * 4 * 50)  # 14 blocks of 50 queries
    np.testing.assert_allclose(engine.distances(queries, targets), expected, rtol=1e-5)
    np.testing.assert_allclose(index.EmbeddingIndex(rows, emb).distances(queries, targets), expected, rtol=1e-5)
    assert index.resolve_distances("auto", resolve_device(device)) == ("torch" if device == "cuda" else "gram")


@pytest.mark.parametrize("device", DEVICES)
def test_masked_gradients_keep_the_parameter_layout(device):
    """DDP reduces gradients in buckets laid out like the parameters; a masked gradient with other
    strides (1x1 convolutions in channels-last) costs a copy per step and a warning."""
    from misbench.models.archs import MiniInception
    from misbench.pruning import PruneSettings, apply_masks, compute_masks
    from misbench.pruning.training import MaskEnforcer

    dev = resolve_device(device)
    model = prepare_model(MiniInception(3, width=8), dev).train()
    masks = compute_masks(model, PruneSettings("connection", 0.5), 0.5, ())
    apply_masks(model, masks)
    enforcer = MaskEnforcer(model, masks)
    model(to_device(torch.randn(4, 3, 32, 32), dev)).sum().backward()
    enforcer.remove()
    params = dict(model.named_parameters())
    one_by_one = [n for n in masks if params[n].dim() == 4 and params[n].shape[2:] == (1, 1)]
    assert one_by_one
    for name in masks:
        p = params[name]
        assert p.grad.stride() == p.stride(), name
        assert (p.grad[~masks[name].to(dev)] == 0).all(), name


def test_auto_workers_share_the_node_between_ranks(monkeypatch):
    from misbench.runtime.device import MAX_AUTO_WORKERS, loader_workers, parse_workers
    from misbench.errors import MisbenchError

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert loader_workers(None, cpu) == 0 and loader_workers(3, cpu) == 3
    assert loader_workers(None, cuda) == min(MAX_AUTO_WORKERS, 15)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers(None, cuda) == 3  # 16 cores / 4 ranks, one left to each main process
    assert [parse_workers(v) for v in ("auto", None, "0", 5)] == [None, None, 0, 5]
    for bad in ("-1", "many", -2, True, 1.5):
        with pytest.raises(MisbenchError, match="expected auto or a number"):
            parse_workers(bad)


def test_bad_workers_are_refused_by_cli_and_config(tmp_path):
    from click.testing import CliRunner

    from misbench.cli.main import cli
    from misbench.errors import MisbenchError
    from misbench.studies.config import parse_config

    result = CliRunner().invoke(cli, ["extract", "tiny_cnn", "--data", "digits", "--out", str(tmp_path / "a.h5"),
                                      "--workers", "lots"])
    assert result.exit_code == 2 and "expected auto or a number" in result.output
    assert not (tmp_path / "a.h5").exists()
    base = {"model": {"spec": "tiny_cnn"}, "data": {"val": "digits"}, "retrain": {"epochs": 0}}
    assert parse_config(base)["runtime"]["workers"] == "auto"
    with pytest.raises(MisbenchError, match=r"\[runtime\] workers -3"):
        parse_config({**base, "runtime": {"workers": -3}})


def test_faiss_gpu_index_goes_to_the_rank_gpu_and_answers_searches(monkeypatch):
    """faiss-gpu is absent here: a stand-in records where the index would go and serves it from CPU."""
    import faiss

    from misbench.similarity import EmbeddingIndex

    placed = []

    class Resources:
        pass

    def to_gpu(resources, gpu, index):
        placed.append((type(resources), gpu))
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    emb = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    rows = np.arange(100, 150)
    index = EmbeddingIndex(rows, emb, gpu=1)
    assert placed == [(Resources, 1)] and index.gpu is not None
    dist, found = index.search(emb[:5], 1)
    assert found[:, 0].tolist() == rows[:5].tolist() and np.allclose(dist, 0)
    assert EmbeddingIndex(rows, emb, gpu=2).gpu is None  # no such GPU: the CPU index serves
    assert EmbeddingIndex(rows, emb).gpu is None and len(placed) == 1


def test_exact_float32_turns_tf32_off_and_restores_it():
    """PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default; activations and LPIPS
    distances are exact only without it."""
    from misbench.runtime.device import precision

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with precision(torch.device("cpu"), amp=False):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with precision(torch.device("cpu"), amp=True):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_enabled("cpu")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_float32_training_keeps_tf32_off_in_forward_and_backward():
    from misbench.models.archs import MiniInception
    from misbench.datasets.sources import ArraySource
    from misbench.models.preprocess import Preprocess
    from misbench.pruning.training import Trainer, TrainSettings

    rng = np.random.default_rng(0)
    source = ArraySource("toy", rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, 16),
                         ["a", "b", "c"])
    model = MiniInception(3, width=8)
    seen = []
    model.conv1.register_forward_hook(lambda *_: seen.append(("forward", torch.backends.cudnn.allow_tf32)))
    model.conv1.conv.weight.register_hook(lambda _grad: seen.append(("backward", torch.backends.cudnn.allow_tf32)))
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        trainer = Trainer(model, {}, TrainSettings(epochs=1, batch_size=8, device="cpu"), Preprocess(32, 32), source,
                          source)
        trainer.train_epoch()
        assert {"forward", "backward"} <= {kind for kind, _ in seen} and not any(flag for _, flag in seen)
        trainer.validate()
        assert torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.backends.cudnn.allow_tf32 = before

"""Training on per-position vectors (issue 24 item 1): a bounded reservoir over the streamed positions."""

import numpy as np
import torch
from click.testing import CliRunner

from conftest import make_image_folder
from misbench.activations.positions import Reservoir, sample_positions
from misbench.cli.main import cli


def algorithm_r(stream: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Vitter's Algorithm R one vector at a time, drawing from the same generator stream."""
    rng = np.random.default_rng(seed)
    keep = list(stream[:size])
    for t in range(size, len(stream)):
        j = int(np.floor(rng.random() * (t + 1)))
        if j < size:
            keep[j] = stream[t]
    return np.array(keep)


def test_reservoir_equals_algorithm_r_in_any_batches_and_is_uniform():
    stream = np.arange(500, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    ref = algorithm_r(stream, 40, seed=7)
    for cuts in ([500], [1, 39, 5, 200, 255], [41] * 12 + [8]):
        r = Reservoir(40, seed=7)
        start = 0
        for n in cuts:
            r.add(torch.from_numpy(stream[start:start + n]))
            start += n
        assert np.array_equal(r.sample().numpy(), ref) and r.seen == 500
    # inclusion is uniform: over many seeds each of 50 items is kept 10/50 of the time (chi-square, 49 dof)
    counts = np.zeros(50)
    for seed in range(2000):
        r = Reservoir(10, seed=seed)
        r.add(torch.arange(50.0)[:, None])
        counts[r.sample()[:, 0].long().numpy()] += 1
    expected = 2000 * 10 / 50
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 85  # the 99.9th percentile of chi-square(49) is about 85


def test_positions_are_the_layers_vectors_and_train_a_dictionary(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=6, size=16)
    from misbench import api

    loaded = api.load_model("resnet18:random")
    x, record = sample_positions(loaded, str(folder), "layer3", 500, seed=0, batch_size=12, device="cpu")
    # every sampled vector is one position of layer3's output on some image (a direct forward pass, same batch)
    outputs = {}
    handle = loaded.model.layer3.register_forward_hook(lambda m, i, o: outputs.setdefault("o", []).append(o))
    from misbench.datasets.sources import TransformedDataset, load_data
    from misbench.models.preprocess import build_transform
    pre = loaded.preprocess
    source = load_data(str(folder), loaded.num_classes, "folder-order", loaded.categories)
    ds = TransformedDataset(source, build_transform(pre), (3, pre.crop, pre.crop), 0, len(source))
    with torch.inference_mode():
        loaded.model.eval()(torch.stack([ds[i][0] for i in range(len(ds))]))
    handle.remove()
    out = outputs["o"][0]  # [12, 256, H, W]
    positions = out.flatten(2).transpose(1, 2).reshape(-1, out.shape[1])
    assert record["positions_seen"] == len(positions) and record["images"] == 12 and x.shape == (500, 256)
    dist = torch.cdist(x, positions, compute_mode="donot_use_mm_for_euclid_dist")
    assert float(dist.min(1).values.max()) < 1e-3
    res = CliRunner().invoke(cli, ["train-dictionary", "--positions", "300", "--model", "resnet18:random", "--data",
                                   str(folder), "--layer", "layer3", "--expansion", "0.5", "--k", "4", "--steps", "20",
                                   "--out", str(tmp_path / "sae.pt"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    training = torch.load(tmp_path / "sae.pt", weights_only=True)["training"]
    assert training["vectors"] == "positions" and training["n_vectors"] == 300 and training["n_features"] == 128
    assert training["positions_seen"] == len(positions)
    res = CliRunner().invoke(cli, ["train-dictionary", "--positions", "300", "--layer", "layer3",
                                   "--out", str(tmp_path / "b.pt")])
    assert res.exit_code != 0 and "give --model and --data" in res.output


def test_positions_on_a_random_model_are_deterministic_for_a_seed(tmp_path):
    """A `name:random` --model is built from --seed: the same command twice gives the same dictionary (and the
    network it read is the one torch.manual_seed(seed) builds); another seed another one."""
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=4, size=16)

    def run(name, seed):
        res = CliRunner().invoke(cli, ["train-dictionary", "--positions", "200", "--model", "tiny_cnn:random",
                                       "--data", str(folder), "--layer", "conv2", "--n-features", "8", "--k", "2",
                                       "--steps", "5", "--seed", str(seed), "--out", str(tmp_path / name),
                                       "--device", "cpu"])
        assert res.exit_code == 0, res.output
        return torch.load(tmp_path / name, weights_only=True)

    a, b, c = run("a.pt", 3), run("b.pt", 3), run("c.pt", 4)
    for key in ("W_enc", "b_enc", "b_dec", "W_dec"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["b_dec"], c["b_dec"])
    # the network is the one torch.manual_seed(3) builds, and the global generator is left as it was
    from misbench import api
    from misbench.models.loading import load_seeded

    torch.manual_seed(3)
    direct = api.load_model("tiny_cnn:random")
    state = torch.random.get_rng_state()
    seeded = load_seeded("tiny_cnn:random", 3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(direct.model.state_dict().values(),
                                                 seeded.model.state_dict().values()))

"""train-dictionary: a top-k SAE recovers planted sparse structure, deterministically (issue 16)."""

import numpy as np
import torch
from click.testing import CliRunner

from conftest import make_image_folder, write_acts
from misbench.cli.main import cli
from misbench.activations.dictionary import encode, load_dictionary


def test_topk_sae_reconstructs_planted_sparse_codes_and_is_deterministic(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=150, size=4)
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(12, 16))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((300, 12))
    for row in codes:  # two active atoms per row, positive weights
        row[rng.choice(12, 2, replace=False)] = rng.uniform(1, 3, 2)
    x = (codes @ atoms + 5.0).astype(np.float32)  # an offset b_dec must learn
    acts = write_acts(tmp_path / "acts.h5", folder, {"layer3": x})
    args = ["train-dictionary", str(acts), "--layer", "layer3", "--n-features", "24", "--k", "3", "--steps", "300",
            "--lr", "0.02", "--batch-size", "64"]
    for name in ("a.pt", "b.pt"):
        res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    for key in ("W_enc", "b_enc", "b_dec", "W_dec"):
        assert torch.equal(a[key], b[key])  # same seed, same file
    dic = load_dictionary(tmp_path / "a.pt")
    assert dic.activation == "topk:3" and dic.W_enc.shape == (24, 16)
    # the saved encoder, applied to raw activations as extract --features does, reconstructs them through W_dec
    f = encode(torch.from_numpy(x), dic)
    assert int((f > 0).sum(1).max()) <= 3
    recon = f @ a["W_dec"].T + a["b_dec"]
    fve = 1 - ((recon.numpy() - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fve > 0.8, fve
    assert abs(fve - a["training"]["fraction_variance_explained"]) < 1e-4
    # a dictionary whose features are one random direction each explains far less
    res = CliRunner().invoke(cli, args[:-6] + ["--steps", "1", "--out", str(tmp_path / "c.pt")])
    c = torch.load(tmp_path / "c.pt", weights_only=True)
    assert c["training"]["fraction_variance_explained"] < fve - 0.2
    res = CliRunner().invoke(cli, ["train-dictionary", str(acts), "--layer", "nope", "--out", str(tmp_path / "d.pt")])
    assert res.exit_code != 0 and "layer3" in res.output

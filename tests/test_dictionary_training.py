"""train-dictionary: a top-k SAE recovers planted sparse structure, deterministically (issue 16)."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import misbench
from conftest import make_image_folder, write_acts
from misbench.cli.main import cli
from misbench.activations.dictionary import encode, load_dictionary
from misbench.errors import MisbenchError


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
    res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "a.pt")])
    assert res.exit_code == 0, res.output
    # the API's function is the command's: same options, same file
    misbench.train_dictionary(acts, "layer3", tmp_path / "b.pt", n_features=24, k=3, steps=300, lr=0.02, batch_size=64)
    with pytest.raises(MisbenchError, match="unknown train-dictionary option 'n_feature'.*n_features"):
        misbench.train_dictionary(acts, "layer3", tmp_path / "e.pt", n_feature=24)
    with pytest.raises(MisbenchError, match="n_features: must be at least 1"):
        misbench.train_dictionary(acts, "layer3", tmp_path / "e.pt", n_features=0)
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


def _planted(tmp_path, n=300, d=16, atoms=12, seed=0):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=n // 2, size=4)
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(atoms, d))
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    codes = np.zeros((n, atoms))
    for row in codes:
        row[rng.choice(atoms, 2, replace=False)] = rng.uniform(1, 3, 2)
    x = (codes @ basis + 5.0).astype(np.float32)
    return write_acts(tmp_path / "acts.h5", folder, {"layer3": x}), x


def _measured(x, path):
    """FVU, L0 and dead share recomputed from the saved file through extract's encode (the reference)."""
    obj = torch.load(path, weights_only=True)
    f = encode(torch.from_numpy(x), load_dictionary(path))
    recon = (f @ obj["W_dec"].T + obj["b_dec"]).numpy()
    fvu = ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    return obj, fvu, float((f > 0).sum(1).float().mean()), float(1 - (f > 0).any(0).float().mean())


def test_kinds_widths_records_and_untrained_control(tmp_path):
    acts, x = _planted(tmp_path)
    from misbench.activations.dictionary_training import DictionarySettings, train_dictionary

    for kind, extra in (("topk", {}), ("batchtopk", {}), ("relu", {"l1": 3e-3})):
        out, ctrl = tmp_path / f"{kind}.pt", tmp_path / f"{kind}-untrained.pt"
        s = DictionarySettings(k=2, steps=200, lr=0.03, batch_size=64, kind=kind, expansion=2, **extra)
        record = train_dictionary(acts, "layer3", out, s, untrained_out=ctrl)
        obj, fvu, l0, dead = _measured(x, out)
        assert obj["W_enc"].shape == (32, 16) and record["n_features"] == 32 and record["expansion"] == 2
        assert record["kind"] == kind and record["steps"] == 200 and record["vectors"] == "images"
        assert record["layer"] == "layer3" and record["n_vectors"] == 300
        assert abs(record["fvu"] - fvu) < 1e-4 and abs(record["l0"] - l0) < 1e-6 and abs(record["dead_share"] - dead) < 1e-9
        assert fvu < 0.35, (kind, fvu)
        if kind == "topk":
            assert obj["activation"] == "topk:2" and l0 <= 2
        if kind == "batchtopk":  # the threshold keeps k per input on average over the training rows
            assert obj["activation"].startswith("jumprelu:") and abs(l0 - 2) < 0.05
        if kind == "relu":
            assert obj["activation"] == "relu" and record["k"] is None
        # the untrained control: same kind and width, its initial weights (W_enc = W_dec^T, unit columns)
        c, c_fvu, _, _ = _measured(x, ctrl)
        assert c["training"]["control"] == "untrained" and c["training"]["steps"] == 0
        assert c["W_enc"].shape == obj["W_enc"].shape and c["activation"].split(":")[0] == obj["activation"].split(":")[0]
        assert torch.allclose(c["W_enc"] * c["training"]["scale"], c["W_dec"].T / c["training"]["scale"], atol=1e-6)
        assert abs(c["training"]["fvu"] - c_fvu) < 1e-4 and c_fvu > fvu + 0.2


def test_width_and_kind_errors(tmp_path):
    acts, _ = _planted(tmp_path, n=40)
    res = CliRunner().invoke(cli, ["train-dictionary", str(acts), "--layer", "layer3", "--out", str(tmp_path / "a.pt"),
                                   "--expansion", "0.1", "--k", "4"])
    assert res.exit_code != 0 and "k 4 exceeds the dictionary's 2 features" in res.output
    res = CliRunner().invoke(cli, ["train-dictionary", str(acts), "--layer", "layer3", "--out", str(tmp_path / "a.pt"),
                                   "--expansion", "-1"])
    assert res.exit_code != 0 and "--expansion" in res.output

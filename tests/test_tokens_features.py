"""Token layers and dictionary features against manual hook-and-reduce references (issue 16)."""

import csv

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_image_folder, write_acts
from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.activations.extract import ExtractSettings, extract
from misbench.models.loading import load_model
from misbench.models.preprocess import build_transform
from misbench.scoring.run import ScoreSettings, score
from misbench.activations.store import open_activations


def raw_outputs(model, folder, pre, modules):
    """Reference: the raw (unreduced) outputs of `modules` on a plain forward pass, images read with PIL."""
    from PIL import Image

    transform = build_transform(pre)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("*.png"))])
    outputs = {}
    named = dict(model.named_modules())
    handles = [named[m].register_forward_hook(lambda _m, _i, out, m=m: outputs.__setitem__(m, out.clone()))
               for m in modules]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return {m: o.double().numpy() for m, o in outputs.items()}


def manual_features(positions, w, b, b_dec, activation):
    """numpy reference of f = act((x - b_dec) W^T + b) at every position ([..., D] -> [..., K])."""
    pre = (positions - (0 if b_dec is None else b_dec)) @ w.T + b
    name, _, arg = activation.partition(":")
    if name == "relu":
        return np.maximum(pre, 0)
    if name == "jumprelu":
        return np.where(pre > float(arg), pre, 0)
    k = int(arg)
    out = np.zeros_like(pre)
    flat_pre, flat_out = pre.reshape(-1, pre.shape[-1]), out.reshape(-1, pre.shape[-1])
    for row in range(len(flat_pre)):
        top = np.argsort(-flat_pre[row], kind="stable")[:k]
        flat_out[row, top] = np.maximum(flat_pre[row, top], 0)
    return out


def save_dictionary(path, k, d, seed=0, b_dec=True, activation="relu"):
    g = torch.Generator().manual_seed(seed)
    obj = {"W_enc": torch.randn(k, d, generator=g) / d ** 0.5, "b_enc": 0.1 * torch.randn(k, generator=g),
           "activation": activation}
    if b_dec:
        obj["b_dec"] = 0.1 * torch.randn(d, generator=g)
    torch.save(obj, path)
    return {key: (v.double().numpy() if isinstance(v, torch.Tensor) else v) for key, v in obj.items()}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return load_model("vit_b_16:random")


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("vit") / "images", classes=2, per_class=2)


VIT_LAYERS = ["encoder.layers.encoder_layer_0.mlp.1", "encoder.layers.encoder_layer_11.mlp.1",
              "encoder.layers.encoder_layer_5"]
VIT_DICTIONARY_LAYER = "encoder.layers.encoder_layer_2.mlp.1"


@pytest.fixture(scope="module")
def vit_raw(vit, vit_folder):
    """The reference outputs of the ViT's layers that the tests below read, from one forward pass."""
    return raw_outputs(vit.model, vit_folder, vit.preprocess, VIT_LAYERS + [VIT_DICTIONARY_LAYER])


@pytest.mark.parametrize("how", ["mean", pytest.param("max", marks=pytest.mark.slow), "cls"])
def test_vit_token_reduction_equals_manual_hook_and_reduce(tmp_path, vit, vit_folder, vit_raw, how):
    settings = ExtractSettings(layers=("mlp", "encoder.layers.encoder_layer_5"), token_reduction=how,
                               labels="folder-order", batch_size=4)
    out = extract(vit, str(vit_folder), tmp_path / "acts.h5", settings)
    ref = vit_raw
    reduce = {"mean": lambda o: o.mean(1), "max": lambda o: o.max(1), "cls": lambda o: o[:, 0]}[how]
    with open_activations(out) as acts:
        mlp = [n for n in acts.layer_names if n.endswith(".mlp.1")]
        assert mlp == [f"encoder.layers.encoder_layer_{i}.mlp.1" for i in range(12)]  # every block, model order
        for name in VIT_LAYERS:
            assert ref[name].ndim == 3
            np.testing.assert_allclose(acts.activations(name), reduce(ref[name]), rtol=1e-4, atol=1e-5)
            attrs = acts.layer(name).attrs
            assert attrs["kind"] == "token" and attrs["token_reduction"] == how
            assert attrs["n_units"] == ref[name].shape[2]
        assert h5py.File(out)["/"].attrs["token_reduction"] == how


def test_swin_mlp_grid_reduced_over_all_tokens_and_cls_refused(tmp_path):
    torch.manual_seed(0)
    swin = load_model("swin_t:random")
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=1)
    out = extract(swin, str(folder), tmp_path / "acts.h5",
                  ExtractSettings(layers=("mlp",), token_reduction="max", labels="folder-order"))
    hidden = ["features.1.0.mlp.1", "features.7.1.mlp.1"]
    ref = raw_outputs(swin.model, folder, swin.preprocess, hidden)
    with open_activations(out) as acts:
        assert sum(n.endswith(".mlp.1") for n in acts.layer_names) == 12  # 2 + 2 + 6 + 2 blocks
        for name in hidden:
            assert ref[name].ndim == 4  # [N, H, W, 4C]: channels last
            np.testing.assert_allclose(acts.activations(name), ref[name].max(axis=(1, 2)), rtol=1e-4, atol=1e-5)
            assert acts.layer(name).attrs["n_units"] == ref[name].shape[3]
    with pytest.raises(MisbenchError, match="without a class token"):
        extract(swin, str(folder), tmp_path / "cls.h5",
                ExtractSettings(layers=("mlp",), token_reduction="cls", labels="folder-order"))
    assert not (tmp_path / "cls.h5").exists()


def test_mlp_refused_on_a_cnn():
    with pytest.raises(MisbenchError, match="no transformer MLP"):
        from misbench.activations.hooks import resolve_layers
        resolve_layers(load_model("resnet18:random").model, "mlp")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return load_model("resnet18:random")


@pytest.mark.parametrize("activation,reduction", [("relu", "mean"), ("topk:5", "max"), ("jumprelu:0.05", "mean")])
def test_conv_dictionary_features_equal_manual(tmp_path, resnet, image_folder, activation, reduction):
    dic = save_dictionary(tmp_path / "sae.pt", k=24, d=64, activation=activation)
    settings = ExtractSettings(layers=("layer1.0.bn1",), features=(f"sae=layer1.0.bn1:{tmp_path / 'sae.pt'}",),
                               reduction=reduction, resize=48, crop=48, labels="folder-order", batch_size=7)
    out = extract(resnet, str(image_folder), tmp_path / "acts.h5", settings)
    raw = raw_outputs(resnet.model, image_folder, resnet.preprocess.override(48, 48), ["layer1.0.bn1"])["layer1.0.bn1"]
    positions = raw.reshape(raw.shape[0], raw.shape[1], -1).transpose(0, 2, 1)  # [N, HW, 64]
    feats = manual_features(positions, dic["W_enc"], dic["b_enc"], dic["b_dec"], activation)
    expected = feats.mean(1) if reduction == "mean" else feats.max(1)
    assert np.count_nonzero(expected) > 0.1 * expected.size  # the test sees live features
    with open_activations(out) as acts:
        np.testing.assert_allclose(acts.activations("sae"), expected, rtol=1e-4, atol=1e-5)
        attrs = dict(acts.layer("sae").attrs)
        import hashlib
        assert attrs["kind"] == "features" and attrs["module"] == "layer1.0.bn1"
        assert attrs["activation"] == activation and attrs["reduction"] == reduction
        assert attrs["dictionary_sha256"] == hashlib.sha256((tmp_path / "sae.pt").read_bytes()).hexdigest()
        np.testing.assert_allclose(acts.activations("layer1.0.bn1"), raw.mean(axis=(2, 3)) if reduction == "mean"
                                   else raw.max(axis=(2, 3)), rtol=1e-4, atol=1e-5)


def test_token_dictionary_features_equal_manual(tmp_path, vit, vit_folder, vit_raw):
    layer = VIT_DICTIONARY_LAYER
    dic = save_dictionary(tmp_path / "sae.pt", k=40, d=3072, b_dec=False, activation="topk:6")
    out = extract(vit, str(vit_folder), tmp_path / "acts.h5",
                  ExtractSettings(layers=("softmax",), features=(f"f2={layer}:{tmp_path / 'sae.pt'}",),
                                  token_reduction="mean", labels="folder-order"))
    raw = vit_raw[layer]  # [N, 197, 3072]
    expected = manual_features(raw, dic["W_enc"], dic["b_enc"], None, "topk:6").mean(1)
    with open_activations(out) as acts:
        np.testing.assert_allclose(acts.activations("f2"), expected, rtol=1e-4, atol=1e-5)
        assert acts.layer("f2").attrs["layer_kind"] == "token" and acts.layer("f2").attrs["reduction"] == "mean"
        assert layer not in acts.layer_names  # the dictionary's layer is hooked without being stored


def test_wrong_width_dictionary_refused_naming_both_shapes(tmp_path, resnet, image_folder):
    save_dictionary(tmp_path / "sae.pt", k=10, d=128)
    runner = CliRunner()
    result = runner.invoke(cli, ["extract", "resnet18:random", "--data", str(image_folder), "--layers", "conv",
                                 "--features", f"sae=layer1.0.bn1:{tmp_path / 'sae.pt'}", "--out",
                                 str(tmp_path / "acts.h5"), "--labels", "folder-order", "--crop", "32"])
    assert result.exit_code != 0
    assert "[10, 128]" in result.output and "D = 64" in result.output and "[1, 64, 8, 8]" in result.output
    assert not (tmp_path / "acts.h5").exists() and not list(tmp_path.glob("*.partial*"))
    bad = {"W_enc": torch.zeros(4, 64), "b_enc": torch.zeros(5)}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(MisbenchError, match=r"b_enc must be \[K\] = \[4\]"):
        extract(resnet, str(image_folder), tmp_path / "b.h5",
                ExtractSettings(layers=("conv",), features=(f"x=layer1.0.bn1:{tmp_path / 'bad.pt'}",),
                                labels="folder-order"))
    with pytest.raises(MisbenchError, match="NAME=LAYER:FILE"):
        ExtractSettings(features=("nonsense",))
    torch.save({"W_enc": torch.zeros(4, 64), "b_enc": torch.zeros(4), "activation": "topk:x"}, tmp_path / "act.pt")
    with pytest.raises(MisbenchError, match="topk:x"):
        extract(resnet, str(image_folder), tmp_path / "c.h5",
                ExtractSettings(layers=("conv",), features=(f"x=layer1.0.bn1:{tmp_path / 'act.pt'}",),
                                labels="folder-order"))


def test_dictionary_layer_scores_equal_the_same_matrix_as_a_plain_layer(tmp_path, resnet):
    folder = make_image_folder(tmp_path / "images", classes=3, per_class=10, size=24)
    save_dictionary(tmp_path / "sae.pt", k=6, d=64)
    acts = extract(resnet, str(folder), tmp_path / "acts.h5",
                   ExtractSettings(layers=("softmax",), features=(f"sae=layer1.0.bn1:{tmp_path / 'sae.pt'}",),
                                   resize=32, crop=32, labels="folder-order"))
    with open_activations(acts) as a:
        matrix = np.asarray(a.activations("sae"), np.float32)
    plain = write_acts(tmp_path / "plain.h5", folder, {"sae": matrix})
    settings = ScoreSettings(similarity="pixel", image_size=16, selection="quantile", quantile=0.4, tasks=3,
                             explanations=2, view="raw", device="cpu", n_boot=50)
    score(acts, ["sae"], settings, tmp_path / "feat.csv")
    score(plain, ["sae"], settings, tmp_path / "plain.csv")
    rows = [list(csv.DictReader(open(tmp_path / f"{n}.csv"))) for n in ("feat", "plain")]
    assert len(rows[0]) == 6 and any(r["status"] == "ok" for r in rows[0])
    assert rows[0] == rows[1]


@pytest.mark.parametrize("model", ["vit_b_16:random", "swin_t:random"])
def test_layers_marks_what_mlp_expands_to_with_token_widths(model):
    """`misbench layers` marks with '+' exactly the MLP nonlinearities (enumerated by hand: every GELU of
    these models sits in an MLP block), in model order, with D from a hook on each one's output; token
    layers have the kind extract writes in the file's attrs (`token`)."""
    torch.manual_seed(0)
    net = load_model(model).model.eval()
    gelus = [name for name, m in net.named_modules() if isinstance(m, torch.nn.GELU)]
    widths, kinds = {}, {}
    def record(name):
        def hook(_module, _inputs, output):
            widths[name] = output.shape[-1]  # GELU keeps the layout: [N, T, D] (ViT) or [N, H, W, D] (Swin)
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in net.named_modules() if name in gelus]
    with torch.inference_mode():
        net(torch.zeros(1, 3, 224, 224))
    for h in handles:
        h.remove()
    r = CliRunner().invoke(cli, ["layers", model])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()[1:]
    rows = [line.split() for line in lines if line.split() and line.split()[0] in widths]
    marked = [line.split()[0] for line in lines if line.endswith(" +")]
    assert len(gelus) == 12 and marked == gelus
    for name, kind, units, *_ in rows:
        kinds[name] = kind
        assert int(units) == widths[name], name
    assert set(kinds.values()) == {"token"}
    if model.startswith("swin"):
        assert sorted(set(widths.values())) == [384, 768, 1536, 3072]
    assert f"mlp = 12 modules, {sum(widths.values())} units (+)" in r.output

import json
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from misbench.cli.main import cli
from misbench.datasets.sources import FASHION_MNIST_CLASSES, DEBIAN_FASHION_MNIST, load_data
from misbench.errors import MisbenchError
from misbench.activations.evaluate import accuracy_from_logits
from misbench.models.loading import load_model


def test_state_dict_needs_arch_and_mismatch_names_keys(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(MisbenchError, match="--arch"):
        load_model(str(path))
    loaded = load_model(str(path), arch="resnet18")
    assert loaded.num_classes == 5 and len(loaded.sha256) == 64
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    with pytest.raises(MisbenchError) as err:
        load_model(str(path), arch="resnet34", num_classes=5)
    assert "missing keys: layer1.2" in str(err.value)
    with pytest.raises(MisbenchError, match="shape mismatches"):
        load_model(str(path), arch="resnet18", num_classes=10)


def test_googlenet_state_dict_with_and_without_aux(tmp_path):
    for aux in (True, False):
        model = torchvision.models.googlenet(weights=None, aux_logits=aux, init_weights=False, num_classes=4)
        path = tmp_path / f"g{aux}.pt"
        torch.save({"state_dict": model.state_dict()}, path)  # nested, as many training scripts write it
        loaded = load_model(str(path), arch="googlenet")
        assert loaded.arch_kwargs == {"aux_logits": aux, "transform_input": True}
        assert loaded.model.transform_input and (loaded.model.aux1 is not None) == aux


def test_whole_model_pickle_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3), path)
    with pytest.raises(MisbenchError, match="--trust-pickle"):
        load_model(str(path))
    loaded = load_model(str(path), trust_pickle=True)
    assert loaded.num_classes == 3


def test_offline_weights_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    def offline(url, dst, *a, **k):
        open(dst, "wb").write(b"half a file")  # a download that dies midway
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MisbenchError) as err:
        load_model("googlenet:IMAGENET1K_V1")
    text = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "googlenet-1378be20.pth") in text and "could not be downloaded" in text
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())  # nothing half-written is left
    with pytest.raises(MisbenchError, match="unknown weights"):
        load_model("googlenet:IMAGENET9K")
    with pytest.raises(MisbenchError, match="unknown architecture"):
        load_model("googlenett")


def test_staged_mobilenet_weights_load_and_classify(tmp_path):
    from misbench.models.assets import ASSETS, asset_status

    if not asset_status(ASSETS["mobilenet_v2"])["staged"]:
        pytest.skip("mobilenet_v2 weights not staged (run `make assets`)")
    loaded = load_model("mobilenet_v2:IMAGENET1K_V1")
    assert loaded.num_classes == 1000 and loaded.preprocess.crop == 224
    # a real pretrained network is confident on its own preprocessing of a natural image
    from sklearn.datasets import load_sample_image
    from PIL import Image
    from misbench.models.preprocess import build_transform

    x = build_transform(loaded.preprocess)(Image.fromarray(load_sample_image("china.jpg")))[None]
    with torch.no_grad():
        p = torch.softmax(loaded.model.eval()(x), 1)
    assert p.max() > 0.2


def test_asset_staging_checks_sha256(tmp_path, monkeypatch):
    from misbench.models.assets import stage_asset

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fake = tmp_path / "src"
    fake.mkdir()
    (fake / "mobilenet_v2-b0353104.pth").write_bytes(b"corrupt")
    with pytest.raises(MisbenchError, match="sha256"):
        stage_asset("mobilenet_v2", fake)
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").exists()
    with pytest.raises(MisbenchError, match="unknown asset"):
        stage_asset("resnet")


def test_digits_and_image_folder_sources(image_folder):
    digits = load_data("digits")
    assert len(digits) == 1797 and digits.image(0).mode == "RGB" and digits.image(0).size == (8, 8)
    from sklearn.datasets import load_digits

    assert [digits.label(i) for i in range(20)] == list(load_digits().target[:20])
    folder = load_data(str(image_folder))
    assert folder.classes == ["class_00", "class_01", "class_02"] and len(folder) == 24
    assert folder.path(9) == "class_01/img_001.png" and folder.label(9) == 1
    with pytest.raises(MisbenchError, match="fashion-mnist:train or fashion-mnist:test"):
        load_data("fashion-mnist:val")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    test = load_data("fashion-mnist:test")
    assert len(test) == 10000 and test.classes == FASHION_MNIST_CLASSES
    img = test.image(0)
    assert img.size == (28, 28) and img.mode == "RGB"
    counts = np.bincount([test.label(i) for i in range(len(test))])
    assert counts.tolist() == [1000] * 10


def test_accuracy_from_logits_equals_manual_count():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(300, 7)), rng.integers(0, 6, 300)  # class 6 has no images
    result = accuracy_from_logits(logits, labels, [f"c{i}" for i in range(7)])
    top1 = np.mean([np.argmax(l) == y for l, y in zip(logits, labels)])
    top5 = np.mean([y in np.argsort(l)[::-1][:5] for l, y in zip(logits, labels)])
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
    for c in range(6):
        idx = [i for i in range(300) if labels[i] == c]
        manual = sum(np.argmax(logits[i]) == c for i in idx) / len(idx)
        assert result["per_class"][c] == {"class": c, "name": f"c{c}", "n": len(idx), "accuracy": pytest.approx(manual)}
    assert result["per_class"][6]["n"] == 0 and result["per_class"][6]["accuracy"] is None


def test_cli_eval_model_equals_eval_from_acts(tmp_path, image_folder):
    torch.manual_seed(3)
    ckpt = tmp_path / "m.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), ckpt)
    runner = CliRunner()
    common = [str(ckpt), "--arch", "resnet18", "--data", str(image_folder)]
    r = runner.invoke(cli, ["eval", *common, "--out", str(tmp_path / "e1.json"), "--classwise", str(tmp_path / "c.csv")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["extract", *common, "--layers", "softmax", "--out", str(tmp_path / "a.h5")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["eval", "--acts", str(tmp_path / "a.h5"), "--out", str(tmp_path / "e2.json")])
    assert r.exit_code == 0, r.output
    e1, e2 = (json.loads((tmp_path / f).read_text()) for f in ("e1.json", "e2.json"))
    assert e1["top1"] == pytest.approx(e2["top1"]) and e1["per_class"] == e2["per_class"]
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines[0] == "class,name,n,accuracy" and lines[1].startswith("0,class_00,8,")
    r = runner.invoke(cli, ["eval", "--acts", str(tmp_path / "a.h5"), str(ckpt), "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 1 and "not both" in r.output


def test_cli_errors_are_clean(tmp_path):
    r = CliRunner().invoke(cli, ["extract", "resnet18:random", "--data", str(tmp_path / "missing"), "--layers", "fc",
                                 "--out", str(tmp_path / "a.h5")])
    assert r.exit_code == 1 and r.output.startswith("Error: data") and "Traceback" not in r.output


def _wnid_tree(root, folders, per_class=2):
    from PIL import Image

    for k, name in enumerate(folders):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 20 * k + i, np.uint8)).save(root / name / f"{name}_{i}.JPEG")
    return root


def test_imagenet_wnids_are_torchvisions_class_order():
    from misbench.datasets.labels import imagenet_wnids

    wnids = list(imagenet_wnids())
    categories = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(wnids) == len(set(wnids)) == len(categories) == 1000 and wnids == sorted(wnids)
    # Imagenette's ten classes, WNID -> torchvision category name (fast.ai's published list)
    imagenette = {"n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
                  "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
                  "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
                  "n03888257": "parachute"}
    assert {w: categories[wnids.index(w)] for w in imagenette} == imagenette
    assert (wnids[-1], categories[-1]) == ("n15075141", "toilet tissue")


def test_wnid_folders_follow_the_model_class_indices(tmp_path):
    from misbench.datasets.labels import imagenet_wnids

    subset = ["n03888257", "n01440764", "n03028079"]  # an Imagenette-like subset, any order on disk
    root = _wnid_tree(tmp_path / "val", subset)
    source = load_data(str(root), num_classes=1000)
    wnids = list(imagenet_wnids())
    expected = [wnids.index(source.path(i).split("/")[0]) for i in range(len(source))]
    assert [source.label(i) for i in range(len(source))] == expected and sorted(set(expected)) == [0, 497, 701]
    assert source.classes[0] == "tench" and len(source.classes) == 1000 and source.label_map.mapping == "wnid"
    # a model of 3 classes trained on these folders: folder order, as torchvision's ImageFolder
    small = load_data(str(root), num_classes=3)
    assert sorted({small.label(i) for i in range(len(small))}) == [0, 1, 2] and small.classes == sorted(subset)


def test_unmatched_folders_need_the_users_word(tmp_path):
    root = _wnid_tree(tmp_path / "val", ["cat", "dog"])
    with pytest.raises(MisbenchError) as err:
        load_data(str(root), num_classes=1000)
    text = str(err.value)
    assert "cat, dog" in text and "--labels folder-order" in text and str(root) in text and "\n" not in text
    stated = load_data(str(root), num_classes=1000, labels="folder-order")
    assert [stated.label(i) for i in range(len(stated))] == [0, 0, 1, 1] and stated.classes[:2] == ["cat", "dog"]
    with pytest.raises(MisbenchError, match="3 class folders but the model has 2"):
        load_data(str(_wnid_tree(tmp_path / "three", ["a", "b", "c"])), num_classes=2)
    r = CliRunner().invoke(cli, ["eval", "resnet18:random", "--data", str(root), "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 1 and "--labels folder-order" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "e.json").exists()


def test_eval_on_wnid_folders_reports_imagenet_classes(tmp_path):
    from misbench.activations.evaluate import evaluate_model

    root = _wnid_tree(tmp_path / "val", ["n01443537", "n01440764"])
    loaded = load_model("resnet18:random")
    loaded.preprocess = loaded.preprocess.override(32, 32)
    result = evaluate_model(loaded, str(root))
    present = {row["class"]: row["name"] for row in result["per_class"] if row["n"]}
    assert present == {0: "tench", 1: "goldfish"}


def test_float32_tiff_images_are_scaled_from_unit_range_not_blackened(tmp_path):
    """A 32-bit float TIFF (PIL mode F) holds values in [0, 1]; PIL's convert('RGB') clips them to 0..255
    without scaling, which made every such image (almost) black. Checked against an independent
    conversion of the written array: round(v * 255) in every channel."""
    from PIL import Image

    from misbench.datasets.sources import FolderSource

    rng = np.random.default_rng(3)
    folder = tmp_path / "tiffs" / "cls"
    folder.mkdir(parents=True)
    arrays = [rng.random((24, 20), dtype=np.float32), np.linspace(0, 1, 24 * 20, dtype=np.float32).reshape(24, 20)]
    arrays[1][0, :3] = [-0.5, 1.5, np.nan]  # out of range: clipped; NaN: black
    for k, array in enumerate(arrays):
        Image.fromarray(array, mode="F").save(folder / f"{k}.tif")
        assert Image.open(folder / f"{k}.tif").mode == "F"
    source = FolderSource(str(tmp_path / "tiffs"), tmp_path / "tiffs")
    for k, array in enumerate(arrays):
        got = np.asarray(source.image(k))
        reference = np.clip(np.round(np.nan_to_num(array.astype(np.float64), nan=0.0) * 255), 0, 255).astype(np.uint8)
        assert got.shape == (24, 20, 3) and got.dtype == np.uint8
        for channel in range(3):
            np.testing.assert_array_equal(got[..., channel], reference)
    assert np.asarray(source.image(0)).mean() > 100  # uniform [0, 1]: mid grey on average, not black

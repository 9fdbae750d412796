import h5py
import numpy as np
import pytest
import torch
import torchvision

from misbench.errors import MisbenchError
from misbench.activations.extract import ExtractSettings, extract
from misbench.activations.hooks import conv_unit_modules
from misbench.models.loading import load_model
from misbench.models.preprocess import build_transform
from misbench.activations.store import open_activations, partial_path


def direct_forward(model, folder, pre, modules):
    """Reference: plain hooks on a plain forward pass, images read with PIL in sorted order."""
    from PIL import Image

    transform = build_transform(pre)
    paths = sorted(p for p in folder.rglob("*.png"))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    outputs = {}
    handles = [dict(model.named_modules())[m].register_forward_hook(
        lambda mod, inp, out, m=m: outputs.__setitem__(m, out.clone())) for m in modules]
    with torch.no_grad():
        logits = model.eval()(x)
    for h in handles:
        h.remove()
    return logits, {m: (o.mean(dim=(2, 3)) if o.dim() == 4 else o) for m, o in outputs.items()}


@pytest.fixture
def googlenet_aux(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=7)
    path = tmp_path / "googlenet_sd.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_googlenet_activations_equal_direct_forward(tmp_path, image_folder, googlenet_aux, dtype, tol):
    loaded = load_model(str(googlenet_aux), arch="googlenet", num_classes=7)
    assert loaded.arch_kwargs["aux_logits"] is True  # inferred from the aux1.* keys
    settings = ExtractSettings(layers=("conv", "softmax", "logits", "inception4a"), dtype=dtype, resize=64, crop=64,
                               batch_size=5)
    out = extract(loaded, str(image_folder), tmp_path / "acts.h5", settings)
    pre = loaded.preprocess.override(64, 64)
    convs = conv_unit_modules(loaded.model)
    assert "inception4a.branch2.1.bn" in convs and "aux1.conv.bn" in convs
    eval_convs = [c for c in convs if not c.startswith("aux")]
    logits, ref = direct_forward(loaded.model, image_folder, pre, eval_convs[:6] + ["inception4a"])
    with open_activations(out) as acts:
        np.testing.assert_allclose(acts.logits, logits.numpy(), rtol=1e-5, atol=1e-5)
        for name in eval_convs[:6] + ["inception4a"]:
            got = acts.activations(name).astype(np.float32)
            np.testing.assert_allclose(got, ref[name].numpy(), rtol=tol, atol=tol)
            assert acts.layer(name).attrs["kind"] == "conv"
        np.testing.assert_allclose(acts.activations("softmax"), torch.softmax(logits, 1).numpy(), atol=tol)
        assert acts.layer("softmax").attrs["n_units"] == 7
        assert "aux1.conv.bn" not in acts.layer_names
        assert bool(acts.attrs["complete"]) and acts.attrs["arch"] == "googlenet"
        stats_max = acts.layer("conv1.bn")["stats/max"][...]
        np.testing.assert_allclose(stats_max, acts.activations("conv1.bn").max(0), rtol=1e-3)


def test_aux_modules_are_refused(tmp_path, image_folder, googlenet_aux):
    loaded = load_model(str(googlenet_aux), arch="googlenet", num_classes=7)
    with pytest.raises(MisbenchError, match="did not run"):
        extract(loaded, str(image_folder), tmp_path / "a.h5", ExtractSettings(layers=("aux1.fc2",), resize=64, crop=64))
    assert not (tmp_path / "a.h5").exists()


def test_resnet18_max_reduction_equals_direct(tmp_path, image_folder):
    torch.manual_seed(1)
    loaded = load_model("resnet18:random", num_classes=3)
    out = extract(loaded, str(image_folder), tmp_path / "r.h5",
                  ExtractSettings(layers=("layer2.0.bn1", "fc"), reduction="max", resize=48, crop=48, batch_size=7))
    from PIL import Image

    transform = build_transform(loaded.preprocess.override(48, 48))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(image_folder.rglob("*.png"))])
    seen = {}
    h = loaded.model.layer2[0].bn1.register_forward_hook(lambda m, i, o: seen.update(x=o.clone()))
    with torch.no_grad():
        logits = loaded.model(x)
    h.remove()
    with open_activations(out) as acts:
        np.testing.assert_allclose(acts.activations("layer2.0.bn1"), seen["x"].amax(dim=(2, 3)).numpy(), atol=1e-5)
        np.testing.assert_allclose(acts.activations("fc"), logits.numpy(), atol=1e-5)
        assert acts.layer("fc").attrs["kind"] == "linear"
        assert list(acts.labels) == [0] * 8 + [1] * 8 + [2] * 8


def _contents(path):
    out = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _same_contents(a, b):
    ca, cb = _contents(a), _contents(b)
    assert ca.keys() == cb.keys()
    for key in ca:
        assert ca[key].dtype == cb[key].dtype, key
        if ca[key].dtype == object:  # variable-length strings
            assert ca[key].tolist() == cb[key].tolist(), key
        else:
            assert ca[key].tobytes() == cb[key].tobytes(), key


class Stop(Exception):
    pass


def interrupted_extract(loaded, folder, target, settings, after: int):
    """An extraction stopped (as by Ctrl-C) once `after` images are done."""
    def interrupt(done, total):
        if done >= after:
            raise Stop

    with pytest.raises(Stop):
        extract(loaded, str(folder), target, settings, progress=interrupt)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, image_folder):
    torch.manual_seed(0)
    loaded = load_model("mini_inception", num_classes=3)
    settings = ExtractSettings(layers=("conv", "softmax"), batch_size=5, resize=32, crop=32)
    full = extract(loaded, str(image_folder), tmp_path / "full.h5", settings)

    target = tmp_path / "resumed.h5"
    interrupted_extract(loaded, image_folder, target, settings, after=10)
    assert not target.exists() and partial_path(target).exists()
    with pytest.raises(MisbenchError, match="--resume"):
        open_activations(target)
    with h5py.File(partial_path(target), "r") as h5:
        assert not h5.attrs["complete"] and h5.attrs["rows_written"] == 10
    with pytest.raises(MisbenchError, match="pass resume=True to continue it or overwrite=True"):  # Python's words
        extract(loaded, str(image_folder), target, settings)
    with pytest.raises(MisbenchError, match="cannot resume"):
        extract(loaded, str(image_folder), target, ExtractSettings(layers=("softmax",), batch_size=5, resize=32, crop=32),
                resume=True)
    extract(loaded, str(image_folder), target, settings, resume=True)
    _same_contents(full, target)


def test_worker_count_does_not_change_output(tmp_path, image_folder):
    loaded = load_model("mini_inception", num_classes=3)
    a = extract(loaded, str(image_folder), tmp_path / "w0.h5",
                ExtractSettings(layers=("conv1.bn",), workers=0, batch_size=4, resize=32, crop=32))
    b = extract(loaded, str(image_folder), tmp_path / "w2.h5",
                ExtractSettings(layers=("conv1.bn",), workers=2, batch_size=4, resize=32, crop=32))
    _same_contents(a, b)


def test_limit_and_overwrite_keep_old_file_until_done(tmp_path, image_folder):
    loaded = load_model("mini_inception", num_classes=3)
    out = extract(loaded, str(image_folder), tmp_path / "a.h5", ExtractSettings(layers=("softmax",), limit=5, resize=32, crop=32))
    with open_activations(out) as acts:
        assert acts.n_rows == 5 and list(acts.index) == [0, 1, 2, 3, 4]
    with pytest.raises(MisbenchError, match="already exists"):
        extract(loaded, str(image_folder), out, ExtractSettings(layers=("softmax",), resize=32, crop=32))
    with pytest.raises(MisbenchError, match="unknown layer"):
        extract(loaded, str(image_folder), out, ExtractSettings(layers=("sofmax",)), overwrite=True)
    with open_activations(out) as acts:
        assert acts.n_rows == 5  # the failed overwrite left the old file alone


def test_unknown_layer_lists_close_matches(tmp_path, image_folder):
    loaded = load_model("mini_inception", num_classes=3)
    with pytest.raises(MisbenchError) as err:
        extract(loaded, str(image_folder), tmp_path / "a.h5", ExtractSettings(layers=("inception3a.branch2.1.bnn",)))
    assert "inception3a.branch2.1.bn" in str(err.value) and "Close matches" in str(err.value)
    assert not partial_path(tmp_path / "a.h5").exists()


def test_corrupt_image_fails_with_path_or_is_skipped(tmp_path, image_folder):
    bad = image_folder / "class_01" / "img_002.png"
    bad.write_bytes(b"not a png")
    loaded = load_model("mini_inception", num_classes=3)
    settings = ExtractSettings(layers=("softmax",), batch_size=4, resize=32, crop=32)
    with pytest.raises(MisbenchError) as err:
        extract(loaded, str(image_folder), tmp_path / "a.h5", settings)
    assert "class_01/img_002.png" in str(err.value) and "--on-bad-image skip" in str(err.value)
    assert not (tmp_path / "a.h5").exists()
    out = extract(loaded, str(image_folder), tmp_path / "b.h5",
                  ExtractSettings(layers=("softmax",), batch_size=4, resize=32, crop=32, on_bad_image="skip"))
    with open_activations(out) as acts:
        assert acts.n_rows == 23 and 10 not in list(acts.index)
        assert "class_01/img_002.png" not in acts.paths
        assert "class_01/img_002.png" in acts.attrs["skipped_paths"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_activations_are_refused_with_layer_unit_and_image(tmp_path, image_folder, dtype):
    loaded = load_model("mini_inception", num_classes=3)
    bn = dict(loaded.model.named_modules())["conv1.bn"]
    with torch.no_grad():
        bn.bias[2] = float("nan")  # a damaged checkpoint: channel 2 is NaN for every image
    out = tmp_path / "a.h5"
    with pytest.raises(MisbenchError) as err:
        extract(loaded, str(image_folder), out, ExtractSettings(layers=("conv1.bn", "softmax"), resize=32, crop=32,
                                                                 batch_size=4, dtype=dtype))
    first = sorted(str(p.relative_to(image_folder)) for p in image_folder.rglob("*.png"))[0]
    assert "layer conv1.bn unit 2" in str(err.value) and first in str(err.value) and "nan" in str(err.value)
    assert not out.exists()


def test_missing_directory_is_a_clear_error(tmp_path):
    loaded = load_model("mini_inception", num_classes=3)
    with pytest.raises(MisbenchError, match="neither an existing directory"):
        extract(loaded, str(tmp_path / "nope"), tmp_path / "a.h5", ExtractSettings(layers=("softmax",)))


@pytest.mark.parametrize("commit_seconds", [0.0, 3600.0])
def test_topk_extraction_resumes_to_the_same_file(tmp_path, image_folder, monkeypatch, commit_seconds):
    import misbench.activations.store

    monkeypatch.setattr(misbench.activations.store, "TOPK_COMMIT_SECONDS", commit_seconds)  # every batch / never mid-run
    torch.manual_seed(0)
    loaded = load_model("mini_inception", num_classes=3)
    settings = ExtractSettings(layers=("conv1.bn", "softmax"), batch_size=5, keep="topk:6")
    full = extract(loaded, str(image_folder), tmp_path / "full.h5", settings)

    target = tmp_path / "resumed.h5"
    interrupted_extract(loaded, image_folder, target, settings, after=15)
    with h5py.File(partial_path(target), "r") as h5:
        assert h5.attrs["rows_written"] == (15 if commit_seconds == 0 else 0)
    extract(loaded, str(image_folder), target, settings, resume=True)
    _same_contents(full, target)


@pytest.mark.parametrize("keep", [None, "topk:5"])
def test_class_units_are_float32_whatever_dtype(tmp_path, image_folder, keep):
    loaded = load_model("mini_inception", num_classes=3)
    out = extract(loaded, str(image_folder), tmp_path / "a.h5",
                  ExtractSettings(layers=("inception3a.branch1.bn", "softmax", "logits"), dtype="float16", keep=keep))
    logits, feats = direct_forward(loaded.model, image_folder, loaded.preprocess, ["inception3a.branch1.bn"])
    softmax = torch.softmax(logits, 1).numpy()
    with h5py.File(out) as h5:
        field = "activations" if keep is None else "top_value"
        assert h5["layers/softmax"][field].dtype == np.float32 and h5["layers/logits"][field].dtype == np.float32
        assert h5["layers/inception3a.branch1.bn"][field].dtype == np.float16  # other layers follow --dtype
        if keep is None:
            # float32 values equal the direct forward pass to float32 precision (float16 would be off by 1e-4)
            np.testing.assert_allclose(h5["layers/softmax/activations"][...], softmax, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(h5["layers/logits/activations"][...], logits.numpy(), rtol=1e-5, atol=1e-6)
        else:
            top = np.sort(softmax, axis=0)[::-1][:5].T  # [units, K] highest first
            np.testing.assert_allclose(h5["layers/softmax/top_value"][...], top, rtol=1e-5, atol=1e-7)

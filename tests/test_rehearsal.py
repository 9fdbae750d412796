"""The seed study's real path, rehearsed with files laid out exactly as the real ones.

Pretrained weights cannot be downloaded here, so a fixture writes random-weight files with
torchvision's exact state_dict layout (each architecture built with the arguments torchvision's
builder uses for its ImageNet weights) under the name torchvision's weights URL gives them, in a
temporary TORCH_HOME. torchvision's own `get_model(name, weights=W)` is the reference.
"""

import json
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image

from conftest import trust_standins

from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.models.loading import load_model

# The architectures the docs name (docs/installation.md "Which weight files misbench expects where").
FAST_ARCHS = ["googlenet", "mobilenet_v2", "resnet18", "squeezenet1_1", "efficientnet_b0"]
SLOW_ARCHS = ["inception_v3", "alexnet", "vgg16", "resnext50_32x4d"]
# The builder arguments torchvision uses for its ImageNet weights beyond num_classes
# (torchvision/models/googlenet.py, inception.py): the real files hold the aux heads.
WEIGHT_BUILD_ARGS = {
    "googlenet": {"aux_logits": True, "transform_input": True, "init_weights": False},
    "inception_v3": {"aux_logits": True, "transform_input": True, "init_weights": False},
}
REPO = Path(__file__).resolve().parents[1]


def imagenet_weights(arch):
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1


def hub_file(torch_home: Path, weights) -> Path:
    return torch_home / "hub" / "checkpoints" / Path(weights.url).name


def write_random_weights(torch_home: Path, arch: str, seed: int = 0) -> Path:
    """A random-weight file in torchvision's layout for `arch`'s IMAGENET1K_V1 weights.

    Weights are He-normal (a signal survives all layers, as in a trained network: class outputs vary
    from image to image); BatchNorm statistics and affine parameters are randomised too, so a model
    that ignored them (or the input transform) would not pass for the real thing.
    """
    weights = imagenet_weights(arch)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=len(weights.meta["categories"]),
                                         **WEIGHT_BUILD_ARGS.get(arch, {}))
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    classifier = [k for k, v in state.items() if v.dim() >= 2][-1]
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if value.dim() >= 2:
            # a smaller classifier keeps the softmax unsaturated, so every class unit varies
            gain = 0.1 if key == classifier else 1.0
            value.copy_(torch.randn(value.shape, generator=g) * gain * (2 / value[0].numel()) ** 0.5)
        elif key.endswith("running_var") or key.endswith(".weight"):
            value.copy_(0.5 + torch.rand(value.shape, generator=g))
        elif key.endswith(("running_mean", "bias")):
            value.copy_(0.1 * torch.randn(value.shape, generator=g))
    path = hub_file(torch_home, weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


class Poison:
    """Unpickling this runs open(marker, 'w'): proof that a file's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_poisoned(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features.0.weight": torch.zeros(1), "payload": Poison(marker)}, path)
    return path


@pytest.fixture(scope="session")
def staged_home(tmp_path_factory):
    """A TORCH_HOME holding random-weight files of the fast architectures; others staged on demand."""
    home = tmp_path_factory.mktemp("torch_home")
    for arch in FAST_ARCHS:
        write_random_weights(home, arch)
    return home


@pytest.fixture
def torch_home(staged_home, monkeypatch):
    trust_standins(monkeypatch, staged_home)  # random stand-ins under torchvision's file names
    return staged_home


@pytest.mark.parametrize("arch", FAST_ARCHS + [pytest.param(a, marks=pytest.mark.slow) for a in SLOW_ARCHS])
def test_misbench_forward_equals_torchvision(arch, torch_home, monkeypatch):
    weights = imagenet_weights(arch)
    path = hub_file(torch_home, weights)
    if not path.exists():
        write_random_weights(torch_home, arch)
        trust_standins(monkeypatch, torch_home)  # the stand-in staged just now
    loaded = load_model(f"{arch}:IMAGENET1K_V1")
    reference = torchvision.models.get_model(arch, weights=weights).eval()  # torchvision's own loader
    size = weights.transforms().crop_size[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, theirs = loaded.model.eval()(x), reference(x)
    assert torch.equal(ours, theirs)
    assert ours.std() > 0  # random BN statistics: a live network, not a constant
    t = weights.transforms()
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (t.resize_size[0], t.crop_size[0])
    assert loaded.num_classes == len(weights.meta["categories"]) and loaded.categories == weights.meta["categories"]
    from misbench.runtime.fileio import sha256_file

    assert loaded.sha256 == sha256_file(path)


def test_googlenet_transform_input_is_recorded_and_overridable(torch_home, tmp_path, image_folder):
    weights = imagenet_weights("googlenet")
    default = load_model("googlenet:IMAGENET1K_V1")
    assert default.arch_kwargs == {"aux_logits": False, "transform_input": True}
    off = load_model("googlenet:IMAGENET1K_V1", arch_kwargs={"transform_input": False})
    assert off.arch_kwargs["transform_input"] is False
    reference_off = torchvision.models.get_model("googlenet", weights=weights, transform_input=False).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(off.model.eval()(x), reference_off(x))
        assert not torch.allclose(off.model(x), default.model.eval()(x))  # the flag changes the numbers
    # stored in the activation file and in checkpoints, and rebuilt from them
    from misbench.activations.extract import ExtractSettings, extract
    from misbench.pruning import PruneSettings
    from misbench.pruning.run import produce_checkpoint
    from misbench.pruning.training import TrainSettings

    acts = extract(default, str(image_folder), tmp_path / "a.h5",
                   ExtractSettings(layers=("logits",), crop=64, resize=64, labels="folder-order"))
    with h5py.File(acts) as h5:
        assert json.loads(h5.attrs["arch_kwargs"]) == {"aux_logits": False, "transform_input": True}
    ckpt = produce_checkpoint(default, PruneSettings("connection", 0.2), TrainSettings(), tmp_path / "c.pt")
    record = torch.load(ckpt, weights_only=True)
    assert record["arch_kwargs"] == {"aux_logits": False, "transform_input": True}
    reloaded = load_model(str(ckpt))
    assert reloaded.model.transform_input is True and reloaded.model.aux1 is None


def test_model_names_need_weights_or_random(torch_home, tmp_path, image_folder):
    with pytest.raises(MisbenchError) as err:
        load_model("resnet18")
    assert "resnet18:random" in str(err.value) and "IMAGENET1K_V1" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    random_net = load_model("resnet18:random", num_classes=7)
    assert random_net.num_classes == 7 and random_net.model.fc.out_features == 7
    with pytest.raises(MisbenchError, match="no pretrained weights"):
        load_model("mini_inception:IMAGENET1K_V1")
    r = CliRunner().invoke(cli, ["eval", "googlenet", "--data", str(image_folder), "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 1 and "googlenet:random" in r.output and "Traceback" not in r.output


POISON_CASES = {
    "extract": lambda: load_model("mobilenet_v2:IMAGENET1K_V1"),
    "deepfeat": lambda: __import__("misbench.similarity", fromlist=["build_backend"]).build_backend(
        "deepfeat:mobilenet_v2", image_size=32),
    "lpips-alex": lambda: __import__("misbench.similarity", fromlist=["build_backend"]).build_backend(
        "lpips-alex", image_size=32),
}


@pytest.mark.parametrize("case", list(POISON_CASES))
def test_poisoned_hub_file_is_refused_and_never_runs(case, tmp_path, monkeypatch):
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    arch = "alexnet" if case == "lpips-alex" else "mobilenet_v2"
    marker = tmp_path / "code-ran"
    path = write_poisoned(hub_file(home, imagenet_weights(arch)), marker)
    with pytest.raises(Exception) as err:
        POISON_CASES[case]()
    assert not marker.exists()  # the file's code never ran
    text = str(err.value)
    assert err.type is MisbenchError and str(path) in text and "refuses" in text and len(text.splitlines()) == 1
    torch.load(path, weights_only=False)  # the reference: a plain unpickler does run the file's code
    assert marker.exists()


def test_poisoned_file_cli_extract_is_one_line(tmp_path, monkeypatch, image_folder):
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    marker = tmp_path / "code-ran"
    write_poisoned(hub_file(home, imagenet_weights("googlenet")), marker)
    # folder-order: the class folders pass the labels check (made before the model loads), so the weights are read
    r = CliRunner().invoke(cli, ["extract", "googlenet:IMAGENET1K_V1", "--data", str(image_folder), "--layers",
                                 "softmax", "--labels", "folder-order", "--out", str(tmp_path / "a.h5")])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "googlenet-1378be20.pth" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not marker.exists() and not (tmp_path / "a.h5").exists()


# -- the study: data/googlenet_imagenet.toml itself on an ImageNet-shaped tree ------------------------------------

WNIDS = ["n01440764", "n02102040", "n03028079", "n09999999"]  # the last is not an ImageNet class


def make_imagenet_tree(root: Path, wnids, train_per_class: int, val_per_class: int, size: int = 48):
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(wnids):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, 3)
            for i in range(per_class):
                img = np.clip(base + rng.integers(-80, 80, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{wnid}_{i:05d}.JPEG", quality=90)
    return root / "train", root / "val"


def seed_config(train, val, overrides: dict) -> dict:
    """data/googlenet_imagenet.toml itself, its ImageNet paths set, with `overrides` (SECTION.KEY -> value)."""
    given = tomllib.loads((REPO / "data" / "googlenet_imagenet.toml").read_text())
    given["data"]["train"], given["data"]["val"] = str(train), str(val)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        given.setdefault(section, {})[key] = value
    return given


def check_study(out: Path, val: Path, wnids):
    from misbench.datasets.labels import imagenet_wnids

    index = {w: k for k, w in enumerate(imagenet_wnids())}
    runs = sorted((out / "runs").iterdir())
    assert len(runs) >= 2
    for run in runs:
        with h5py.File(run / "acts.h5") as h5:
            assert h5["layers/softmax/activations"].dtype == np.float32  # the config says float16
            conv = [n for n in h5["layers"] if h5["layers"][n].attrs["kind"] == "conv"]
            assert conv and all(h5["layers"][n]["activations"].dtype == np.float16 for n in conv)
            paths = [p.decode() for p in h5["images/path"][...]]
            labels = h5["images/label"][...]
            assert [index[p.split("/")[0]] for p in paths] == labels.tolist()  # labels follow the WNIDs
            assert h5.attrs["label_mapping"] == "wnid"
            softmax = h5["layers/softmax/activations"][...]
            logits = h5["outputs/logits"][...]
            assert np.allclose(softmax, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-6)
        per_class = json.loads((run / "eval.json").read_text())["per_class"]
        names = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.meta["categories"]
        assert set() < {r["class"] for r in per_class if r["n"]} <= {index[w] for w in wnids}
        assert per_class[0]["name"] == names[0] == "tench"
        scored = (run / "mis.csv").read_text().splitlines()
        assert scored[0].startswith("layer,unit,status,mis") and any(l.startswith("softmax,") for l in scored[1:])
    assert (out / "report" / "report.html").exists() and (out / "manifest.json").exists()
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert "correlation_rate_mis_confidence" in summary


def _run_seed_study(tmp_path, monkeypatch, staged_home, overrides, per_class=134):
    from misbench.studies.run import run_study
    from misbench.studies.config import parse_config

    trust_standins(monkeypatch, staged_home)  # random stand-ins under torchvision's file names
    wnids = WNIDS[:3]
    train, val = make_imagenet_tree(tmp_path / "imagenet", wnids, 4, per_class)
    config = parse_config(seed_config(train, val, overrides), "googlenet_imagenet.toml+overrides")
    result = run_study(config, tmp_path / "study")
    check_study(tmp_path / "study", val, wnids)
    return config, result


def test_seed_study_config_runs_end_to_end_reduced(tmp_path, monkeypatch, staged_home):
    """The default-suite rehearsal: the seed config with a one-cell grid, no retraining, 64 px crops,
    5 tasks of 4 explanations (60 images suffice), pixel similarity."""
    config, result = _run_seed_study(tmp_path, monkeypatch, staged_home, {
        "retrain.epochs": 0, "retrain.val_limit": 6, "extract.limit": 60, "extract.crop": 64, "extract.resize": 64,
        "score.similarity": "pixel", "score.image_size": 16, "score.n_boot": 50, "score.tasks": 5,
        "score.explanations": 4, "score.layers": ["softmax", "inception5b.branch1.bn"],
        "pruning.methods": ["connection"], "pruning.rates": [0.6], "pruning.schedules": ["oneshot"],
        "pruning.optimizers": ["sgd"], "runtime.workers": 0}, per_class=20)
    assert config["model"]["spec"] == "googlenet:IMAGENET1K_V1" and config["extract"]["dtype"] == "float16"
    names = list(result["ran"])
    assert "prune:connection-l1-0.6-oneshot" in names and "report" in names
    assert {n.partition(":")[0] for n in names} == {"prune", "eval", "extract", "score", "report"}
    from misbench.pruning.audit import audit

    pruned = load_model(str(tmp_path / "study" / "runs" / "connection-l1-0.6-oneshot" / "model.pt"))
    report = audit(pruned)
    assert report["consistent"] is True and report["empty_layers"] == []


@pytest.mark.slow
def test_seed_study_config_runs_end_to_end_full(tmp_path, monkeypatch, staged_home):
    """The whole grid of data/googlenet_imagenet.toml; only epochs, image counts and similarity changed."""
    config, result = _run_seed_study(tmp_path, monkeypatch, staged_home, {
        "retrain.epochs": 1, "retrain.train_limit": 4, "retrain.val_limit": 12, "extract.limit": 402,
        "score.similarity": "pixel"})
    assert len(config.runs()) == 1 + 1 + 3 * 4 * 2 * 2 + 3 * 4  # base, control, grid, not retrained


def test_output_that_is_the_models_hub_weights_file_is_refused(torch_home, tmp_path, image_folder):
    """`extract googlenet:IMAGENET1K_V1 --out $TORCH_HOME/hub/checkpoints/googlenet-...pth --overwrite` must not
    destroy the weights file the model was read from (the MODEL is a name, its input is the hub file)."""
    from misbench.runtime.fileio import sha256_file

    target = hub_file(torch_home, imagenet_weights("googlenet"))
    before = sha256_file(target)
    result = CliRunner().invoke(cli, ["extract", "googlenet:IMAGENET1K_V1", "--data", str(image_folder),
                                      "--layers", "softmax", "--out", str(target), "--overwrite",
                                      "--labels", "folder-order", "--resize", "32", "--crop", "32"])
    assert result.exit_code == 1 and "--out" in result.output and str(target) in result.output
    assert sha256_file(target) == before

"""[dictionary] as a grid (issue 24 items 2, 8): the ResNet-50 recipe's dry run, its grid and its pairs."""

from pathlib import Path

import torchvision
from click.testing import CliRunner

from misbench.cli.main import cli
from misbench.models.loading import model_input_file
from misbench.studies.config import load_config
from misbench.studies.dictionaries import dictionary_grid
from misbench.studies.run import Study

RECIPE = Path(__file__).resolve().parents[1] / "data" / "dictionaries_resnet50.toml"


def test_resnet50_recipe_dry_run_covers_every_block(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no staged weights here, whatever the machine has
    res = CliRunner().invoke(cli, ["study", str(RECIPE), "--out", str(tmp_path / "out"), "--dry-run"])
    # as shipped (no ImageNet, no weights): the whole plan, then one error per missing input, exit 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert res.exit_code == 1 and [e.split(":")[1] for e in errors] == [
        " config [data] train", " config [data] val", " config [model] spec", " config [score] similarity"], res.output
    weights = [Path(model_input_file(m)) for m in ("resnet50:IMAGENET1K_V2", "alexnet:IMAGENET1K_V1")]
    assert all(tmp_path in w.parents for w in weights), weights
    assert "/data/imagenet/train is not a folder" in errors[0] and weights[0].name in errors[2] \
        and weights[1].name in errors[3] and "GPU hours: unknown" in res.stdout
    # with the ImageNet folders and the weight files in place (stand-ins: a dry run only checks they are there),
    # it exits 0 with the same plan and an estimate at reproducing.md's rates
    text = RECIPE.read_text()
    for split, n in (("train", 6), ("val", 4)):
        for i in range(n):
            image = tmp_path / "imagenet" / split / f"n0{i % 2}" / f"{i}.JPEG"
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"")
        text = text.replace(f'"/data/imagenet/{split}"', f'"{tmp_path / "imagenet" / split}"')
    for file in weights:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"")
    (tmp_path / "recipe.toml").write_text(text)
    ok = CliRunner().invoke(cli, ["study", str(tmp_path / "recipe.toml"), "--out", str(tmp_path / "out"), "--dry-run"])
    assert ok.exit_code == 0 and "Error" not in ok.output, ok.output
    assert ok.stdout.splitlines()[:-1] == res.stdout.splitlines()[:-1]
    assert "1 networks, 9 steps (9 to run, 0 cached); about " in ok.stdout and "6 training, 4 validation images" in ok.stdout
    for step in ("extract:dictionary-train", "dictionary", "extract:dictionary", "controls:dictionary",
                 "score:dictionary", "report"):
        assert f"run     {step}" in ok.output
    config = load_config(RECIPE)
    modules = dict(torchvision.models.resnet50(weights=None).named_modules())
    blocks = [n for n, m in modules.items() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    plans = dictionary_grid(config["dictionary"], 0)
    assert sorted({p.layer for p in plans}) == sorted(blocks) and len(blocks) == 16
    assert len(plans) == 16 * 3 * 2  # widths 1x, 4x, 16x; k 8 and 32
    for p in plans:  # every dictionary fits its block: k at most its width, named uniquely, with its controls
        units = modules[p.layer].conv3.out_channels
        assert p.settings.width(units) == round(p.settings.expansion * units) >= p.settings.k
        assert p.untrained == f"{p.name}_untrained"
    assert len({p.name for p in plans}) == len(plans)
    study = Study(config, tmp_path / "out")
    pairs = study.dictionary_pairs()
    assert len(pairs) == 3 * len(plans) and pairs[0] == "topk x1 k8:layer1.0=layer1_0_topk_x1_k8"
    assert "topk x1 k8 permuted:layer1.0=layer1_0_topk_x1_k8_permuted" in pairs
    extract = next(s for s in study.steps if s.name == "extract:dictionary")
    assert len(extract.settings["features"]) == 2 * len(plans) and extract.settings["layers"] == blocks
    score = next(s for s in study.steps if s.name == "score:dictionary")
    assert score.inputs["acts"].name == "acts_controls.h5" and config["score"]["metrics"] == ["mis", "ms"]


def _tiny_grid_config(tmp_path, **dictionary):
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=16)
    d = {"layers": ["inception3a", "inception4a"], "expansions": [1.0], "k": 4, **dictionary}
    return {"model": {"arch": "mini_inception", "num_classes": 2, "arch_kwargs": {"width": 8},
                      "preprocess": {"resize": 16, "crop": 16, "mean": [0.5] * 3, "std": [0.5] * 3}},
            "data": {"train": str(folder), "val": str(folder)}, "train": {"epochs": 1},
            "pruning": {"methods": [], "control": False}, "score": {"similarity": "pixel"}, "dictionary": d}


def test_dry_run_refuses_a_grid_the_network_cannot_take(tmp_path):
    """study --dry-run names, per [dictionary] field, a grid layer that is no module, an expansion that gives less
    than one feature and a k above a top-k dictionary's width, against the layers' widths of the network itself."""
    from misbench import api
    from misbench.models.archs import build_arch

    net = build_arch("mini_inception", 2, {"width": 8})
    units = {name: getattr(net, name).out_channels for name in ("inception3a", "inception4a")}
    assert units == {"inception3a": 20, "inception4a": 32}  # the independent reference: the blocks' own widths
    ok = api.study(_tiny_grid_config(tmp_path, ks=[4, 20]), tmp_path / "ok", dry_run=True)
    assert ok["problems"] == []
    bad = api.study(_tiny_grid_config(tmp_path, layers=["inception3a", "inception9z", "inception4a"],
                                      expansions=[0.01, 1.0], ks=[4, 24]), tmp_path / "bad", dry_run=True)
    assert bad["problems"][0].startswith("config [dictionary] layers: 'inception9z' is not a module of "
                                         "mini_inception.") and "`misbench layers MODEL`" in bad["problems"][0]
    expansion = [p for p in bad["problems"] if "expansions:" in p and "inception3a" in p]
    assert expansion == ["config [dictionary] expansions: 0.01 x inception3a's 20 units gives 0.2 features (less "
                         "than one): use expansions of at least 0.05 for this layer"]
    ks = [p for p in bad["problems"] if " ks:" in p]
    # k 24 exceeds 1 x 20 on inception3a only (inception4a has 32 units); 0.01 x 32 = 0.32 is the other expansion
    assert len(ks) == 1 and ks[0].startswith("config [dictionary] ks: k 24 exceeds the 20 features of topk x1 k24 "
                                             "on inception3a (1 x 20 units of inception3a)") and "lower ks" in ks[0]
    assert len(bad["problems"]) == 4 and sum("0.32 features" in p for p in bad["problems"]) == 1
    # train-dictionary itself: an expansion below one feature is refused (it was rounded up to one feature)
    import pytest

    from misbench.activations.dictionary_training import DictionarySettings
    from misbench.errors import MisbenchError

    with pytest.raises(MisbenchError, match=r"--expansion 0.01 x 20 units gives 0.2 features \(less than one\)"):
        DictionarySettings(expansion=0.01, k=1).width(20)
    assert DictionarySettings(expansion=0.05, k=1).width(20) == 1
    # the CLI: the plan, then one line each, exit 1
    folder = tmp_path / "images"
    (tmp_path / "s.toml").write_text(f"""[model]
arch = "mini_inception"
num_classes = 2
arch_kwargs = {{ width = 8 }}
preprocess = {{ resize = 16, crop = 16, mean = [0.5, 0.5, 0.5], std = [0.5, 0.5, 0.5] }}
[data]
train = "{folder}"
val = "{folder}"
[train]
epochs = 1
[pruning]
methods = []
control = false
[score]
similarity = "pixel"
[dictionary]
layers = ["inception3a", "inception4a"]
expansions = [2.0]
ks = [48]
""")
    res = CliRunner().invoke(cli, ["study", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"), "--dry-run"])
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert res.exit_code == 1 and len(errors) == 1 and "k 48 exceeds the 40 features of topk x2 k48 on inception3a" \
        in errors[0], res.output

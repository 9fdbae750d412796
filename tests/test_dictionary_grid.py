"""[dictionary] as a grid (issue 24 items 2, 8): the ResNet-50 recipe's dry run, its grid and its pairs."""

from pathlib import Path

import torchvision
from click.testing import CliRunner

from misbench.cli.main import cli
from misbench.studies.config import load_config
from misbench.studies.dictionaries import dictionary_grid
from misbench.studies.run import Study

RECIPE = Path(__file__).resolve().parents[1] / "data" / "dictionaries_resnet50.toml"


def test_resnet50_recipe_dry_run_covers_every_block(tmp_path):
    res = CliRunner().invoke(cli, ["study", str(RECIPE), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    for step in ("extract:dictionary-train", "dictionary", "extract:dictionary", "controls:dictionary",
                 "score:dictionary", "report"):
        assert f"run     {step}" in res.output
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

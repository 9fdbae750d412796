"""timm models through the optional extra misbench[timm]: the extra's tests run only where timm is installed
(it is not in the dev extra: it brings huggingface_hub, safetensors and their binary dependencies)."""

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_image_folder
from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.activations.extract import ExtractSettings, extract
from misbench.models.loading import load_model
from misbench.activations.store import open_activations
from test_tokens_features import raw_outputs

TINY_VIT = "timm.vit_tiny_patch16_224"


def test_timm_model_without_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(MisbenchError, match=r"timm is not installed: pip install 'misbench\[timm\]'"):
        load_model(f"{TINY_VIT}:random")


def test_timm_vit_mlp_layers_and_token_reduction_equal_manual_hook(tmp_path):
    timm = pytest.importorskip("timm")
    with pytest.raises(MisbenchError, match=r"randomly initialised only .*--arch timm.vit_tiny_patch16_224"):
        load_model(TINY_VIT)  # timm's pretrained weights live on the HF hub, which misbench does not read
    with pytest.raises(MisbenchError, match="unknown timm architecture 'vit_tiny_patch16_22'"):
        load_model("timm.vit_tiny_patch16_22:random")
    torch.manual_seed(0)
    loaded = load_model(f"{TINY_VIT}:random", num_classes=5)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5)
    assert type(loaded.model) is type(reference) and loaded.num_classes == 5
    cfg = timm.models.get_pretrained_cfg("vit_tiny_patch16_224")
    assert loaded.preprocess.crop == cfg.input_size[-1] and loaded.preprocess.mean == tuple(cfg.mean)
    # `mlp` = every timm Mlp's nonlinearity (blocks.i.mlp.act), as `misbench layers` marks them
    mlp = [f"blocks.{i}.mlp.act" for i in range(12)]
    r = CliRunner().invoke(cli, ["layers", f"{TINY_VIT}:random"])
    assert r.exit_code == 0, r.output
    assert [line.split()[0] for line in r.output.splitlines() if line.endswith(" +")] == mlp
    assert all(line.split()[1:3] == ["token", "768"] for line in r.output.splitlines() if line.endswith(" +"))
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    out = extract(loaded, str(folder), tmp_path / "acts.h5",
                  ExtractSettings(layers=("mlp",), token_reduction="cls", labels="folder-order", batch_size=4))
    ref = raw_outputs(loaded.model, folder, loaded.preprocess, [mlp[0], mlp[-1]])
    with open_activations(out) as acts:
        assert [n for n in acts.layer_names if n.endswith(".mlp.act")] == mlp
        for name in (mlp[0], mlp[-1]):
            np.testing.assert_allclose(acts.activations(name), ref[name][:, 0], rtol=1e-4, atol=1e-5)
            assert acts.layer(name).attrs["kind"] == "token"

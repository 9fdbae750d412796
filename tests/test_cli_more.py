"""Commands not covered elsewhere: retrain, report layers/curves, assets list; GoogLeNet's aux loss."""


import pytest
import torch
import torchvision
from click.testing import CliRunner

from conftest import make_image_folder
from misbench.models.checkpoint import load_checkpoint_dict
from misbench.cli.main import cli
from misbench.pruning.training import _logits_and_loss


def test_googlenet_aux_heads_weigh_point_three():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=5).train()
    x, y = torch.randn(4, 3, 96, 96), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    logits, loss = _logits_and_loss(model, x, y, 0.3)
    torch.manual_seed(1)
    out = model(x)  # same dropout draws
    ce = torch.nn.functional.cross_entropy
    expected = ce(out.logits, y) + 0.3 * (ce(out.aux_logits1, y) + ce(out.aux_logits2, y))
    torch.testing.assert_close(loss, expected)
    assert torch.equal(logits, out.logits)


def test_retrain_keeps_masks_and_reports_curves_and_layers(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=3, per_class=10, size=16)
    runner = CliRunner()
    common = ["--num-classes", "3", "--data", str(images), "--val-data", str(images), "--batch-size", "10",
              "--resize", "16", "--crop", "16"]
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "r.pt")
    r = runner.invoke(cli, ["prune", str(tmp_path / "r.pt"), "--arch", "resnet18", "--method", "structured", "--rate",
                            "0.5", "--epochs", "1", *common, "--out", str(tmp_path / "s.pt")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["retrain", str(tmp_path / "s.pt"), "--epochs", "2", *common[2:], "--out",
                            str(tmp_path / "s2.pt")])
    assert r.exit_code == 0, r.output
    before, after = load_checkpoint_dict(tmp_path / "s.pt"), load_checkpoint_dict(tmp_path / "s2.pt")
    assert after["pruning"] == before["pruning"] and after["parent"]["sha256"] != ""
    for name, mask in before["masks"].items():
        assert torch.equal(after["masks"][name], mask) and (after["state_dict"][name][~mask] == 0).all()
    assert [h["epoch"] for h in after["training"]["history"]] == [0, 1, 2]
    r = runner.invoke(cli, ["retrain", str(tmp_path / "s.pt"), "--epochs", "0", "--out", str(tmp_path / "x.pt")])
    assert r.exit_code == 1 and "--epochs >= 1" in r.output
    r = runner.invoke(cli, ["report", "curves", str(tmp_path / "s.pt"), str(tmp_path / "s2.pt"), "--out",
                            str(tmp_path / "curves")])
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "curves" / "curves.csv").read_text().splitlines()
    assert rows[0] == "name,epoch,step,val_top1" and len(rows) == 1 + 2 + 3
    # a study names every checkpoint model.pt: two runs stay two curves, named by their folders
    import shutil
    for run, source in (("base", "s.pt"), ("pruned", "s2.pt")):
        (tmp_path / "runs" / run).mkdir(parents=True)
        shutil.copy(tmp_path / source, tmp_path / "runs" / run / "model.pt")
    r = runner.invoke(cli, ["report", "curves", str(tmp_path / "runs" / "base" / "model.pt"),
                            str(tmp_path / "runs" / "pruned" / "model.pt"), "--out", str(tmp_path / "curves2")])
    assert r.exit_code == 0 and "(2 curves)" in r.output, r.output
    same = (tmp_path / "curves2" / "curves.csv").read_text().splitlines()
    assert same == [rows[0]] + [row.replace("s2,", "pruned,", 1).replace("s,", "base,", 1) for row in rows[1:]]
    mis = tmp_path / "mis.csv"
    mis.write_text("layer,unit,status,mis,mis_confidence,mis_ci_low,mis_ci_high,conf_ci_low,conf_ci_high,n_tasks\n"
                   "a,0,ok,1,0.9,,,,,20\na,1,ok,0.5,0.5,,,,,20\na,2,constant,,,,,,,0\nb,0,ok,0.75,0.7,,,,,20\n")
    r = runner.invoke(cli, ["report", "layers", "--scores", str(mis), "--out", str(tmp_path / "layers")])
    assert r.exit_code == 0, r.output
    table = (tmp_path / "layers" / "layers.csv").read_text().splitlines()
    assert table[0].startswith("layer,n_units,n_constant,n_sparse,mis,mis_confidence,")
    assert table[1].startswith("a,2,1,0,0.75,0.7,") and table[2].startswith("b,1,0,0,0.75,0.7,")


def test_assets_list_reports_status(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    r = CliRunner().invoke(cli, ["assets", "list"])
    assert r.exit_code == 0
    assert "missing  mobilenet_v2" in r.output and str(tmp_path / "hub" / "checkpoints") in r.output
    r = CliRunner().invoke(cli, ["assets", "stage", "mobilenet_v2", "--from", str(tmp_path)])
    assert r.exit_code == 1 and "mobilenet_v2-b0353104.pth" in r.output


def test_checkpoint_labels_are_distinct():
    from misbench.errors import MisbenchError
    from misbench.reports.build import checkpoint_labels

    assert checkpoint_labels(["/r/a.pt", "/r/b.pt"]) == ["a", "b"]
    assert checkpoint_labels(["/r/a/model.pt", "/r/b/model.pt", "/r/c.pt"]) == ["a", "b", "c"]
    assert checkpoint_labels(["/x/a/model.pt", "/y/a/model.pt"]) == ["x/a", "y/a"]
    with pytest.raises(MisbenchError, match="given twice"):
        checkpoint_labels(["/r/a.pt", "/r/../r/a.pt"])

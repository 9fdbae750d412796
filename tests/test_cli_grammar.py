"""One CLI grammar: every list option takes `--opt a --opt b` and `--opt a,b` alike."""

import click
import h5py
from click.testing import CliRunner

from misbench.cli.common import ListOption
from misbench.cli.main import cli

# values that hold commas themselves (LAYER:I,J,... of one layer): repeatable only
COMMA_VALUES = {("import-scores", "constant")}


def all_commands(group=cli, prefix=""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from all_commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_repeatable_option_is_a_list_option_with_both_forms():
    checked = 0
    for name, command in all_commands():
        ctx = click.Context(command)
        for param in command.params:
            if not getattr(param, "multiple", False) or (name, param.name) in COMMA_VALUES:
                continue
            assert isinstance(param, ListOption), f"misbench {name} {param.opts[0]} is repeatable but not a list option"
            repeated = param.process_value(ctx, ("a", "b", "c"))
            commas = param.process_value(ctx, ("a,b", " c"))
            assert repeated == commas == ("a", "b", "c"), (name, param.opts)
            checked += 1
    assert checked >= 5  # extract --layers, score --layer, prune --exclude, report classwise --unit, import-scores --drop-type


def test_exclude_absent_empty_and_listed_differ():
    prune = cli.commands["prune"]
    exclude = next(p for p in prune.params if p.name == "exclude")
    ctx = click.Context(prune)
    assert exclude.process_value(ctx, ()) is None          # the architecture's default
    assert exclude.process_value(ctx, ("",)) == ()         # nothing excluded
    assert exclude.process_value(ctx, ("conv1", "fc")) == ("conv1", "fc")


def test_extract_layer_lists_in_both_forms_write_the_same_layers(tmp_path, image_folder):
    import torch

    from misbench.archs import build_arch

    torch.manual_seed(0)
    model = tmp_path / "tiny.pt"
    torch.save(build_arch("tiny_cnn", 3).state_dict(), model)
    runner = CliRunner()
    base = ["extract", str(model), "--arch", "tiny_cnn", "--num-classes", "3", "--data", str(image_folder), "--limit", "4"]
    a = runner.invoke(cli, base + ["--layer", "conv1", "--layer", "softmax", "--out", str(tmp_path / "a.h5")])
    b = runner.invoke(cli, base + ["--layers", "conv1,softmax", "--out", str(tmp_path / "b.h5")])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        assert sorted(fa["layers"]) == sorted(fb["layers"]) == ["conv1", "softmax"]
    r = runner.invoke(cli, base + ["--layers", " , ", "--out", str(tmp_path / "c.h5")])
    assert r.exit_code == 2 and "expected at least one name" in r.output

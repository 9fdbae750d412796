"""One CLI grammar: every list option takes `--opt a --opt b` and `--opt a,b` alike; every command that writes
refuses to overwrite without --overwrite."""

import hashlib

import click
import h5py
import numpy as np
from click.testing import CliRunner

from conftest import write_acts
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

    from misbench.models.archs import build_arch

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


OUTPUT_PARAMS = {"out", "tasks_out", "classwise"}



def test_every_command_with_an_output_has_overwrite():
    writers = {name: command for name, command in all_commands() if OUTPUT_PARAMS & {p.name for p in command.params}}
    assert {"extract", "score", "eval", "prune", "retrain", "report sweep", "report classwise", "report compare",
            "report layers", "report curves", "import-scores", "calibrate", "merge-scores", "train-dictionary",
            "study", "demo"} <= set(writers)
    lacking = [name for name, command in writers.items() if "overwrite" not in {p.name for p in command.params}]
    assert lacking == []


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_writers_refuse_then_replace_with_overwrite(property_folder, tmp_path):
    root, _ = property_folder
    rng = np.random.default_rng(0)
    n = len(list(root.rglob("*.png")))
    acts = write_acts(tmp_path / "acts.h5", root, {"feat": rng.normal(size=(n, 3))})
    runner = CliRunner()
    score = ["score", str(acts), "--layer", "feat", "--similarity", "pixel", "--image-size", "16", "--tasks", "4",
             "--bootstrap", "10", "--out", str(tmp_path / "mis.csv")]
    (tmp_path / "runs.csv").write_text("name,method,rate,mis_confidence\na,none,0,0.7\nb,structured,0.5,0.6\n"
                                       "c,structured,0.8,0.5\n")
    commands = [(score, tmp_path / "mis.csv", "--out"),
                (["eval", "--acts", str(acts), "--out", str(tmp_path / "eval.json")], tmp_path / "eval.json", "--out"),
                (["report", "layers", "--scores", str(tmp_path / "mis.csv"), "--out", str(tmp_path / "layers")],
                 tmp_path / "layers" / "layers.csv", "--out"),
                (["report", "sweep", "--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "sweep")],
                 tmp_path / "sweep" / "sweep.csv", "--out"),
                (["report", "compare", "--scores", f"a={tmp_path / 'mis.csv'},b={tmp_path / 'mis.csv'}", "--n-boot", "10",
                  "--out", str(tmp_path / "compare")], tmp_path / "compare" / "compare.csv", "--out"),
                (["train-dictionary", str(acts), "--layer", "feat", "--n-features", "4", "--k", "1", "--steps", "5",
                  "--out", str(tmp_path / "dict.pt")], tmp_path / "dict.pt", "--out"),
                (["prune", "mini_inception", "--num-classes", "3", "--arch-kwargs", '{"width": 4}', "--method",
                  "structured", "--rate", "0.5", "--out", str(tmp_path / "p.pt")], tmp_path / "p.pt", "--out")]
    for args, target, option in commands:
        first = runner.invoke(cli, args)
        assert first.exit_code == 0, first.output
        before = _sha(target)
        again = runner.invoke(cli, args)
        assert again.exit_code == 1 and option in again.output and "--overwrite" in again.output, again.output
        assert str(target) in again.output and len(again.output.strip().splitlines()) == 1
        assert _sha(target) == before
        replaced = runner.invoke(cli, args + ["--overwrite"])
        assert replaced.exit_code == 0, replaced.output


def test_study_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("data")
    r = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path), "--dry-run"])
    assert r.exit_code == 1 and "manifest.json" in r.output and "--overwrite" in r.output
    assert (tmp_path / "precious.txt").read_text() == "data"
    r = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path), "--dry-run", "--overwrite"])
    assert r.exit_code == 0, r.output


def test_every_listed_option_has_help_text():
    missing = [f"{name} {p.opts[0]}" for name, command in all_commands() for p in command.params
               if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert missing == []


def test_one_name_per_concept_and_old_names_still_work(tmp_path):
    """score --n-boot as report compare's (--bootstrap still works, unlisted); calibrate --tasks-file for the file
    (--tasks is score's count; calibrate --tasks FILE still works, unlisted)."""
    score = cli.commands["score"]
    n_boot = next(p for p in score.params if p.name == "n_boot")
    assert "--n-boot" in n_boot.opts and "--bootstrap" in n_boot.opts
    assert "--n-boot" in next(p.opts for p in cli.commands["report"].commands["compare"].params if p.name == "n_boot")
    help_text = CliRunner().invoke(cli, ["score", "--help"]).output
    assert "--n-boot" in help_text and "--bootstrap" not in help_text
    for flag in ("--n-boot", "--bootstrap"):
        assert score.make_context("score", ["a.h5", "--layer", "l", "--out", "o.csv", flag, "7"]).params["n_boot"] == 7
    calibrate = cli.commands["calibrate"]
    help_text = CliRunner().invoke(cli, ["calibrate", "--help"]).output
    assert "--tasks-file" in help_text and "--tasks " not in help_text
    tasks, responses = tmp_path / "t.h5", tmp_path / "r.csv"
    tasks.touch()
    responses.touch()
    for flag in ("--tasks-file", "--tasks"):
        assert calibrate.make_context("calibrate", [str(responses), flag, str(tasks)]).params["tasks_h5"] == str(tasks)


def test_retrain_epochs_default_is_valid_and_zero_is_a_one_line_error(tmp_path):
    epochs = next(p for p in cli.commands["retrain"].params if p.name == "epochs")
    assert epochs.default == 1 and "after each pruning step" not in epochs.help
    result = CliRunner().invoke(cli, ["retrain", "mini_inception:random", "--epochs", "0", "--out", str(tmp_path / "r.pt")])
    assert result.exit_code == 1 and "retrain needs --epochs >= 1, got 0" in result.output


def test_usage_errors_exit_2_and_other_errors_exit_1_as_documented(tmp_path):
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert "exit with status 1" in docs and "exit with status 2" in docs
    usage = CliRunner().invoke(cli, ["score", "a.h5", "--layer", "l", "--out", "o.csv", "--selection", "best"])
    assert usage.exit_code == 2 and "Usage:" in usage.output
    error = CliRunner().invoke(cli, ["score", str(tmp_path / "none.h5"), "--layer", "l", "--out", "o.csv"])
    assert error.exit_code == 1 and error.output.startswith("Error:")

"""One CLI grammar: every command that writes refuses to overwrite without --overwrite."""

import hashlib

import click
import numpy as np
from click.testing import CliRunner

from conftest import write_acts
from misbench.cli.main import cli

OUTPUT_PARAMS = {"out", "tasks_out", "classwise"}


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_every_command_with_an_output_has_overwrite():
    writers = {" ".join(path): command for path, command in _commands(cli)
               if OUTPUT_PARAMS & {p.name for p in command.params}}
    assert {"extract", "score", "eval", "prune", "retrain", "report sweep", "report classwise", "import-scores",
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
                 tmp_path / "sweep" / "sweep.csv", "--out")]
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

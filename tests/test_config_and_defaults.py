"""Config files validated with types; documented defaults agree between --help, the settings dataclasses, the
study config and docs/cli.md."""

import dataclasses
import re
import typing
from pathlib import Path

import click
import pytest

from misbench.cli.main import cli
from misbench.errors import MisbenchError
from misbench.activations.dictionary_training import DictionarySettings
from misbench.activations.extract import ExtractSettings
from misbench.pruning import PruneSettings
from misbench.scoring.run import ScoreSettings
from misbench.studies.config import SCHEMAS, SECTIONS, RetrainSection, parse_config
from misbench.pruning.training import TrainSettings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
BASE = {"model": {"spec": "m.pt"}, "data": {"val": "val", "train": "train"}}

# (command, settings dataclass, study config section)
PAIRS = [("extract", ExtractSettings, "extract"), ("score", ScoreSettings, "score"), ("prune", PruneSettings, "pruning"),
         ("prune", TrainSettings, "retrain"), ("retrain", RetrainSection, "retrain"),
         ("train-dictionary", DictionarySettings, "dictionary")]
# defaults that differ on purpose, and why
ON_PURPOSE = {
    ("retrain", "epochs"): "a study retrains (1 epoch); `prune` alone prunes without retraining (0)",
    ("pruning", "steps"): "--steps unset means 4 for the iterative schedule and 1 for one-shot (the config's 4)",
    ("dataclass", "workers"): "the CLI's auto is parsed into the dataclass's None (auto) by --workers' callback",
    ("dataclass", "steps"): "as ('pruning', 'steps')",
}


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _set(value):
    return value not in (None, False) and not isinstance(value, type(click.Option(["--x"]).default))


def test_click_defaults_equal_the_settings_dataclasses_and_the_study_config():
    compared = 0
    for command, settings, section in PAIRS:
        fields = {f.name: f for f in dataclasses.fields(settings)}
        for param in cli.commands[command].params:
            if param.name not in fields or not _set(param.default):
                continue
            if ("dataclass", param.name) not in ON_PURPOSE:
                assert param.default == _default(fields[param.name]), (command, param.name)
                compared += 1
            config = SECTIONS[section].get(param.name)
            if config is not None and (section, param.name) not in ON_PURPOSE and param.name != "layers":
                assert (list(param.default) if isinstance(param.default, tuple) else param.default) == config, \
                    (command, section, param.name)
                compared += 1
    assert compared >= 30


def test_a_new_setting_is_one_field():
    """What docs/contributing.md promises: one field makes a command-line option, a config key with its checks
    and an API keyword with its checks."""
    from misbench.cli.common import settings_options
    from misbench.runtime.schema import check_options, section_defaults, setting

    @dataclasses.dataclass(frozen=True)
    class Extended(ScoreSettings):
        rounds: int = setting(3, low=1, high=9, help="Rounds of something.")

    command = click.command()(settings_options(Extended)(lambda **kw: kw))
    option = {p.name: p for p in command.params}["rounds"]
    assert option.opts == ["--rounds"] and option.default == 3 and option.help == "Rounds of something."
    assert command.main(["--rounds", "5"], standalone_mode=False)["rounds"] == 5
    assert section_defaults(Extended)["rounds"] == 3 and "rounds" not in SECTIONS["score"]
    check_options(Extended, {"rounds": 9}, "score")
    for value, expected in ((0, "must be at least 1, got 0"), (10, "must be at most 9"), ("2", "expected an integer")):
        with pytest.raises(MisbenchError, match=expected):
            check_options(Extended, {"rounds": value}, "score")
    with pytest.raises(MisbenchError, match="rounds: must be at least 1"):
        Extended(rounds=0)


def _doc_row(command: str) -> str:
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith(f"| `misbench {command} ")]
    assert rows, f"docs/cli.md has no row for misbench {command}"
    return rows[0]


@pytest.mark.parametrize("command", ["extract", "score", "prune"])
def test_docs_cli_md_states_the_click_defaults(command):
    """docs/cli.md writes `--option DEFAULT`, or `--option A\\|B` with the default first; placeholders are capitals."""
    by_flag = {opt: p for p in cli.commands[command].params for opt in getattr(p, "opts", [])}
    checked = 0
    for flag, value in re.findall(r"(--[a-z][a-z0-9-]*) ([^\s`|\\-][^\s`|\\]*)", _doc_row(command)):
        param = by_flag.get(flag)
        if param is None or not _set(param.default) or any(c.isupper() for c in value):
            continue
        default = param.default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert float(value) == pytest.approx(float(default)), (command, flag, value, default)
        else:
            assert value == str(default), (command, flag, value, default)
        checked += 1
    assert checked >= 5


def test_every_config_key_is_a_field_with_a_type():
    """The config's sections are the schema's dataclasses: every key has an annotation the checks understand."""
    for section, cls in SCHEMAS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(SECTIONS[section]) <= set(fields), section
        for key in SECTIONS[section]:
            assert isinstance(fields[key].type, type) or typing.get_args(fields[key].type), (section, key)


@pytest.mark.parametrize("section,key,value,expected", [
    ("score", "tasks", 20.0, "an integer"),          # a float for an int key
    ("score", "quantile", "0.2", "a number"),        # a string for a number
    ("retrain", "epochs", "1", "an integer"),
    ("pruning", "control", "yes", "true or false"),
    ("report", "baseline", 3, "a string"),
    ("score", "alpha_from", ["a"], "a string"),
    ("extract", "layers", ["conv", 3], "a string"),  # a list's element
    ("pruning", "rates", [0.5, "0.7"], "a number"),
    ("report", "units", "softmax:1", "a list"),
    ("runtime", "workers", 2.5, '"auto" or an integer'),
])
def test_config_values_of_the_wrong_type_name_key_value_and_type(section, key, value, expected):
    with pytest.raises(MisbenchError) as err:
        parse_config({**BASE, section: {key: value}})
    message = str(err.value)
    bad = value[-1] if isinstance(value, list) else value  # the wrong element is the last one here
    assert f"[{section}] {key}" in message and repr(bad) in message and type(bad).__name__ in message
    assert expected in message and "\n" not in message


def test_well_typed_values_pass_and_ints_count_as_numbers():
    config = parse_config({**BASE, "score": {"quantile": 1, "tasks": 5}, "pruning": {"rates": [0.5, 0.25]},
                           "report": {"baseline": "control", "units": ["softmax:1"]}})
    assert config["score"]["quantile"] == 1 and config["report"]["units"] == ["softmax:1"]


PRE = {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.mark.parametrize("change,expected", [
    ({"resize": "x"}, "preprocess resize: expected a positive integer, got 'x' (str)"),
    ({"crop": 0}, "preprocess crop: expected a positive integer, got 0"),
    ({"mean": [0.5, 0.5]}, "preprocess mean: expected 3 finite numbers"),
    ({"mean": ["a", 0.5, 0.5]}, "preprocess mean: expected 3 finite numbers"),
    ({"std": [0.2, 0.0, 0.2]}, "preprocess std: expected 3 finite numbers (one per RGB channel, each > 0)"),
    ({"foo": 1}, "preprocess: unknown key 'foo'"),
])
def test_model_preprocess_is_checked_before_any_work(change, expected):
    with pytest.raises(MisbenchError) as err:
        parse_config({**BASE, "model": {"spec": "m.pt", "preprocess": {**PRE, **change}}})
    assert str(err.value).startswith("config [model] ") and expected in str(err.value)
    with pytest.raises(MisbenchError, match="crop, mean, std missing"):
        parse_config({**BASE, "model": {"spec": "m.pt", "preprocess": {"resize": 32}}})
    assert parse_config({**BASE, "model": {"spec": "m.pt", "preprocess": PRE}})["model"]["preprocess"] == PRE


@pytest.mark.parametrize("section,key,value", [("pruning", "rates", [0.5, 0.5]),
                                               ("extract", "layers", ["conv", "softmax", "conv"])])
def test_duplicate_list_values_are_refused(section, key, value):
    with pytest.raises(MisbenchError, match=rf"\[{section}\] {key}: .* is listed twice"):
        parse_config({**BASE, section: {key: value}})

"""The study config (TOML): one file names the model, data, pruning grid, retraining, layers, similarity."""

__all__ = ["StudyConfig", "load_config", "parse_config", "RunSpec"]

import copy
import dataclasses
import math
import tomllib
from pathlib import Path

from ..activations.dictionary import parse_features
from ..activations.dictionary_training import DictionarySettings
from ..activations.extract import ExtractSettings
from ..datasets.labels import LABEL_MODES
from ..errors import MisbenchError
from ..models.preprocess import check_preprocess
from ..pruning.masks import CRITERIA, METHODS, SCHEDULES
from ..pruning.training import OPTIMIZERS, TrainSettings
from ..runtime.device import parse_workers
from ..runtime.schema import check_keys, check_value, section_defaults, setting, settings_fields
from ..scoring.settings import ScoreSettings, parse_metrics
from .dictionaries import dictionary_grid, dictionary_layers
from .executor import ExecutorSection, parse_executor

# The study config's sections: each is a dataclass whose fields are its keys (misbench/runtime/schema.py), so
# a key's type, default, bounds and choices are declared once; the settings dataclasses' config fields are
# their sections' keys, a few keys that are not settings added by subclasses.


@dataclasses.dataclass(frozen=True)
class StudySection:
    name: str = "study"
    seed: int = setting(0, low=0)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    spec: str | None = None
    arch: str | None = None
    num_classes: int | None = setting(None, low=1)
    arch_kwargs: dict = dataclasses.field(default_factory=dict)
    preprocess: dict | None = None  # checked by check_preprocess


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str | None = None
    val: str | None = None
    labels: str = setting("auto", choices=LABEL_MODES)


@dataclasses.dataclass(frozen=True)
class PruningSection:
    methods: tuple[str, ...] = setting(("unstructured", "structured", "connection"), choices=lambda: METHODS)
    criteria: tuple[str, ...] = setting(("l1",), choices=lambda: CRITERIA)
    rates: tuple[float, ...] = setting((0.2, 0.4, 0.6, 0.8), check=lambda rates: _check_rates(rates))
    schedules: tuple[str, ...] = setting(("oneshot",), choices=SCHEDULES)
    iterative_methods: tuple[str, ...] | None = None
    steps: int = setting(4, low=1)
    control: bool = True
    not_retrained: bool = False
    exclude: tuple[str, ...] | None = None
    optimizers: tuple[str, ...] | None = setting(None, choices=OPTIMIZERS)
    random_baseline: bool = False


@dataclasses.dataclass(frozen=True)
class RetrainSection(TrainSettings):
    # a study retrains its pruned networks; `misbench prune` alone does not (TrainSettings' 0)
    epochs: int = setting(1, low=0)


@dataclasses.dataclass(frozen=True)
class ExtractSection(ExtractSettings):
    data: str | None = None  # default: [data] val


@dataclasses.dataclass(frozen=True)
class ScoreSection(ScoreSettings):
    alpha_from: str | None = None
    layers: tuple[str, ...] = ("all",)


# one top-k sparse autoencoder trained during the study on `layer` of the base network (off while layer is
# unset): its features are extracted and scored, and the report compares them with the layer's neurons.
# The recipe's keys are DictionarySettings' (n_features, k, steps, lr, batch_size, l1); the seed is the study's.
@dataclasses.dataclass(frozen=True)
class DictionarySection(DictionarySettings):
    layer: str | None = None
    name: str = "dictionary"
    train_limit: int | None = setting(None, low=1)
    # the grid (issue 24): more layers, kinds, widths as multiples of the layer's units, several k;
    # controls: each dictionary's untrained twin and its features permuted across images
    layers: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("topk",)
    expansions: tuple[float, ...] = ()
    ks: tuple[int, ...] = ()
    controls: bool = False
    # training vectors: unset, one reduced vector per training image (from their extraction); N, a uniform sample
    # of at most N per-position vectors (conv positions, tokens) drawn while the training images stream through
    # the base network (train-dictionary --positions)
    positions: int | None = setting(None, low=2)
    # the dictionaries' scoring metrics (e.g. ["mis", "ms"]); unset: [score] metrics
    metrics: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ReportSection:
    units: tuple[str, ...] = ()
    classwise_layer: str = "softmax"
    baseline: str | None = None


@dataclasses.dataclass(frozen=True)
class RuntimeSection:
    device: str = "auto"
    workers: int | str = setting("auto", check=parse_workers, expected='"auto" or an integer')


# [executor]: the Slurm resources of `--executor slurm`, with a table of them per step kind (checked by parse_executor)
SCHEMAS = {"study": StudySection, "model": ModelSection, "train": TrainSettings, "data": DataSection,
           "pruning": PruningSection, "retrain": RetrainSection, "extract": ExtractSection, "score": ScoreSection,
           "dictionary": DictionarySection, "report": ReportSection, "runtime": RuntimeSection,
           "executor": ExecutorSection}
SECTIONS = {**{name: section_defaults(cls) for name, cls in SCHEMAS.items()}, "quick": {}}


def _check_rates(rates) -> None:
    for rate in rates:
        if not 0 < rate < 1:
            raise MisbenchError(f"{rate!r} is not a fraction in (0, 1)")


def _check_types(raw: dict) -> None:
    for section, cls in SCHEMAS.items():
        for field in settings_fields(cls, "config"):
            check_value(field, raw[section][field.name], f"config [{section}]", toml=True)
    if raw["model"]["preprocess"] is not None:
        check_preprocess(raw["model"]["preprocess"], "config [model] preprocess")
    alpha = raw["score"]["alpha"]
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise MisbenchError(f"config [score] alpha: must be a positive finite number, got {alpha!r}")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One row of the grid: a checkpoint to produce and measure."""

    name: str
    method: str          # unstructured | structured | connection | none | random (untrained weights)
    rate: float
    criterion: str = "l1"
    schedule: str = "oneshot"
    steps: int = 1
    retrained: bool = True
    optimizer: str | None = None  # None: [retrain] optimizer


@dataclasses.dataclass
class StudyConfig:
    raw: dict
    source: str

    def __getitem__(self, section):
        return self.raw[section]

    def executor(self):
        """The [executor] section as ExecutorSettings (checked when the config was parsed)."""
        return parse_executor(self["executor"])

    def runs(self) -> list[RunSpec]:
        p = self["pruning"]
        runs = [RunSpec("base", "none", 0.0, retrained=False)]
        if p["control"] and self["retrain"]["epochs"] > 0:
            runs.append(RunSpec("control", "none", 0.0))
        if p["random_baseline"]:  # the untrained network (the base's initialisation): what MIS gives for free
            runs.append(RunSpec("random", "random", 0.0, retrained=False))
        iterative_for = p["iterative_methods"] if p["iterative_methods"] is not None else p["methods"]
        optimizers = p["optimizers"] or [self["retrain"]["optimizer"]]
        for method in p["methods"]:
            for criterion in p["criteria"]:
                for rate in p["rates"]:
                    for schedule in p["schedules"]:
                        if schedule == "iterative" and method not in iterative_for:
                            continue
                        steps = p["steps"] if schedule == "iterative" else 1
                        tag = f"{method}-{criterion}-{rate:g}-{schedule}"
                        for optimizer in optimizers:
                            name = tag if len(optimizers) == 1 else f"{tag}-{optimizer}"
                            runs.append(RunSpec(name, method, float(rate), criterion, schedule, steps, True, optimizer))
                        if p["not_retrained"] and schedule == "oneshot" and self["retrain"]["epochs"] > 0:
                            runs.append(RunSpec(tag + "-noretrain", method, float(rate), criterion, schedule, 1, False))
        return runs


def _apply_override(raw: dict, dotted: str, value):
    section, _, key = dotted.partition(".")
    if section not in raw or not key:
        raise MisbenchError(f"config [quick]: override {dotted!r} must be SECTION.KEY with a known section")
    check_keys(f"[{section}]", {key: value}, SECTIONS[section])
    raw[section][key] = value


def _check_dictionaries(raw: dict) -> None:
    """[extract] features specs and the [dictionary] section: syntax and sizes, before anything runs."""
    names = []
    for text in raw["extract"]["features"]:
        try:
            names.append(parse_features(text).name)
        except MisbenchError as err:
            raise MisbenchError(f"config [extract] features: {err}") from None
    try:
        parse_metrics(raw["score"]["metrics"])
    except MisbenchError as err:
        raise MisbenchError(f"config [score] metrics: {err}") from None
    d = raw["dictionary"]
    if d["metrics"] is not None:
        try:
            parse_metrics(d["metrics"])
        except MisbenchError as err:
            raise MisbenchError(f"config [dictionary] metrics: {err}") from None
    layers = dictionary_layers(d)
    if not layers:
        return
    for layer in layers:
        if not layer.strip() or "," in layer:
            raise MisbenchError(f"config [dictionary] layer: expected one module name of the network (as "
                                f"`misbench layers` lists them), got {layer!r}")
    if not d["expansions"] and any(k > d["n_features"] for k in (d["ks"] or [d["k"]])):
        raise MisbenchError(f"config [dictionary] k: {max(d['ks'] or [d['k']])} exceeds n_features {d['n_features']} "
                            "(a top-k dictionary keeps k of its features per input)")
    if not (math.isfinite(d["lr"]) and d["lr"] > 0):
        raise MisbenchError(f"config [dictionary] lr: must be a positive finite number, got {d['lr']!r}")
    try:
        plans = dictionary_grid(d, 0)
    except MisbenchError as err:
        raise MisbenchError(f"config [dictionary]: {err}") from None
    made = [p.name for p in plans] + [p.untrained for p in plans if p.untrained]
    if d["name"] in names or d["name"] in layers or not d["name"].strip() or len(set(made)) != len(made) \
            or set(made) & set(names):
        raise MisbenchError(f"config [dictionary] name: {d['name']!r} must be a new, non-empty layer name (not the "
                            f"dictionary's layer nor an [extract] features name)")


def parse_config(given: dict, source: str = "<config>", quick: bool = False) -> StudyConfig:
    check_keys("[top level]", given, SECTIONS)
    raw = {}
    for section, defaults in SECTIONS.items():
        values = given.get(section, {})
        if not isinstance(values, dict):
            raise MisbenchError(f"config [{section}] must be a table")
        if section != "quick":
            check_keys(f"[{section}]", values, defaults)
        raw[section] = {**copy.deepcopy(defaults), **values}
    if quick:
        for dotted, value in raw["quick"].items():
            _apply_override(raw, dotted, value)
    _check_types(raw)
    if not raw["model"]["spec"] and not raw["model"]["arch"]:
        raise MisbenchError("config [model]: give spec (a MODEL string) or arch (with num_classes and [train])")
    if not raw["data"]["val"]:
        raise MisbenchError("config [data]: val is required (the data to evaluate and extract on)")
    if (raw["train"]["epochs"] > 0 or raw["retrain"]["epochs"] > 0) and not raw["data"]["train"]:
        raise MisbenchError("config [data]: train is required when [train] or [retrain] has epochs > 0")
    if raw["model"]["arch"] and not raw["model"]["spec"] and raw["train"]["epochs"] < 1:
        raise MisbenchError("config [model]: a model built from arch needs [train] epochs >= 1 (or give spec)")
    _check_dictionaries(raw)
    parse_executor(raw["executor"])
    return StudyConfig(raw, source)


def load_config(path, quick: bool = False) -> StudyConfig:
    path = Path(path)
    try:
        given = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MisbenchError(f"config {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise MisbenchError(f"config {path} is not valid TOML: {err}") from None
    return parse_config(given, str(path), quick)

"""The study config (TOML): one file names the model, data, pruning grid, retraining, layers, similarity."""

__all__ = ["StudyConfig", "load_config", "parse_config", "RunSpec"]

import copy
import dataclasses
import math
import tomllib
from pathlib import Path

from ..activations.dictionary import parse_features
from ..activations.tokens import TOKEN_REDUCTIONS
from ..datasets.labels import LABEL_MODES
from ..errors import MisbenchError
from ..models.preprocess import check_preprocess
from ..pruning.masks import CRITERIA, METHODS, SCHEDULES
from ..runtime.device import parse_workers
from ..scoring.mis import SELECTIONS
from ..scoring.settings import parse_metrics
from ..similarity import BACKENDS, backend_names
from .dictionaries import dictionary_grid, dictionary_layers
from .executor import EXECUTOR_SECTION, parse_executor

SECTIONS = {
    "study": {"name": "study", "seed": 0},
    "model": {"spec": None, "arch": None, "num_classes": None, "arch_kwargs": {}, "preprocess": None},
    "train": {"epochs": 0, "optimizer": "sgd", "lr": None, "momentum": 0.9, "weight_decay": 1e-4, "gamma": 0.9,
              "batch_size": 64, "train_limit": None, "val_limit": None},
    "data": {"train": None, "val": None, "labels": "auto"},
    "pruning": {"methods": ["unstructured", "structured", "connection"], "criteria": ["l1"], "rates": [0.2, 0.4, 0.6, 0.8],
                "schedules": ["oneshot"], "iterative_methods": None, "steps": 4, "control": True, "not_retrained": False,
                "exclude": None, "optimizers": None, "random_baseline": False},
    "retrain": {"epochs": 1, "optimizer": "sgd", "lr": None, "momentum": 0.9, "weight_decay": 1e-4, "gamma": 0.9,
                "batch_size": 64, "train_limit": None, "val_limit": None},
    "extract": {"layers": ["conv", "softmax"], "data": None, "limit": None, "batch_size": 64, "dtype": "float32",
                "reduction": "mean", "token_reduction": "mean", "features": [], "resize": None, "crop": None},
    "score": {"similarity": "lpips-alex", "image_size": None, "view": "model", "selection": "fair", "quantile": 0.2,
              "class_quantile": None, "tasks": 20, "explanations": 9, "alpha": None, "alpha_from": None,
              "layers": ["all"], "n_boot": 1000, "batch_size": 64, "metrics": ["mis"], "keep_sparse": False},
    # one top-k sparse autoencoder trained during the study on `layer` of the base network (off while layer is
    # unset): its features are extracted and scored, and the report compares them with the layer's neurons
    "dictionary": {"layer": None, "name": "dictionary", "n_features": 64, "k": 4, "steps": 300, "lr": 1e-3,
                   "batch_size": 256, "train_limit": None,
                   # the grid (issue 24): more layers, kinds, widths as multiples of the layer's units, several k;
                   # controls: each dictionary's untrained twin and its features permuted across images
                   "layers": [], "kinds": ["topk"], "expansions": [], "ks": [], "l1": 1e-3, "controls": False},
    "report": {"units": [], "classwise_layer": "softmax", "baseline": None},
    "runtime": {"device": "auto", "workers": "auto"},
    # the Slurm resources of `--executor slurm` (studies/executor.py): every step's, and a table per step kind
    "executor": EXECUTOR_SECTION,
    "quick": {},
}


# the type of keys whose default is None (the others take their default's type)
NONE_TYPES = {"spec": str, "arch": str, "num_classes": int, "preprocess": dict, "lr": float, "train_limit": int,
              "val_limit": int, "train": str, "val": str, "iterative_methods": list, "exclude": list,
              "optimizers": list, "data": str, "limit": int, "alpha": float, "resize": int, "crop": int,
              "image_size": int, "alpha_from": str, "baseline": str, "layer": str, "partition": str, "account": str,
              "qos": str, "mem_gb": int, "max_jobs": int}
# the type of each element of list keys
ITEM_TYPES = {"methods": str, "criteria": str, "rates": float, "schedules": str, "layers": str, "units": str,
              "iterative_methods": str, "exclude": str, "optimizers": str, "features": str, "kinds": str,
              "expansions": float, "ks": int, "metrics": str}
# integer keys with a lower bound (checked before any training runs)
MINIMUM = {"epochs": 0, "batch_size": 1, "train_limit": 1, "val_limit": 1, "steps": 1, "limit": 1, "tasks": 1,
           "resize": 1, "crop": 1,
           "explanations": 1, "image_size": 16, "n_boot": 0, "num_classes": 1,
           "n_features": 1, "k": 1}
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table", bool: "true or false"}


def _check_types(raw: dict) -> None:
    for section, defaults in SECTIONS.items():
        if section == "quick":
            continue
        for key, default in defaults.items():
            value = raw[section][key]
            if value is None:
                continue
            expected = NONE_TYPES.get(key) if default is None else type(default)
            if expected is None:  # tests/test_config_types.py keeps every key declared
                continue
            ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
            if expected is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key == "workers":
                ok = isinstance(value, (int, str)) and not isinstance(value, bool)
            if not ok:
                wanted = '"auto" or an integer' if key == "workers" else TYPE_NAMES[expected]
                raise MisbenchError(f"config [{section}] {key}: expected {wanted}, got {value!r} "
                                    f"({type(value).__name__})")
            if expected is list and key in ITEM_TYPES:
                item_type = ITEM_TYPES[key]
                for item in value:
                    good = (isinstance(item, (int, float)) if item_type is float else isinstance(item, item_type)) \
                        and not isinstance(item, bool)
                    if not good:
                        raise MisbenchError(f"config [{section}] {key}: every element must be {TYPE_NAMES[item_type]}, "
                                            f"got {item!r} ({type(item).__name__}) in {value!r}")
            if key in MINIMUM and value < MINIMUM[key]:
                raise MisbenchError(f"config [{section}] {key}: must be at least {MINIMUM[key]}, got {value!r}")
            if expected is list and len(set(map(repr, value))) < len(value):
                twice = next(v for i, v in enumerate(value) if v in value[:i])
                raise MisbenchError(f"config [{section}] {key}: {twice!r} is listed twice in {value!r}; "
                                    "give each value once")
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


def _check_keys(section: str, given: dict, allowed: dict):
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise MisbenchError(f"config [{section}]: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}")


def _check_choice(key: str, values, allowed):
    for v in values if isinstance(values, list) else [values]:
        if v not in allowed:
            raise MisbenchError(f"config {key}: {v!r} is not allowed; expected one of {', '.join(map(str, allowed))}")


def _apply_override(raw: dict, dotted: str, value):
    section, _, key = dotted.partition(".")
    if section not in raw or not key:
        raise MisbenchError(f"config [quick]: override {dotted!r} must be SECTION.KEY with a known section")
    _check_keys(section, {key: value}, SECTIONS[section])
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
    _check_keys("top level", given, SECTIONS)
    raw = {}
    for section, defaults in SECTIONS.items():
        values = given.get(section, {})
        if not isinstance(values, dict):
            raise MisbenchError(f"config [{section}] must be a table")
        if section != "quick":
            _check_keys(section, values, defaults)
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
    p = raw["pruning"]
    _check_choice("[pruning] methods", p["methods"], list(METHODS))
    _check_choice("[pruning] criteria", p["criteria"], list(CRITERIA))
    _check_choice("[pruning] schedules", p["schedules"], SCHEDULES)
    _check_choice("[pruning] optimizers", p["optimizers"] or [], ["sgd", "adam"])
    for rate in p["rates"]:
        if not isinstance(rate, (int, float)) or not 0 < rate < 1:
            raise MisbenchError(f"config [pruning] rates: {rate!r} is not a fraction in (0, 1)")
    for section in ("train", "retrain"):
        _check_choice(f"[{section}] optimizer", raw[section]["optimizer"], ["sgd", "adam"])
    try:
        parse_workers(raw["runtime"]["workers"])
    except MisbenchError as err:
        raise MisbenchError(f"config [runtime] {err}") from None
    _check_choice("[score] selection", raw["score"]["selection"], list(SELECTIONS))
    _check_choice("[extract] dtype", raw["extract"]["dtype"], ["float16", "float32"])
    _check_choice("[data] labels", raw["data"]["labels"], list(LABEL_MODES))
    _check_choice("[extract] reduction", raw["extract"]["reduction"], ["mean", "max"])
    _check_choice("[extract] token_reduction", raw["extract"]["token_reduction"], list(TOKEN_REDUCTIONS))
    _check_dictionaries(raw)
    parse_executor(raw["executor"])
    sim = raw["score"]["similarity"]
    if sim.partition(":")[0] + ":" not in BACKENDS:  # a family (deepfeat:<model>) parses its own spec
        _check_choice("[score] similarity", sim, backend_names())
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

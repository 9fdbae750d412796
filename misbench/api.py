"""misbench as a library: one function per command, for scripts and notebooks (docs/api.md).

The CLI parses its flags and calls these functions; options are the fields of the same frozen
settings dataclasses (ExtractSettings, ScoreSettings, PruneSettings, TrainSettings), so names and
defaults exist once.
"""

__all__ = ["LayerInfo", "layers", "load_model", "extract", "open_activations", "score", "load_scores", "prune",
           "retrain", "audit", "evaluate", "report", "study", "unit_images", "plot_unit", "train_dictionary",
           "merge_scores", "import_scores", "list_assets", "stage_assets"]

import dataclasses
import inspect
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .activations.dictionary_training import DictionarySettings, train_dictionary as _train_dictionary, \
    train_on_positions
from .activations.evaluate import EvalSettings, evaluate_acts, evaluate_model, write_eval
from .activations.extract import ExtractSettings, extract as _extract
from .activations.layers import LayerInfo, list_layers
# a reader of a complete file: layer_names, activations(layer) (numpy [N, U]), labels, paths, logits, class_names
from .activations.store import open_activations
from .errors import MisbenchError, close_matches
from .datasets.sources import data_folders, load_data
from .models.assets import ASSETS, asset_status, stage_asset
from .models.loading import (LoadedModel, classes_before_loading, load_model as _load_model, load_seeded,
                              model_input_file)
from .pruning import PruneSettings
from .pruning.audit import audit as _audit
from .pruning.run import check_training_data, produce_checkpoint, training_source
from .pruning.training import TrainSettings
from .runtime.fileio import option_label, refuse_existing
from .runtime.outputs import refuse_inputs_within, writing
from .runtime.progress import AUTO, resolve_progress
from .runtime.schema import check_options, setting
from .scoring.settings import ScoreSettings
from .studies.config import StudyConfig, load_config, parse_config

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_options(options: dict, allowed: list[str], what: str) -> None:
    unknown = [k for k in options if k not in allowed]
    if unknown:
        hint = close_matches(unknown[0], allowed)
        raise MisbenchError(f"unknown {what} option {unknown[0]!r}: expected one of {', '.join(allowed)}.{hint}")


# the keyword arguments that are not settings fields: a flag is True or False (overwrite="no" is not False),
# a path is a str or os.PathLike (None where it is optional)
_FLAGS = ("resume", "overwrite", "trust_pickle", "quick", "dry_run")
_PATHS = ("out", "tasks_out", "cache", "alpha_from", "acts", "classwise", "data", "val_data", "untrained_out",
          "from_dir")


def _check_arguments(what: str, optional=(), **arguments) -> None:
    """`optional`: paths that may be None (out is required except where listed)."""
    for key, value in arguments.items():
        if key in _FLAGS and not isinstance(value, bool):
            raise MisbenchError(f"{what} {key}={value!r}: expected True or False, got {type(value).__name__}")
        if key in _PATHS:
            required = key == "out" and key not in optional
            if value is None and not required:
                continue
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                expected = "a path" if required else "a path (or None)"
                raise MisbenchError(f"{what} {key}={value!r}: expected {expected}, got {type(value).__name__}")


def _names(value, what: str = "layers") -> tuple:
    """'a,b' or ['a', 'b'] -> ('a', 'b'): list options take both forms, as on the command line."""
    if not isinstance(value, (str, list, tuple)) or not all(isinstance(v, str) for v in
                                                              ([value] if isinstance(value, str) else value)):
        raise MisbenchError(f"{what}={value!r}: expected names as 'a,b' or a list of strings")
    items = [value] if isinstance(value, str) else list(value)
    return tuple(part.strip() for item in items for part in str(item).split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class _ModelOptions:
    """The options that resolve MODEL (DESIGN §3), checked as the settings are."""

    arch: str | None = None
    num_classes: int | None = setting(None, low=1)
    trust_pickle: bool = False
    arch_kwargs: dict | None = None


def _model_options(arch, num_classes, trust_pickle, arch_kwargs) -> dict:
    return dict(arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, arch_kwargs=arch_kwargs)


def load_model(model, arch: str | None = None, num_classes: int | None = None, trust_pickle: bool = False,
               arch_kwargs: dict | None = None) -> LoadedModel:
    """MODEL (DESIGN §3): a torchvision `name[:weights]`, a misbench checkpoint, or a state_dict file with `arch`.

    A LoadedModel passes through unchanged, so every function here takes either."""
    if isinstance(model, LoadedModel):
        return model
    check_options(_ModelOptions, _model_options(arch, num_classes, trust_pickle, arch_kwargs), "model")
    if not isinstance(model, (str, os.PathLike)):
        raise MisbenchError(f"model={model!r}: expected a MODEL string, a path or a LoadedModel")
    return _load_model(str(model), arch=arch, num_classes=num_classes, trust_pickle=trust_pickle,
                       arch_kwargs=arch_kwargs)


def _data_before_model(model, data, labels: str, model_options: dict, read=load_data):
    """DATA read (its folders matched to the model's classes, `read`) before MODEL loads, where the model's classes
    are known from its name: a folder the labels cannot map, or no images, is refused in seconds instead of after
    a load of a minute or more. Returns the ImageSource, or `data` itself where only the loaded model can say."""
    if not isinstance(data, str) or isinstance(model, LoadedModel) or not isinstance(model, (str, os.PathLike)):
        return data
    known = classes_before_loading(str(model), model_options.get("arch"), model_options.get("num_classes"))
    if known is None:
        return data
    num_classes, categories = known
    return read(data, num_classes, labels, categories)


def _model_and_data(model, specs, labels: str, model_options: dict, read=load_data) -> tuple[LoadedModel, list]:
    """MODEL loaded after each DATA of `specs` was read where it can be (`_data_before_model`): a bad folder is
    refused before a long load. Returns the LoadedModel and the data, in the order of `specs`."""
    data = [_data_before_model(model, spec, labels, model_options, read) for spec in specs]
    return load_model(model, **model_options), data


def layers(model, **model_options) -> list[LayerInfo]:
    """Every module `extract` can record, as (name, kind, n_units, module, in_conv, classes, in_mlp) rows."""
    check_options(_ModelOptions, model_options, "model")
    loaded = load_model(model, **model_options)
    crop = loaded.preprocess.crop
    device = next(loaded.model.parameters()).device
    return list_layers(loaded.model, torch.zeros(1, 3, crop, crop, device=device), loaded.categories or ())


def extract(model, data, layers, out, *, resume: bool = False, overwrite: bool = False, progress=AUTO,
            arch: str | None = None, num_classes: int | None = None, trust_pickle: bool = False,
            arch_kwargs: dict | None = None, **options) -> Path:
    """Activations of MODEL on DATA for `layers` ('conv,softmax' or a list) into the HDF5 file `out`.

    `options` are ExtractSettings fields (reduction, dtype, limit, keep, batch_size, device, ...)."""
    check_options(ExtractSettings, options, "extract", skip=("layers",))
    _check_arguments("extract", out=out, resume=resume, overwrite=overwrite, trust_pickle=trust_pickle)
    settings = ExtractSettings(layers=_names(layers), **options)
    loaded, (data,) = _model_and_data(model, [data], settings.labels,
                                      _model_options(arch, num_classes, trust_pickle, arch_kwargs))
    return _extract(loaded, data, out, settings, resume=resume, overwrite=overwrite,
                    progress=resolve_progress(progress), trust_pickle=trust_pickle)


def score(acts, layers="all", out=None, *, tasks_out=None, cache=None, shard=None, progress=AUTO, backend=None,
          alpha_from=None, overwrite: bool = False, **options) -> "pd.DataFrame":
    """MIS of every unit of `layers` (names, 'a,b', or 'all') in the activation file `acts`.

    Returns a DataFrame with mis.csv's columns and mis.json's content in `df.attrs`. Nothing is
    written unless `out` (mis.csv, with mis.json beside it) or `tasks_out` is given. `options` are
    ScoreSettings fields (similarity, image_size, selection, tasks, explanations, alpha, seed, ...).
    `alpha_from`: the JSON of `misbench calibrate --out`, whose alpha is used and recorded as calibrated.
    Existing outputs are refused unless `overwrite` (a killed run's leftovers of the same call are replaced)."""
    # scoring's scipy and pandas load with the first score, not with every command's `import misbench.api`
    from .scoring.calibrate import calibration_alpha
    from .scoring.results import scores_frame
    from .scoring.run import parse_shard, score as _score

    # alpha_source is not an option: it records where alpha came from (alpha_from, alpha or the default)
    check_options(ScoreSettings, options, "score", skip=("alpha_source",))
    _check_arguments("score", ("out",), out=out, tasks_out=tasks_out, cache=cache, alpha_from=alpha_from,
                     overwrite=overwrite)
    if not _names(layers):
        raise MisbenchError("layers='': expected layer names or 'all'")
    if alpha_from:
        if options.get("alpha") is not None:
            raise MisbenchError(f"give {option_label('alpha')} or {option_label('alpha_from')}, not both")
        options["alpha"], options["alpha_source"] = calibration_alpha(alpha_from)
    settings = ScoreSettings(**options)
    shard = parse_shard(shard) if isinstance(shard, str) or shard is None else tuple(shard)
    meta = _score(acts, list(_names(layers)), settings, out, tasks_out=tasks_out, cache_dir=cache, shard=shard,
                  backend=backend, progress=resolve_progress(progress), overwrite=overwrite)
    if meta is None:  # another rank under torchrun: rank 0 holds the result
        return None
    if "rows" not in meta:  # merged from the ranks' files
        return load_scores(out)
    rows = meta.pop("rows")
    return scores_frame(rows, meta)  # as load_scores reads it from mis.csv and mis.json


def load_scores(path) -> "pd.DataFrame":
    """mis.csv (and mis.json beside it, in `df.attrs`) as a DataFrame."""
    # pandas loads with the first table read, not with every command's `import misbench.api`
    from .scoring.results import load_scores as read_scores

    return read_scores(path)


def merge_scores(parts, out, *, tasks_out=None, overwrite: bool = False) -> "pd.DataFrame":
    """Merge the mis.csv files (with their mis.json and tasks files) of `score(shard="I/N")` runs into the result of
    one unsharded run, written to `out` (and `tasks_out`); returns it as `load_scores(out)` reads it."""
    # the scores' pandas and scipy load with the first merge, not with every command's `import misbench.api`
    from .scoring.results import merge_scores as _merge_scores

    _check_arguments("merge-scores", out=out, tasks_out=tasks_out, overwrite=overwrite)
    parts = [parts] if isinstance(parts, (str, os.PathLike)) else list(parts)
    if not parts or not all(isinstance(p, (str, os.PathLike)) for p in parts):
        raise MisbenchError(f"parts={parts!r}: expected the mis.csv paths of the shards")
    _merge_scores(parts, out, tasks_out, overwrite)
    return load_scores(out)


def _produce(model, prune_settings, out, data, val_data, resume, overwrite, progress, resize, crop, model_options,
             train_options) -> Path:
    check_options(TrainSettings, train_options, "training")
    _check_arguments("training", out=out, data=data, val_data=val_data, resume=resume, overwrite=overwrite,
                     trust_pickle=model_options["trust_pickle"])
    settings = TrainSettings(**train_options)
    check_training_data(settings, data)
    loaded, (data, val_data) = _model_and_data(model, [data, val_data], settings.labels, model_options,
                                               training_source)
    loaded.preprocess = loaded.preprocess.override(resize, crop)
    return produce_checkpoint(loaded, prune_settings, settings, out, data, val_data,
                              resume=resume, overwrite=overwrite, progress=resolve_progress(progress))


def prune(model, method: str, rate: float, out, *, steps: int | None = None, exclude=None, data=None, val_data=None,
          resume: bool = False, overwrite: bool = False, progress=AUTO, resize: int | None = None,
          crop: int | None = None, arch: str | None = None, num_classes: int | None = None,
          trust_pickle: bool = False, arch_kwargs: dict | None = None, **options) -> Path:
    """Prune MODEL by `method` to `rate`, retrain `epochs` after each step, write a misbench checkpoint.

    `options` are PruneSettings fields (scope, criterion, schedule, seed) and TrainSettings fields
    (epochs, optimizer, lr, momentum, weight_decay, gamma, batch_size, amp, augment, device, ...);
    `seed` seeds both. `steps` defaults to 4 for the iterative schedule, else 1. `exclude`: module
    names ('a,b' or a list; '' or () for none; None: the architecture's default)."""
    prune_fields = [f for f in _fields(PruneSettings) if f not in ("method", "rate", "steps", "exclude")]
    _check_options(options, sorted(set(prune_fields) | set(_fields(TrainSettings))), "prune")
    prune_options = {k: v for k, v in options.items() if k in prune_fields}
    train_options = {k: v for k, v in options.items() if k in _fields(TrainSettings)}
    check_options(PruneSettings, {"method": method, "rate": rate, **({} if steps is None else {"steps": steps}),
                                  **prune_options}, "prune")
    schedule = prune_options.get("schedule", "oneshot")
    settings = PruneSettings(method=method, rate=rate, steps=steps if steps is not None else (4 if schedule == "iterative" else 1),
                             exclude=None if exclude is None else _names(exclude), **prune_options)
    return _produce(model, settings, out, data, val_data, resume, overwrite, resolve_progress(progress), resize, crop,
                    _model_options(arch, num_classes, trust_pickle, arch_kwargs), train_options)


def retrain(model, out, *, data=None, val_data=None, resume: bool = False, overwrite: bool = False, progress=AUTO,
            resize: int | None = None, crop: int | None = None, arch: str | None = None,
            num_classes: int | None = None, trust_pickle: bool = False, arch_kwargs: dict | None = None,
            **options) -> Path:
    """Retrain MODEL without pruning (the unpruned control); a pruned checkpoint's masks stay enforced.
    `options` are TrainSettings fields; `epochs` (default 1) must be at least 1."""
    options.setdefault("epochs", 1)
    if isinstance(options["epochs"], int) and options["epochs"] < 1:
        raise MisbenchError(f"retrain needs {option_label('epochs')} >= 1, got {options['epochs']}")
    return _produce(model, None, out, data, val_data, resume, overwrite, resolve_progress(progress), resize, crop,
                    _model_options(arch, num_classes, trust_pickle, arch_kwargs), options)


def audit(model, **model_options) -> dict:
    """Per prunable layer weights, zeros, sparsity, zero channels; totals; the pruning record and whether
    the zeros still match it (`consistent`). DESIGN §6's `audit --json` object plus `problems`."""
    check_options(_ModelOptions, model_options, "model")
    return _audit(load_model(model, **model_options))


def evaluate(model=None, data=None, *, acts=None, out=None, classwise=None, progress=AUTO, arch: str | None = None,
             num_classes: int | None = None, trust_pickle: bool = False, arch_kwargs: dict | None = None,
             overwrite: bool = False, **options) -> dict:
    """Top-1, top-5 and class-wise accuracy of MODEL on DATA, or from the logits stored in `acts`.

    Writes eval.json to `out` (and the class-wise CSV to `classwise`) only when given. `options`:
    batch_size, workers, device, limit, labels (the forward pass's; evaluate_model's defaults). Existing
    outputs are refused unless `overwrite`."""
    check_options(EvalSettings, options, "evaluate")
    _check_arguments("evaluate", ("out",), acts=acts, out=out, classwise=classwise, overwrite=overwrite,
                     trust_pickle=trust_pickle)
    spec = getattr(model, "spec", model)
    with writing({"--out": out, "--classwise": classwise}, {"--acts": acts, "MODEL": spec and model_input_file(spec)},
                 "misbench eval", data_folders({"--data": data})):
        refuse_existing({"out": out, "classwise": classwise}, overwrite)
        return _evaluate(model, data, acts, out, classwise, resolve_progress(progress), arch, num_classes, trust_pickle, arch_kwargs,
                         options)


def _evaluate(model, data, acts, out, classwise, progress, arch, num_classes, trust_pickle, arch_kwargs,
              options) -> dict:
    if acts is not None:
        if model is not None or data is not None:
            raise MisbenchError("give either MODEL --data DATA or --acts FILE, not both")
        if options.get("limit") is not None:
            raise MisbenchError("--limit applies to a forward pass over DATA; --acts evaluates every stored row")
        result = evaluate_acts(acts)  # batch_size, workers, device: no forward pass to run
    else:
        if model is None or data is None:
            raise MisbenchError("eval needs MODEL and --data DATA (or --acts FILE)")
        loaded, (data,) = _model_and_data(model, [data], EvalSettings(**options).labels,
                                          _model_options(arch, num_classes, trust_pickle, arch_kwargs))
        result = evaluate_model(loaded, data, progress=progress, **options)
    if classwise is not None and out is None:
        raise MisbenchError("the class-wise CSV (--classwise) is written beside eval.json: give out (--out) too")
    if out is not None:
        write_eval(result, out, classwise)
    return result


@dataclasses.dataclass(frozen=True)
class _PositionOptions:
    """train_dictionary's options of the per-position recipe, checked as the settings are."""

    positions: int | None = setting(None, low=1)
    limit: int | None = setting(None, low=1)
    device: str = "auto"


def train_dictionary(acts, layer: str, out, *, untrained_out=None, positions: int | None = None, model=None,
                     data=None, limit: int | None = None, device: str = "auto", overwrite: bool = False,
                     **options) -> dict:
    """A sparse autoencoder on `layer`'s rows in the activation file `acts` (one vector per image), or with
    `positions` on a uniform sample of at most that many of `layer`'s per-position vectors, drawn while `data`
    streams through `model` (acts=None). Writes the dictionary file `out` (and its untrained control to
    `untrained_out`); returns its training record (n_features, k, fvu, l0, dead_share, ...). `options` are
    DictionarySettings fields (n_features, k, steps, lr, batch_size, seed, kind, expansion, l1)."""
    check_options(DictionarySettings, options, "train-dictionary")
    check_options(_PositionOptions, dict(positions=positions, limit=limit, device=device), "train-dictionary")
    _check_arguments("train-dictionary", out=out, acts=acts, untrained_out=untrained_out, overwrite=overwrite)
    settings = DictionarySettings(**options)
    spec = getattr(model, "spec", model)
    inputs = [acts, model_input_file(str(spec)) if spec else None]
    refuse_existing({"out": out, "untrained_out": untrained_out}, overwrite, inputs)
    if positions is None:
        if not acts or model is not None or data is not None:
            raise MisbenchError(f"train-dictionary: give ACTS (image-level vectors), or {option_label('positions')} N "
                                f"with {option_label('model')} and {option_label('data')} (per-position vectors), "
                                "not both")
        return _train_dictionary(acts, layer, out, settings, untrained_out=untrained_out)
    if acts or model is None or data is None:
        raise MisbenchError(f"train-dictionary {option_label('positions')}: give {option_label('model')} and "
                            f"{option_label('data')} (the images stream through the model) and no ACTS")
    # a MODEL string is built with torch seeded by the settings' seed: a `NAME:random` network is the same every call
    loaded = model if isinstance(model, LoadedModel) else load_seeded(str(model), settings.seed)
    return train_on_positions(loaded, data, layer, out, settings, positions, untrained_out=untrained_out,
                              limit=limit, device=device)


def import_scores(pickle_file, out, *, drop_types=(), constant=(), constant_above: float | None = None,
                  overwrite: bool = False) -> dict:
    """A published per-unit MIS pickle (restricted unpickler: data only) as mis.csv `out`. `drop_types`: layer
    types to leave out; `constant`: "LAYER:I,J,..." units to mark constant; `constant_above`: mark units with
    mis_confidence >= this constant. Returns the counts and means (n_units, n_ok, mean_mis, ...)."""
    _check_arguments("import-scores", out=out, overwrite=overwrite)
    if constant_above is not None and (isinstance(constant_above, bool) or not isinstance(constant_above, (int, float))):
        raise MisbenchError(f"constant_above={constant_above!r}: expected a number (or None)")
    # the reports package is loaded with its first use, not by `import misbench`
    from .reports.importer import import_scores as _import_scores

    with writing({"--out": out}, {"PICKLE_FILE": pickle_file}, "misbench import-scores"):
        refuse_existing({"out": out}, overwrite, [pickle_file])
        return _import_scores(pickle_file, out, _names(drop_types, "drop_types") if drop_types else (),
                              (constant,) if isinstance(constant, str) else tuple(constant), constant_above)


def list_assets() -> list[dict]:
    """The offline assets misbench knows (weights, datasets): name, kind, description, staged, where."""
    return [asset_status(asset) for asset in ASSETS.values()]


def stage_assets(names=None, from_dir=None) -> dict:
    """Stage `names` (default: every known asset) into the torch hub cache / misbench's data folder, from
    `from_dir` on air-gapped machines; returns {name: staged path}."""
    _check_arguments("assets", from_dir=from_dir)
    return {name: stage_asset(name, from_dir) for name in (_names(names, "names") if names else list(ASSETS))}


def report(kind: str, out, *, overwrite: bool = False, **inputs) -> Path:
    """Write the report `kind` into the folder `out`; returns its main file (report.html, layers.csv, curves.csv).

    classwise: scores, acts or eval_json, layer, tasks, units, seed. sweep: runs (runs.csv, a study
    folder, or in memory: a pandas DataFrame or a list of dicts with runs.csv's columns), seed, baseline, classwise_layer, units, title. compare: scores (two or more
    `[LABEL=]mis.csv[:LAYER+LAYER]`), seed, n_boot. layers: scores. curves: checkpoints.
    The report's main files in `out` are not replaced unless `overwrite`."""
    _check_arguments("report", out=out, overwrite=overwrite)
    # the reports import matplotlib (a second or more): loaded when a report is made, not by `import misbench`
    from .reports.build import REPORT_FILES, REPORTS

    if kind not in REPORTS:
        raise MisbenchError(f"unknown report {kind!r}: expected one of {', '.join(REPORTS)}.{close_matches(kind, REPORTS)}")
    build = REPORTS[kind]
    try:
        inspect.signature(build).bind(out=out, **inputs)
    except TypeError as err:
        params = [p for p in inspect.signature(build).parameters if p != "out"]
        raise MisbenchError(f"report {kind}: {err}; it takes {', '.join(params)}") from None
    read = {name: value for name, value in inputs.items() if isinstance(value, (str, Path))}
    with writing({"out": out}, read, f"misbench report {kind}"):
        refuse_inputs_within(option_label("out"), out, inputs)
        refuse_existing({"out": [Path(out) / name for name in REPORT_FILES[kind]]}, overwrite)
        return build(out=out, **inputs)


def unit_images(acts, layer: str, unit: int, k: int = 9, side: str = "top", size: int = 64) -> dict:
    """A unit's k most (side="top") or least ("bottom") activating images from an activation file alone (no
    tasks file): {"rows", "paths", "activations" [k], "images" uint8 [k, size, size, 3]}, in rank order."""
    # reports.units reads images back (torchvision transforms): loaded when asked for
    from .reports.units import unit_images as _unit_images

    return _unit_images(acts, layer, unit, k=k, side=side, size=size)


def plot_unit(acts, layer: str, unit: int, k: int = 9, tasks=None, n_tasks: int = 2, size: int = 64):
    """A matplotlib Figure (no pyplot: a notebook shows it, `fig.savefig` saves it) of a unit's top and bottom
    k images with their activations and, with `tasks` (the score run's tasks.h5), its first n_tasks tasks."""
    # matplotlib loads when a figure is drawn, not with `import misbench`
    from .reports.units import plot_unit as _plot_unit

    return _plot_unit(acts, layer, unit, k=k, tasks=tasks, n_tasks=n_tasks, size=size)


def study(config, out, *, quick: bool = False, dry_run: bool = False, on_step=None, progress=AUTO,
          overwrite: bool = False, executor: str = "local") -> dict:
    """Run the study of `config` (a TOML path, a dict of its sections, or a StudyConfig) into the folder `out`,
    redoing only what changed. Returns manifest.json's content; with executor="slurm" every pending step is
    submitted as one Slurm job and {"jobs": {step: job id}, "manifest": path} returns at once. With dry_run:
    {"plan": [(step, status)], "resources": {step: text} (slurm), "estimate": {...}, "problems": [lines]}.
    `quick` applies the config's [quick] overrides to a path or dict (a StudyConfig is used as it is).
    on_step(name, status, i, n) before each step (status cached, run or resume); progress(stage, done, total)
    inside long steps. A non-empty `out` that is not a study folder is refused unless `overwrite`."""
    # the study runs every stage (scoring's scipy and pandas too): loaded with the first study, not with `import
    # misbench.api`
    from .studies.launch import dry_run as _dry_run, launch_study
    from .studies.run import check_study_folder

    _check_arguments("study", out=out, quick=quick, dry_run=dry_run, overwrite=overwrite)
    check_study_folder(out, overwrite)
    if isinstance(config, dict):
        config = parse_config(config, quick=quick)
    elif not isinstance(config, StudyConfig):
        config = load_config(config, quick=quick)
    if dry_run:
        return _dry_run(config, out, executor)
    result = launch_study(config, out, executor, on_step=on_step, progress=resolve_progress(progress))
    if executor != "local":
        return result
    return json.loads(Path(result["manifest"]).read_text())

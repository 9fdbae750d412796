"""Run a whole pruning-and-interpretability study from one config, step by step, cached by a manifest."""

__all__ = ["Study", "Step", "run_study", "check_study_folder", "study_summary", "DEMO_CONFIG", "demo_config_path"]

import dataclasses
import json
import logging
import time
import traceback
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from ..activations.dictionary import parse_features
from ..activations.dictionary_training import position_vectors, train_dictionary, train_on_vectors
from ..activations.evaluate import evaluate_model, write_eval
from ..activations.extract import ExtractSettings, extract
from ..activations.store import add_permuted_layers, open_activations, partial_path
from ..errors import MisbenchError
from ..models.checkpoint import load_checkpoint_dict
from ..models.loading import LoadedModel, load_seeded
from ..pruning import PruneSettings
from ..pruning.run import partial_checkpoint_path, produce_checkpoint
from ..pruning.training import TrainSettings
from ..reports.tables import write_csv
from ..runtime import distributed
from ..runtime.device import parse_workers
from ..runtime.fileio import config_wording, option_label, overwrite_hint, read_csv_rows, utc_now, write_json
from ..runtime.lock import DirectoryLock
from ..runtime.schema import settings_from
from ..scoring.calibrate import calibration_alpha
from ..scoring.run import ScoreSettings, score
from .config import RunSpec, StudyConfig
from .dictionaries import dictionary_grid, dictionary_layers, dictionary_settings, permuted_name
from .manifest import Manifest, folder_fingerprint, step_key
from .network import study_network

log = logging.getLogger(__name__)

DEMO_CONFIG = "demo.toml"


def demo_config_path() -> Path:
    return Path(str(resources.files("misbench.configs") / DEMO_CONFIG))


@dataclasses.dataclass
class Step:
    name: str
    kind: str
    settings: dict
    inputs: dict            # label -> Path (a file another step or the user provides) or str (a model string)
    outputs: dict           # label -> Path
    action: Callable[[bool], None]  # action(resume)
    partial: Path | None = None
    data: tuple = ()        # DATA specs whose images the step reads: folders are fingerprinted into its key


class Study:
    def __init__(self, config: StudyConfig, out_dir, progress: Callable[[str, int, int], None] | None = None):
        self.config = config
        self.out = Path(out_dir).resolve()
        self.runs = config.runs()
        self.steps = self._plan()
        self.progress = progress  # progress(stage, done, total) of long steps; the CLI draws it
        self._fingerprints: dict[str, str] = {}

    def _bar(self, stage: str):
        return (lambda done, total: self.progress(stage, done, total)) if self.progress else None

    # -- settings -------------------------------------------------------------------------------------------------
    def _runtime(self):
        runtime = self.config["runtime"]
        return {**runtime, "workers": parse_workers(runtime["workers"])}

    def _config_keys(self, section: str, **renamed) -> dict:
        """A step's parameters named as the config spells them in messages (a limit's class-coverage warning, a
        refused setting): the keys of [section], and `renamed` ones read from elsewhere (the dictionary's training
        extraction takes its `limit` from `[dictionary] train_limit`)."""
        return {**{key: f"[{section}] {key}" for key in self.config[section]}, **renamed}

    def _train_settings(self, section: str, epochs: int | None = None, optimizer: str | None = None):
        s = self.config[section]
        return settings_from(TrainSettings, {**s, **self._runtime()}, epochs=s["epochs"] if epochs is None else epochs,
                             optimizer=optimizer or s["optimizer"], seed=self.config["study"]["seed"],
                             labels=self.config["data"]["labels"])

    def _fresh_model(self) -> LoadedModel:
        torch.manual_seed(self.config["study"]["seed"])
        return study_network(self.config["model"])

    # -- plan -----------------------------------------------------------------------------------------------------
    def run_dir(self, run: RunSpec) -> Path:
        return self.out / "runs" / run.name

    def _plan(self) -> list[Step]:
        cfg, steps = self.config, []
        data = cfg["data"]
        base_ckpt: Path | str
        if cfg["train"]["epochs"] > 0:
            base_ckpt = self.out / "base" / "model.pt"
            settings = {"model": cfg["model"], "train": cfg["train"], "data": data["train"], "val": data["val"],
                        "seed": cfg["study"]["seed"]}
            spec_input = {"model": cfg["model"]["spec"]} if cfg["model"]["spec"] else {}
            steps.append(Step("train:base", "train", settings, spec_input, {"checkpoint": base_ckpt},
                              lambda resume, out=base_ckpt: self._produce(self._fresh_model(), None, "train", out, resume),
                              partial_checkpoint_path(base_ckpt), (data["train"], data["val"])))
        else:
            base_ckpt = cfg["model"]["spec"]
        for run in self.runs:
            d = self.run_dir(run)
            ckpt = base_ckpt if run.name == "base" else d / "model.pt"
            if run.method == "random":
                steps.append(Step(f"init:{run.name}", "init", {"model": cfg["model"], "seed": cfg["study"]["seed"]}, {},
                                  {"checkpoint": ckpt}, lambda resume, out=ckpt: self._produce(
                                      self._fresh_model(), None, "train", out, resume, 0)))
            elif run.name != "base":
                prune = None
                if run.method != "none":
                    prune = PruneSettings(run.method, run.rate, criterion=run.criterion, schedule=run.schedule,
                                          steps=run.steps, seed=cfg["study"]["seed"],
                                          exclude=tuple(cfg["pruning"]["exclude"]) if cfg["pruning"]["exclude"] is not None else None)
                epochs = cfg["retrain"]["epochs"] if run.retrained else 0
                settings = {"run": dataclasses.asdict(run), "retrain": {**cfg["retrain"], "epochs": epochs},
                            "data": data["train"], "val": data["val"], "labels": data["labels"],
                            "seed": cfg["study"]["seed"], "exclude": cfg["pruning"]["exclude"]}
                steps.append(Step(f"prune:{run.name}", "prune", settings, {"model": base_ckpt}, {"checkpoint": ckpt},
                                  lambda resume, p=prune, e=epochs, o=run.optimizer, out=ckpt: self._produce(
                                      self._load(base_ckpt), p, "retrain", out, resume, e, o),
                                  partial_checkpoint_path(ckpt), (data["train"], data["val"]) if epochs else ()))
            eval_json = d / "eval.json"
            steps.append(Step(f"eval:{run.name}", "eval", {"data": data["val"], "limit": cfg["retrain"]["val_limit"],
                                                            "labels": data["labels"]},
                              {"model": ckpt}, {"eval": eval_json},
                              lambda resume, c=ckpt, out=eval_json: self._eval(c, out), data=(data["val"],)))
            acts = d / "acts.h5"
            # the dictionary files behind [extract] features are inputs: a changed file re-extracts
            features = {f"features:{spec.name}": Path(spec.file) for spec in map(parse_features, cfg["extract"]["features"])}
            images = cfg["extract"]["data"] or data["val"]
            steps.append(Step(f"extract:{run.name}", "extract", {**cfg["extract"], "data": images,
                                                                 "labels": data["labels"]},
                              {"model": ckpt, **features}, {"acts": acts},
                              lambda resume, c=ckpt, out=acts: self._extract(c, out, resume),
                              partial_path(acts), (images,)))
            scores = d / "mis.csv"
            steps.append(Step(f"score:{run.name}", "score", {**cfg["score"], "seed": cfg["study"]["seed"]}, {"acts": acts},
                              {"scores": scores, "meta": d / "mis.json", "tasks": d / "tasks.h5"},
                              lambda resume, a=acts, out=scores: self._score(a, out), data=(images,)))
        steps += self._dictionary_steps(base_ckpt)
        report_inputs = {}
        has_dictionary = bool(dictionary_layers(cfg["dictionary"]))
        if has_dictionary:
            report_inputs["dictionary:scores"] = self.out / "dictionary" / "mis.csv"
        for run in self.runs:
            d = self.run_dir(run)
            report_inputs.update({f"{run.name}:scores": d / "mis.csv", f"{run.name}:eval": d / "eval.json"})
        report_outputs = {"html": self.out / "report" / "report.html", "sweep": self.out / "report" / "sweep.csv",
                          "summary": self.out / "report" / "summary.json"}
        if has_dictionary:
            report_outputs["compare"] = self.out / "report" / "compare" / "compare.csv"
            report_outputs["dictionaries"] = self.out / "report" / "dictionaries" / "dictionaries.csv"
        report_settings = {"report": cfg["report"], "runs": [dataclasses.asdict(r) for r in self.runs]}
        if has_dictionary:
            report_settings["dictionary"] = dictionary_settings(cfg["dictionary"])
        steps.append(Step("report", "report", report_settings, report_inputs, report_outputs, lambda resume: self._report()))
        return steps

    def dictionary_paths(self) -> dict:
        d = self.out / "dictionary"
        return {"train_acts": d / "train_acts.h5", "dictionary": d / "dictionary.pt", "acts": d / "acts.h5",
                "scores": d / "mis.csv", "meta": d / "mis.json", "tasks": d / "tasks.h5"}

    def _dictionary_steps(self, base_ckpt) -> list[Step]:
        """[dictionary]: activations of the training images at its layers of the base network -> the grid's
        dictionaries (each with its untrained control when `controls`) -> the layers' neurons and every
        dictionary's features on the extraction images (with `controls`, plus each trained dictionary's features
        permuted across images) -> their scores (the report compares neurons and features layer by layer)."""
        cfg, d = self.config, self.config["dictionary"]
        layers = dictionary_layers(d)
        if not layers:
            return []
        p = self.dictionary_paths()
        plans = dictionary_grid(d, cfg["study"]["seed"])
        folder = self.out / "dictionary"
        files = {plan.name: folder / plan.file for plan in plans}
        files.update({plan.untrained: folder / plan.untrained_file for plan in plans if plan.untrained})
        e = {k: cfg["extract"][k] for k in ("reduction", "token_reduction", "dtype", "resize", "crop", "batch_size")}
        labels = cfg["data"]["labels"]
        # the training images feed the dictionaries' own layers only (no [extract] features on the whole train split)
        train = {**e, "layers": layers, "features": [], "data": cfg["data"]["train"], "limit": d["train_limit"],
                 "labels": labels, "dtype": "float32"}
        specs = [f"{plan.name}={plan.layer}:{plan.file}" for plan in plans] + \
            [f"{plan.untrained}={plan.layer}:{plan.untrained_file}" for plan in plans if plan.untrained]
        val = {**e, "layers": layers, "features": specs, "data": cfg["extract"]["data"] or cfg["data"]["val"],
               "limit": cfg["extract"]["limit"], "labels": labels}
        full = [f"{spec.partition('=')[0]}={spec.partition('=')[2].partition(':')[0]}:{folder / spec.rpartition(':')[2]}"
                for spec in specs]
        scored = folder / "acts_controls.h5" if d["controls"] else p["acts"]
        steps = []
        if d["positions"] is None:  # image-level vectors: the training images' extraction
            steps.append(Step("extract:dictionary-train", "extract", train, {"model": base_ckpt},
                              {"acts": p["train_acts"]},
                              lambda resume: self._extract(base_ckpt, p["train_acts"], resume,
                                                           limit_key="[dictionary] train_limit", **train),
                              partial_path(p["train_acts"]), (train["data"],)))
        steps += [
            Step("dictionary", "dictionary", {**dictionary_settings(d), "seed": cfg["study"]["seed"]},
                 {"acts": p["train_acts"]} if d["positions"] is None else {"model": base_ckpt},
                 {f"dictionary:{name}": path for name, path in files.items()},
                 lambda resume: self._train_dictionaries(plans, base_ckpt),
                 data=() if d["positions"] is None else (train["data"],)),
            Step("extract:dictionary", "extract", val, {"model": base_ckpt, **{f"dictionary:{n}": f for n, f in files.items()}},
                 {"acts": p["acts"]}, lambda resume: self._extract(base_ckpt, p["acts"], resume, **{**val, "features": full}),
                 partial_path(p["acts"]), (val["data"],)),
        ]
        if d["controls"]:
            steps.append(Step("controls:dictionary", "controls", {"seed": cfg["study"]["seed"],
                                                                  "layers": [plan.name for plan in plans]},
                              {"acts": p["acts"]}, {"acts": scored},
                              lambda resume: add_permuted_layers(p["acts"], scored, [plan.name for plan in plans],
                                                                 cfg["study"]["seed"])))
        # [dictionary] metrics (when set) replaces [score] metrics for the dictionaries' scoring alone
        metrics = {"metrics": list(d["metrics"])} if d["metrics"] is not None else {}
        steps.append(Step("score:dictionary", "score", {**cfg["score"], "layers": ["all"], "seed": cfg["study"]["seed"],
                                                        **metrics},
                          {"acts": scored}, {k: p[k] for k in ("scores", "meta", "tasks")},
                          lambda resume: self._score(scored, p["scores"], layers=["all"], **metrics),
                          data=(val["data"],)))
        return steps

    def dictionary_pairs(self) -> list[str]:
        """`report dictionaries` pairs: each layer against each dictionary, its untrained twin and its permuted
        features (with controls)."""
        d = self.config["dictionary"]
        pairs = []
        for plan in dictionary_grid(d, self.config["study"]["seed"]):
            pairs.append(f"{plan.label}:{plan.layer}={plan.name}")
            if plan.untrained:
                pairs += [f"{plan.label} untrained:{plan.layer}={plan.untrained}",
                          f"{plan.label} permuted:{plan.layer}={permuted_name(plan.name)}"]
        return pairs

    # -- actions --------------------------------------------------------------------------------------------------
    def _load(self, ckpt) -> LoadedModel:
        # a `name:random` [model] spec (the base when [train] has no epochs) is built from the study's seed, so
        # that every step reads the same network
        return load_seeded(str(ckpt), self.config["study"]["seed"])

    def _produce(self, loaded, prune, section, out, resume, epochs=None, optimizer=None):
        data = self.config["data"]
        train = self._train_settings(section, epochs, optimizer)
        progress = (lambda step, epoch, d, n: self.progress(f"{Path(out).parent.name} step {step} epoch {epoch}", d, n)
                    ) if self.progress else None
        with config_wording(self._config_keys(section)):
            produce_checkpoint(loaded, prune, train, out, data["train"] if train.epochs else None, data["val"],
                               resume=resume, overwrite=True, progress=progress)

    def _eval(self, ckpt, out):
        with config_wording(self._config_keys("retrain")):
            result = evaluate_model(self._load(ckpt), self.config["data"]["val"], batch_size=256,
                                    workers=self._runtime()["workers"], device=self._runtime()["device"],
                                    limit=self.config["retrain"]["val_limit"], labels=self.config["data"]["labels"],
                                    limit_name="val_limit", progress=self._bar(f"eval {Path(out).parent.name}"))
        write_eval(result, out, Path(out).with_name("classwise_accuracy.csv"))

    def _extract(self, ckpt, out, resume, limit_key="[extract] limit", **override):
        """Extract with the [extract] settings; `override` replaces some (the dictionary's steps), `limit_key`
        names the config key of the limit."""
        e = {**self.config["extract"], **override}
        settings = settings_from(ExtractSettings, {**e, **self._runtime()}, labels=self.config["data"]["labels"])
        with config_wording(self._config_keys("extract", limit=limit_key)):
            extract(self._load(ckpt), e["data"] or self.config["data"]["val"], out, settings, resume=resume,
                    overwrite=True, progress=self._bar(f"extract {Path(out).parent.name}"))

    def _train_dictionaries(self, plans, base_ckpt):
        with config_wording(self._config_keys("dictionary", limit="[dictionary] train_limit")):
            self._train_grid(plans, base_ckpt)

    def _train_grid(self, plans, base_ckpt):
        p, folder, d = self.dictionary_paths(), self.out / "dictionary", self.config["dictionary"]
        if d["positions"] is None:
            for plan in plans:
                train_dictionary(p["train_acts"], plan.layer, folder / plan.file, plan.settings,
                                 untrained_out=folder / plan.untrained_file if plan.untrained else None)
            return
        # per-position vectors: one reservoir sample per layer (the study's seed) serves all its dictionaries
        loaded, runtime = self._load(base_ckpt), self._runtime()
        for layer in dictionary_layers(d):
            x, source = position_vectors(loaded, self.config["data"]["train"], layer, d["positions"],
                                         self.config["study"]["seed"], d["train_limit"],
                                         self.config["extract"]["batch_size"], runtime["workers"], runtime["device"])
            for plan in (plan for plan in plans if plan.layer == layer):
                train_on_vectors(x, folder / plan.file, plan.settings, source,
                                 untrained_out=folder / plan.untrained_file if plan.untrained else None)

    def _score(self, acts, out, layers=None, **override):
        s = {**self.config["score"], **override}
        alpha, alpha_source = s["alpha"], ""
        if s["alpha_from"]:  # a `misbench calibrate --out` file: alpha with its provenance
            alpha, alpha_source = calibration_alpha(s["alpha_from"])
        settings = settings_from(ScoreSettings, {**s, **self._runtime()}, alpha=alpha, alpha_source=alpha_source,
                                 seed=self.config["study"]["seed"])
        renamed = {"metrics": "[dictionary] metrics"} if "metrics" in override else {}
        with config_wording(self._config_keys("score", **renamed)):
            score(acts, layers or s["layers"], settings, out, tasks_out=Path(out).with_name("tasks.h5"),
                  cache_dir=self.out / "cache" / "embeddings",
                  progress=(lambda stage, d, n: self.progress(f"{stage} {Path(out).parent.name}", d, n))
                  if self.progress else None,
                  overwrite=True)  # the manifest decides when a step's outputs are stale

    def write_runs_csv(self) -> Path:
        rows = []
        for run in self.runs:
            d = self.run_dir(run)
            epochs = 0 if not run.retrained else self.config["retrain"]["epochs"]
            ckpt = d / "model.pt" if run.name != "base" else (self.out / "base" / "model.pt")
            rows.append({"name": run.name, "method": run.method, "rate": run.rate, "schedule": run.schedule,
                         "epochs": epochs, "optimizer": run.optimizer or self.config["retrain"]["optimizer"],
                         "scores": f"runs/{run.name}/mis.csv", "eval": f"runs/{run.name}/eval.json",
                         "checkpoint": str(ckpt.relative_to(self.out)) if ckpt.exists() else ""})
        path = self.out / "runs.csv"
        write_csv(path, rows, ["name", "method", "rate", "schedule", "epochs", "optimizer", "scores", "eval", "checkpoint"])
        return path

    def _report(self):
        # reports load matplotlib: only when a study reports
        from ..reports.build import sweep

        cfg, d = self.config["report"], self.config["dictionary"]
        # the dictionaries' layers: neurons against features, all scored in dictionary/mis.csv
        scores = self.dictionary_paths()["scores"]
        plans = dictionary_grid(d, self.config["study"]["seed"]) if dictionary_layers(d) else []
        # the last layer's first dictionary (layers go in depth order: the deepest) in the sweep report's
        # comparison; a single dictionary: that one
        first = next(p for p in plans if p.layer == plans[-1].layer) if plans else None
        compare = [f"neurons={scores}:{first.layer}", f"features={scores}:{first.name}"] if plans else None
        # every dictionary layer by layer in report/dictionaries/ (a section of the report)
        sweep(self.write_runs_csv(), self.out / "report", self.config["study"]["seed"], baseline=cfg["baseline"],
              classwise_layer=cfg["classwise_layer"], units=cfg["units"],
              title=f"misbench study: {self.config['study']['name']}", compare_scores=compare,
              n_boot=self.config["score"]["n_boot"], dictionary_scores=scores,
              dictionary_pairs=self.dictionary_pairs() if plans else ())

    # -- execution ------------------------------------------------------------------------------------------------
    def _input_hashes(self, manifest: Manifest, step: Step, pending: bool) -> dict | None:
        hashes = {}
        for label, value in step.inputs.items():
            if isinstance(value, Path):
                if not value.exists():
                    if pending:
                        return None
                    raise MisbenchError(f"step {step.name}: input {value} is missing")
                hashes[label] = manifest.file_record(value)["sha256"]
            elif Path(value).is_file():  # a model file behind [model] spec: its content, not its name
                hashes[label] = f"model:{value}:sha256:{manifest.file_record(Path(value))['sha256']}"
            else:
                hashes[label] = f"model:{value}"
        for spec in dict.fromkeys(s for s in step.data if s):
            if Path(spec).is_dir():  # named datasets are fixed; a folder can be regenerated in place
                if spec not in self._fingerprints:
                    self._fingerprints[spec] = folder_fingerprint(spec)
                hashes[f"data:{spec}"] = f"folder:{self._fingerprints[spec]}"
        return hashes

    def plan(self) -> list[tuple[str, str]]:
        manifest = Manifest(self.out / "manifest.json")
        out, changed = [], set()
        self._fingerprints = {}  # each folder walked once per plan or run
        for step in self.steps:
            hashes = self._input_hashes(manifest, step, pending=True)
            upstream_changed = any(isinstance(v, Path) and v in changed for v in step.inputs.values())
            if hashes is not None and not upstream_changed and manifest.is_current(step.name, step_key(step.kind, step.settings, hashes)):
                out.append((step.name, "cached"))
            else:
                out.append((step.name, "run"))
                changed.update(step.outputs.values())
        return out

    def run(self, on_step: Callable[[str, str, int, int], None] | None = None) -> dict:
        """Run the steps in order; on_step(name, status, i, n) before each (status cached, run or resume)."""
        # the Slurm queries run only for a study that has jobs (studies/queue.py imports nothing heavy)
        from .queue import refuse_active_jobs

        with DirectoryLock(self.out):
            manifest = Manifest(self.out / "manifest.json")
            refuse_active_jobs(manifest.data, self.out)
            manifest.save(study=self.config["study"]["name"], config=self.config.raw, config_source=self.config.source)
            ran = []
            self._fingerprints = {}
            for i, step in enumerate(self.steps, 1):
                if self.run_step(manifest, step, lambda status: on_step and on_step(step.name, status, i, len(self.steps))):
                    ran.append(step.name)
            return {"ran": ran, "manifest": str(manifest.path), "report": str(self.out / "report" / "report.html")}

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise MisbenchError(f"the study has no step {name!r} (its steps: {', '.join(s.name for s in self.steps)})")

    def prepare_step(self, manifest: Manifest, step: Step) -> tuple[str, bool] | None:
        """(key, resume) of a step to run, None when the manifest holds its current outputs."""
        hashes = self._input_hashes(manifest, step, pending=False)
        key = step_key(step.kind, step.settings, hashes)
        if manifest.is_current(step.name, key):
            return None
        previous = manifest.entry(step.name) or {}
        return key, bool(step.partial and step.partial.exists() and previous.get("key") == key)

    def run_step(self, manifest: Manifest, step: Step, announce: Callable[[str], None] | None = None,
                 prepared: tuple[str, bool] | None = None, **record) -> bool:
        """Run one step and record it in the manifest (running, then done or failed); False when it was cached.
        Both executors run every step through here: the local one in a loop, a Slurm job for its own step.
        `prepared`: prepare_step's (key, resume) when the caller made it; `record`: further fields of the step's
        running record (the job's id, node and log)."""
        prepared = prepared or self.prepare_step(manifest, step)
        if prepared is None:
            announce and announce("cached")
            return False
        key, resume = prepared
        announce and announce("resume" if resume else "run")
        hashes = self._input_hashes(manifest, step, pending=False)
        t0 = time.time()
        manifest.record(step.name, kind=step.kind, key=key, status="running", started_utc=utc_now(),
                        settings=step.settings, error=None, traceback=None, finished_utc=None,
                        inputs={k: (manifest.file_record(v) if isinstance(v, Path) else {"model": v})
                                for k, v in step.inputs.items()},
                        data={k[5:]: v for k, v in hashes.items() if k.startswith("data:")}, **record)
        try:
            step.action(resume)
        except KeyboardInterrupt:
            manifest.record(step.name, status="interrupted", seconds=round(time.time() - t0, 2))
            raise
        except BaseException as err:
            manifest.record(step.name, status="failed", error=f"{type(err).__name__}: {err}",
                            traceback=traceback.format_exc(limit=5), seconds=round(time.time() - t0, 2))
            raise
        try:
            _verify_outputs(step)
        except MisbenchError as err:
            manifest.record(step.name, status="failed", error=str(err), seconds=round(time.time() - t0, 2))
            raise
        outputs = {k: manifest.file_record(v) for k, v in step.outputs.items()}
        manifest.record(step.name, status="done", outputs=outputs, finished_utc=utc_now(),
                        seconds=round(time.time() - t0, 2))
        return True


def _verify_outputs(step: Step) -> None:
    """A step is done only when its outputs read back: a complete activation file, a loadable checkpoint."""
    for label, path in step.outputs.items():
        if not path.is_file():
            raise MisbenchError(f"step {step.name} finished without writing its {label} {path}")
        if step.kind == "extract":
            open_activations(path).close()
        elif step.kind in ("train", "prune"):
            if "resume" in load_checkpoint_dict(path):
                raise MisbenchError(f"step {step.name}: {path} is an unfinished run's checkpoint")


def check_study_folder(out_dir, overwrite: bool = False) -> None:
    """A study folder is continued (its manifest redoes only what changed); any other non-empty folder is refused
    unless overwrite, so that a mistyped --out does not write a study into someone's data."""
    out = Path(out_dir)
    if overwrite or not out.is_dir() or (out / "manifest.json").exists() or not any(out.iterdir()):
        return
    raise MisbenchError(f"{option_label('out')}: {out} is a non-empty folder without a study's manifest.json; choose a "
                        f"new or study folder, or {overwrite_hint()} to write the study into it")


def run_study(config: StudyConfig, out_dir, dry_run: bool = False, on_step=None, progress=None) -> dict:
    if distributed.world()[1] > 1:
        raise MisbenchError("misbench study runs in one process: start it without torchrun, and run the "
                            "retraining of big grids as torchrun jobs of `misbench prune` (docs/reproducing.md)")
    study = Study(config, out_dir, progress=progress)
    if dry_run:
        return {"plan": study.plan()}
    return study.run(on_step)


def study_summary(out_dir) -> dict:
    """Per-run accuracy and mean MIS, the rate correlations and softmax MIS vs class accuracy, and the rows of
    report/dictionaries/dictionaries.csv (none without a dictionary), from a finished study."""
    out_dir = Path(out_dir)
    report = out_dir / "report"
    summary = json.loads((report / "summary.json").read_text())
    classwise = json.loads((report / "classwise_summary.json").read_text())
    paired = {}
    if (report / "paired.csv").exists():
        paired = {r["name"]: r for r in read_csv_rows(report / "paired.csv") if r["layer"] == "features"}
    runs = []
    for row in read_csv_rows(report / "sweep.csv"):
        cw = classwise.get(row["name"], {}).get("correlation_accuracy_mis_confidence", {})
        runs.append({**row, "r_acc_conf": cw.get("pearson_r"), "paired": paired.get(row["name"])})
    dictionaries = report / "dictionaries" / "dictionaries.csv"
    return {"runs": runs, "summary": summary, "report": str(report / "report.html"),
            "dictionaries": read_csv_rows(dictionaries) if dictionaries.exists() else []}

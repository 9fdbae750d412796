"""What `misbench study --dry-run` says before any GPU hour is spent: how many networks and steps, about how many
GPU hours at docs/reproducing.md's rates, and every data folder or weight file the study needs that is missing."""

__all__ = ["RATES", "study_estimate", "missing_inputs"]

import os
from pathlib import Path

from ..datasets.sources import NAMED_DATASETS, load_data
from ..errors import MisbenchError
from ..models.asset_table import stage_hint
from ..models.loading import model_input_file

# docs/reproducing.md's "Expected GPU hours" (GoogLeNet on one H100): images per second and seconds per network
RATES = {"train_images_per_s": 2750, "val_images_per_s": 2500, "extract_images_per_s": 50000 / 60,
         "score_s_per_network": 5 * 60}
# the torchvision weights behind each LPIPS backbone (similarity/lpips.py)
LPIPS_WEIGHTS = {"lpips-alex": "alexnet:IMAGENET1K_V1", "lpips-vgg": "vgg16:IMAGENET1K_V1",
                 "lpips-squeeze": "squeezenet1_1:IMAGENET1K_V1"}


def _count_images(spec: str | None, limit: int | None, cache: dict) -> int | None:
    """The images of DATA `spec` (None: it cannot be read here)."""
    if not spec:
        return 0
    if spec not in cache:
        if Path(spec).is_dir():  # a walk, as the plan's fingerprint does: no image is opened
            cache[spec] = sum(len(files) for _, _, files in os.walk(spec, followlinks=True))
        else:
            try:
                cache[spec] = len(load_data(spec))
            except MisbenchError:
                cache[spec] = None
    if cache[spec] is None:
        return None
    return min(cache[spec], limit) if limit else cache[spec]


def missing_inputs(config) -> list[str]:
    """One line per data folder or weight file the study reads that is not there, each naming its fix."""
    problems = []
    data = config["data"]
    for where, spec in (("[data] train", data["train"]), ("[data] val", data["val"]),
                        ("[extract] data", config["extract"]["data"])):
        if spec and spec not in NAMED_DATASETS and not Path(spec).is_dir():
            problems.append(f"config {where}: {spec} is not a folder: set it to your image folder (ImageFolder "
                            f"layout) or one of {', '.join(NAMED_DATASETS)}")
    spec = config["model"]["spec"]
    needed = [("[model] spec", spec)] if spec else []
    if config["score"]["similarity"] in LPIPS_WEIGHTS:
        needed.append(("[score] similarity", LPIPS_WEIGHTS[config["score"]["similarity"]]))
    for where, model in needed:
        file = model_input_file(model)
        if (file != model or ":" not in model) and not Path(file).is_file():
            problems.append(f"config {where}: {model} needs the weight file {file}, which is missing: put it there "
                            f"(docs/installation.md; {stage_hint(Path(file).name)})")
    return problems


def study_estimate(study, plan: dict) -> dict:
    """Networks, steps (to run, cached) and the GPU hours of the steps to run at RATES (None while a data folder
    it needs is missing)."""
    cfg, cache = study.config, {}
    train = _count_images(cfg["data"]["train"], cfg["retrain"]["train_limit"], cache)
    val = _count_images(cfg["data"]["val"], cfg["retrain"]["val_limit"], cache)
    images = _count_images(cfg["extract"]["data"] or cfg["data"]["val"], cfg["extract"]["limit"], cache)
    to_run = sum(1 for s in plan.values() if s == "run")
    counts = {"networks": len(study.runs), "steps": len(study.steps), "to_run": to_run,
              "cached": len(study.steps) - to_run, "train_images": train, "val_images": val}
    if None in (train, val, images):
        return {**counts, "gpu_hours": None}
    epoch = train / RATES["train_images_per_s"] + val / RATES["val_images_per_s"]
    seconds = 0.0
    for step in study.steps:
        if plan[step.name] != "run":
            continue
        if step.kind in ("train", "prune"):
            section = step.settings.get("retrain") or step.settings.get("train") or {}
            epochs = section.get("epochs", 0) * step.settings.get("run", {}).get("steps", 1)
            seconds += epochs * epoch
        elif step.kind == "eval":
            seconds += val / RATES["val_images_per_s"]
        elif step.kind == "extract":
            seconds += images / RATES["extract_images_per_s"]
        elif step.kind == "score":
            seconds += RATES["score_s_per_network"]
    return {**counts, "gpu_hours": seconds / 3600}

"""Produce pruned (or retrained) checkpoints: schedule, retraining, per-epoch checkpoints, resume."""

__all__ = ["produce_checkpoint", "partial_checkpoint_path", "check_training_data", "training_source"]

import logging
from pathlib import Path

import torch

from ..datasets.sources import ImageSource, data_folders, load_data
from ..errors import MisbenchError
from ..models.checkpoint import build_checkpoint, load_checkpoint_dict, save_checkpoint
from ..models.loading import LoadedModel, model_input_file
from ..runtime import distributed
from ..runtime.device import resolve_device
from ..runtime.fileio import flag_hint, refuse_existing
from ..runtime.outputs import writing
from ..runtime.interrupts import uninterruptible
from .masks import PruneSettings, apply_masks, compute_masks, default_exclude, keep_fraction, sparsity_of
from .training import Trainer, TrainSettings, data_subsets, subsets_record

log = logging.getLogger(__name__)


def check_training_data(train: TrainSettings, data) -> None:
    if train.epochs > 0 and (data is None or data == ""):
        raise MisbenchError("retraining needs training data: pass --data DATA (or --epochs 0 to prune only)")


def training_source(spec: str, num_classes: int | None, labels: str, categories=None) -> ImageSource:
    """DATA of training or validation: class folders mapped to the model's classes; unlabelled images refused."""
    found = load_data(spec, num_classes, labels, categories)
    if getattr(getattr(found, "label_map", None), "mapping", "") == "unlabelled":
        raise MisbenchError(f"{spec} is a folder of images without class folders (unlabelled): training and "
                            "validation need one sub-folder of images per class")
    return found


def partial_checkpoint_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _differences(ckpt: dict, pruning: dict | None, training: dict, parent: dict) -> list[str]:
    """What differs between a checkpoint's recorded run and the run asked for (achieved sparsity, population, history
    are results, not settings)."""
    def settings(record):
        return {k: v for k, v in (record or {}).items()
                if k not in ("achieved_sparsity", "population", "history", "subsets")}

    found = []
    for label, old, new in (("pruning", ckpt.get("pruning"), pruning), ("training", ckpt.get("training"), training),
                            ("parent", ckpt.get("parent"), parent)):
        old, new = settings(old), settings(new)
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                found.append(f"{label}.{key} was {old.get(key)!r}, now {new.get(key)!r}")
    return found


def _is_result_of(path: Path, asked: tuple) -> bool:
    try:
        ckpt = load_checkpoint_dict(path)
    except MisbenchError:
        return False
    return "resume" not in ckpt and not _differences(ckpt, *asked)


def produce_checkpoint(loaded: LoadedModel, prune: PruneSettings | None, train: TrainSettings, out,
                       data: str | None = None, val_data: str | None = None, resume: bool = False,
                       overwrite: bool = False, progress=None) -> Path:
    """Prune `loaded` by `prune` (None: retrain only) with train.epochs of retraining after each step.

    Under torchrun: data-parallel retraining (DDP); masks are rank 0's on every rank; rank 0 writes.
    """
    out = Path(out)
    partial = partial_checkpoint_path(out)
    with writing({"--out": out, "its .partial": partial}, {"MODEL": model_input_file(loaded.spec)},
                 "misbench prune or retrain", data_folders({"--data": data, "--val-data": val_data})):
        return _produce(loaded, prune, train, out, partial, data, val_data, resume, overwrite, progress)


def _produce(loaded, prune, train, out: Path, partial: Path, data, val_data, resume, overwrite, progress) -> Path:
    distributed.ensure_initialized(resolve_device(train.device))
    main = distributed.is_main()
    model = loaded.model
    exclude = tuple(prune.exclude) if prune and prune.exclude is not None else default_exclude(loaded.arch, model)
    parent = {"model": loaded.spec, "sha256": loaded.sha256}
    base_pruning = (loaded.checkpoint or {}).get("pruning")
    asked = (prune.record(exclude, None) if prune else base_pruning, train.record(), parent)
    if resume and out.exists() and partial.exists() and _is_result_of(out, asked):
        # killed after the final rename, before the .partial was removed: the run is complete
        log.info("%s is complete; removing the leftover %s", out, partial)
        partial.unlink(missing_ok=True)
        return out
    refuse_existing({"out": out}, overwrite)
    if partial.exists() and not (resume or overwrite):
        raise MisbenchError(f"an interrupted run left {partial}: pass {flag_hint('resume')} to continue it or "
                            f"{flag_hint('overwrite')} to restart")
    check_training_data(train, data)

    def source(spec):
        if spec is None or isinstance(spec, ImageSource):  # None, or read before the model loaded (api)
            return spec
        return training_source(spec, loaded.num_classes, train.labels, loaded.categories)

    train_source, val_source = source(data), source(val_data)
    subsets = data_subsets(train, train_source, val_source)  # once: a limit's warning is said once
    taken = subsets_record(subsets)  # recorded in the checkpoint's training record when a limit took a subset
    steps = prune.steps if prune else 1
    masks = {k: v.clone() for k, v in loaded.masks.items()}
    history, start_step, start_epoch, trainer_state = [], 1, 0, None
    if resume and partial.exists():
        ckpt = load_checkpoint_dict(partial)
        differences = _differences(ckpt, *asked)
        if differences:
            raise MisbenchError(f"cannot resume {partial}: it was started with other settings ({'; '.join(differences)}). "
                                "Rerun the original command with --resume, or start again with --overwrite.")
        model.load_state_dict(ckpt["state_dict"])
        masks, history = ckpt["masks"], ckpt["training"]["history"]
        start_step, start_epoch, trainer_state = ckpt["resume"]["step"], ckpt["resume"]["epoch"], ckpt["resume"]["trainer"]
        log.info("resuming %s at step %d, epoch %d", partial, start_step, start_epoch)
    def record():
        if prune:
            return prune.record(exclude, sparsity_of(masks), masks)
        return base_pruning

    for step in range(start_step, steps + 1):
        if prune and not (trainer_state is not None and step == start_step):
            generator = torch.Generator().manual_seed(prune.seed * 1000 + step)
            masks = {**masks, **compute_masks(model, prune, keep_fraction(prune.rate, step, steps), exclude, masks, generator)}
            masks = distributed.broadcast_object({k: v.cpu() for k, v in masks.items()})
            apply_masks(model, masks)
            log.info("step %d/%d: sparsity %.4f", step, steps, sparsity_of(masks))
        torch.manual_seed(train.seed * 1000 + step)
        trainer = Trainer(model, masks, train, loaded.preprocess, train_source, val_source, stream=step,
                          subsets=subsets) if train_source or val_source else None
        first_epoch = 0
        if trainer_state is not None and step == start_step:
            trainer.load_state_dict(trainer_state)
            first_epoch = start_epoch
        elif trainer is not None and val_source is not None:
            history.append({"step": step, "epoch": 0, "train_loss": None, "val_top1": trainer.validate()})
        for epoch in range(first_epoch, train.epochs):
            loss = trainer.train_epoch(progress=(lambda d, n: progress(step, epoch + 1, d, n)) if progress else None)
            history.append({"step": step, "epoch": epoch + 1, "train_loss": loss, "val_top1": trainer.validate()})
            log.info("step %d epoch %d: loss %.4f val_top1 %s", step, epoch + 1, loss, history[-1]["val_top1"])
            training = {**train.record(), **taken, "history": history}
            resume_state = {"step": step, "epoch": epoch + 1, "trainer": trainer.state_dict()}
            if epoch + 1 == train.epochs:  # the step is done: the next one starts fresh
                resume_state = {"step": step + 1, "epoch": 0, "trainer": None}
            if main:
                save_checkpoint(build_checkpoint(loaded, model, masks, record(), training, parent, resume_state), partial)
            distributed.barrier()
        trainer_state = None
    if main:
        final = build_checkpoint(loaded, model, masks, record(), {**train.record(), **taken, "history": history}, parent)
        with uninterruptible():  # a stop lands before the rename or after the clean-up
            save_checkpoint(final, out)
            partial.unlink(missing_ok=True)
    distributed.barrier()
    return out

"""Top-1/top-5 and class-wise accuracy (DESIGN §5), from a model or from stored logits."""

__all__ = ["EvalSettings", "accuracy_from_logits", "evaluate_model", "evaluate_acts", "write_eval"]

import csv
import dataclasses
import logging

import numpy as np
import torch

from ..datasets.folders import UNLABELLED
from ..datasets.labels import labels_setting
from ..datasets.sources import TransformedDataset, load_data
from ..datasets.subset import first_images
from ..errors import MisbenchError
from ..models.loading import LoadedModel
from ..models.preprocess import build_transform
from ..runtime.device import (batch_size_setting, device_setting, make_loader, precision, prepare_model,
                              resolve_device, to_device, workers_setting)
from ..runtime.fileio import atomic_path, write_json
from ..runtime.schema import setting, validate
from .store import open_activations

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The forward pass of `eval` (evaluate_model's keywords)."""

    batch_size: int = batch_size_setting()
    workers: int | None = workers_setting()
    device: str = device_setting()
    limit: int | None = setting(None, low=1, help="Only the first N images (a forward pass over DATA only).")
    labels: str = labels_setting()

    def __post_init__(self):
        validate(self)


def accuracy_from_logits(logits: np.ndarray, labels: np.ndarray, class_names=None) -> dict:
    """Class-wise accuracy is the recall of each class: correct top-1 among its images."""
    logits, labels = np.asarray(logits), np.asarray(labels).astype(np.int64)
    if (labels == UNLABELLED).any():
        raise MisbenchError("the images are unlabelled (a folder of images without class folders): accuracy and "
                            "class reports need one sub-folder of images per class; MIS (score) needs no labels")
    n_classes = logits.shape[1]
    k = min(5, n_classes)
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    correct1 = topk[:, 0] == labels
    correct5 = (topk == labels[:, None]).any(axis=1)
    names = list(class_names or [])
    per_class = []
    for c in range(n_classes):
        members = labels == c
        n = int(members.sum())
        per_class.append({
            "class": c, "name": names[c] if c < len(names) else str(c), "n": n,
            "accuracy": float(correct1[members].mean()) if n else None,
        })
    return {"top1": float(correct1.mean()), "top5": float(correct5.mean()), "n_images": int(len(labels)),
            "per_class": per_class}


def evaluate_model(loaded: LoadedModel, data: str, batch_size: int = 64, workers: int | None = None,
                   device: str = "auto", limit: int | None = None, progress=None, labels: str = "auto",
                   limit_name: str = "limit") -> dict:
    """`limit_name`: the setting the limit came from (a study's eval: val_limit), as warned and recorded."""
    source = load_data(data, loaded.num_classes, labels, loaded.categories) if isinstance(data, str) else data
    dev = resolve_device(device)
    model = prepare_model(loaded.model, dev).eval()
    pre = loaded.preprocess
    subset = first_images(source, limit, limit_name)
    total = subset.images
    dataset = TransformedDataset(source, build_transform(pre), (3, pre.crop, pre.crop), 0, total)
    logits, labels, done = [], [], 0
    with torch.inference_mode(), precision(dev, amp=False):
        for x, y, _index, ok in make_loader(dataset, batch_size, workers, dev):
            if not ok.all():
                bad = [source.path(int(i)) for i, good in zip(_index, ok) if not good]
                raise MisbenchError(f"unreadable images: {', '.join(bad)}")
            out = model(to_device(x, dev))
            logits.append((out[0] if isinstance(out, (tuple, list)) else out).float().cpu().numpy())
            labels.append(y.numpy())
            done += len(y)
            if progress:
                progress(done, total)
    result = accuracy_from_logits(np.concatenate(logits), np.concatenate(labels), source.classes)
    result.update(model=loaded.spec, data=source.spec, checkpoint_sha256=loaded.sha256,
                  label_warning=getattr(getattr(source, "label_map", None), "warning", ""))
    if subset.record():  # the images a limit took and the classes they cover
        result["subset"] = subset.record()
    return result


def evaluate_acts(path) -> dict:
    with open_activations(path) as acts:
        result = accuracy_from_logits(acts.logits, acts.labels, acts.class_names)
        result.update(model=str(acts.attrs["model"]), data=str(acts.attrs["data"]), acts=str(path),
                      label_warning=str(acts.attrs.get("label_warning", "")))
    if result["label_warning"]:
        log.warning("%s (recorded in %s)", result["label_warning"], path)
    return result


def write_eval(result: dict, out, classwise_csv=None) -> None:
    write_json(out, result)
    if classwise_csv:
        with atomic_path(classwise_csv) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["class", "name", "n", "accuracy"])
            writer.writeheader()
            for row in result["per_class"]:
                writer.writerow({**row, "accuracy": "" if row["accuracy"] is None else row["accuracy"]})

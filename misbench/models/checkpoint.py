"""The misbench checkpoint (DESIGN §6): a plain dict of tensors and primitives, weights_only-loadable."""

__all__ = ["CHECKPOINT_FORMAT", "build_checkpoint", "save_checkpoint", "load_checkpoint_dict", "is_checkpoint",
           "read_checkpoint"]

from pathlib import Path

import torch
from torch import nn

from ..errors import MisbenchError
from ..runtime.fileio import atomic_path, utc_now
from ..version import __version__
from .archs import build_arch, load_state
from .preprocess import IMAGENET_PREPROCESS, Preprocess

CHECKPOINT_FORMAT = "misbench-checkpoint"


def build_checkpoint(loaded, model: nn.Module, masks: dict, pruning: dict | None, training: dict,
                     parent: dict, resume: dict | None = None) -> dict:
    """The checkpoint of `model` pruned/trained from `loaded` (a loading.LoadedModel: its arch, arch_kwargs,
    num_classes and preprocess are recorded)."""
    # plain CPU tensors in the standard layout, whatever device and memory format training used
    state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
             for k, v in model.state_dict().items()}
    ckpt = {
        "format": CHECKPOINT_FORMAT, "version": 1, "misbench_version": __version__,
        "arch": loaded.arch, "arch_kwargs": dict(loaded.arch_kwargs), "num_classes": loaded.num_classes,
        "state_dict": state, "masks": {k: v.cpu().bool() for k, v in masks.items()},
        "pruning": pruning, "training": training, "parent": parent, "created_utc": utc_now(),
        "preprocess": loaded.preprocess.to_dict(),
    }
    if resume is not None:
        ckpt["resume"] = resume
    return ckpt


def save_checkpoint(ckpt: dict, path) -> Path:
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)


def load_checkpoint_dict(path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MisbenchError(f"cannot read checkpoint {path}: {err}") from None
    if not is_checkpoint(ckpt):
        raise MisbenchError(f"{path} is not a misbench checkpoint")
    return ckpt


def is_checkpoint(obj) -> bool:
    """Whether a loaded torch file holds a misbench checkpoint (its `format` says so)."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def read_checkpoint(obj: dict, spec: str) -> tuple[nn.Module, dict, Preprocess]:
    """The network a checkpoint holds (built, its weights and masks checked; in eval mode), its record without
    the state_dict (provenance, masks, pruning, training) and its preprocessing."""
    _check_checkpoint(obj, spec)
    model = build_arch(obj["arch"], obj["num_classes"], obj.get("arch_kwargs"))
    load_state(model, obj["state_dict"], spec)
    _check_masks(model, obj.get("masks") or {}, spec)
    record = {k: v for k, v in obj.items() if k != "state_dict"}
    pre = Preprocess.from_dict(obj["preprocess"]) if obj.get("preprocess") else IMAGENET_PREPROCESS
    return model.eval(), record, pre


def _check_checkpoint(obj: dict, spec: str) -> None:
    """A misbench checkpoint that can be built: finished (not an OUT.partial of an interrupted run), with
    its arch, classes and tensors."""
    if "resume" in obj or spec.endswith(".partial"):
        raise MisbenchError(f"{spec} is the checkpoint of an unfinished run (its .partial): finish it with the same "
                            "`misbench prune`/`retrain` command and --resume, and use the checkpoint it writes")
    missing = [k for k in ("arch", "num_classes", "state_dict") if k not in obj]
    if missing:
        raise MisbenchError(f"{spec} is a damaged misbench checkpoint: it has no {', '.join(missing)}")
    if not isinstance(obj["state_dict"], dict):
        raise MisbenchError(f"{spec} is a damaged misbench checkpoint: its state_dict is a "
                            f"{type(obj['state_dict']).__name__}, not a dict of tensors")


def _check_masks(model: nn.Module, masks: dict, spec: str) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise MisbenchError(f"{spec} has a mask for {name!r}, which its {type(model).__name__} does not have")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise MisbenchError(f"{spec}: the mask of {name} has shape {tuple(mask.shape)}, the weight "
                                f"{tuple(params[name].shape)}; the checkpoint is damaged")

"""The misbench checkpoint (DESIGN §6): a plain dict of tensors and primitives, weights_only-loadable."""

__all__ = ["CHECKPOINT_FORMAT", "build_checkpoint", "save_checkpoint", "load_checkpoint_dict"]

from pathlib import Path

import torch

from ..errors import MisbenchError
from ..runtime.fileio import atomic_path, utc_now
from ..version import __version__
from .loading import CHECKPOINT_FORMAT, LoadedModel


def build_checkpoint(loaded: LoadedModel, model: torch.nn.Module, masks: dict, pruning: dict | None, training: dict,
                     parent: dict, resume: dict | None = None) -> dict:
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
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MisbenchError(f"{path} is not a misbench checkpoint")
    return ckpt

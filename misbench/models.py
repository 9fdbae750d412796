"""Load any MODEL string (DESIGN §3) into an nn.Module with its provenance."""

__all__ = ["LoadedModel", "load_model", "torchvision_weights", "hub_checkpoint_path", "load_torch_file"]

import dataclasses
import logging
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from .archs import build_arch, default_preprocess
from .errors import MisbenchError
from .fileio import sha256_file
from .preprocess import IMAGENET_PREPROCESS, Preprocess

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "misbench-checkpoint"


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    spec: str
    arch: str
    arch_kwargs: dict
    num_classes: int
    preprocess: Preprocess
    sha256: str = ""
    checkpoint: dict | None = None  # the misbench checkpoint record without state_dict

    @property
    def masks(self) -> dict:
        return (self.checkpoint or {}).get("masks") or {}


def hub_checkpoint_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def torchvision_weights(arch: str, weights_name: str):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError) as err:
        raise MisbenchError(f"torchvision has no weights for {arch!r}: {err}") from None
    if weights_name == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights_name]
    except KeyError:
        raise MisbenchError(
            f"unknown weights {weights_name!r} for {arch!r}: expected DEFAULT or one of "
            f"{[w.name for w in enum]}"
        ) from None


def _weights_state_dict(weights) -> dict:
    target = hub_checkpoint_path(weights.url)
    if not target.exists():
        log.info("weights %s not in the hub cache; trying to download %s", target.name, weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as err:  # offline: URLError, socket errors, HTTP errors
        raise MisbenchError(
            f"weights file {target.name} is not in the torch hub cache and could not be downloaded "
            f"({type(err).__name__}: {err}). Put the file at {target} (download it from {weights.url} "
            f"on a machine with internet), or run `misbench assets stage` for the assets misbench "
            f"can stage offline."
        ) from None


def _preprocess_of(weights) -> Preprocess:
    t = weights.transforms()
    return Preprocess(int(t.resize_size[0]), int(t.crop_size[0]), tuple(t.mean), tuple(t.std))


def _from_torchvision(spec: str, num_classes: int | None) -> LoadedModel:
    arch, _, weights_name = spec.partition(":")
    if not weights_name:
        model = build_arch(arch, num_classes or 1000)
        kwargs = {"aux_logits": False, "transform_input": False} if arch == "googlenet" else {}
        return LoadedModel(model, spec, arch, kwargs, num_classes or 1000, default_preprocess(arch))
    weights = torchvision_weights(arch, weights_name)
    n = len(weights.meta["categories"])
    if num_classes not in (None, n):
        raise MisbenchError(f"{spec} has {n} classes, but --num-classes {num_classes} was given")
    kwargs = {}
    if arch == "googlenet":
        # torchvision's GoogLeNet weights were converted from the original, which expects
        # transform_input; they carry no trained aux heads.
        kwargs = {"aux_logits": False, "transform_input": True}
    model = build_arch(arch, n, kwargs)
    _load_state(model, _weights_state_dict(weights), spec)
    return LoadedModel(model, spec, arch, kwargs, n, _preprocess_of(weights), sha256="")


def _load_state(model: nn.Module, state: dict, source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def cut(items):
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {cut(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {cut(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches (file vs model): {cut(shapes)}")
        raise MisbenchError(
            f"{source} does not fit the architecture {type(model).__name__}: " + "; ".join(parts)
            + ". Check --arch and --num-classes."
        )
    model.load_state_dict(state)


def load_torch_file(path, trust_pickle: bool = False):
    """torch.load with weights_only=True; whole pickles only when the user trusts the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise MisbenchError(
                f"{path} is a pickled Python object, not plain tensors ({str(err).splitlines()[0]}). "
                "Loading it can run arbitrary code; pass --trust-pickle only if you trust its origin."
            ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise MisbenchError(f"cannot read {path} as a torch file: {err}") from None
    log.warning("loading %s as a trusted pickle", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _googlenet_kwargs(state: dict, given: dict) -> dict:
    kwargs = dict(given)
    kwargs.setdefault("aux_logits", any(k.startswith("aux1.") for k in state))
    # state dicts descending from the ImageNet weights expect transform_input
    kwargs.setdefault("transform_input", True)
    return kwargs


def _unwrap_state(obj) -> dict | None:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return _unwrap_state(obj[key])
    return None


def load_model(spec: str, arch: str | None = None, num_classes: int | None = None,
               trust_pickle: bool = False, arch_kwargs: dict | None = None) -> LoadedModel:
    """Resolve MODEL: torchvision `name[:weights]`, misbench checkpoint, state_dict (+arch), or pickle."""
    path = Path(spec)
    if not path.exists():
        if "/" in spec or spec.endswith((".pt", ".pth", ".ckpt")):
            raise MisbenchError(f"model file {spec} does not exist")
        if arch is not None:
            raise MisbenchError("--arch is only for plain state_dict files; MODEL is a torchvision name here")
        return _from_torchvision(spec, num_classes)
    sha = sha256_file(path)
    obj = load_torch_file(path, trust_pickle)
    if isinstance(obj, nn.Module):
        obj.eval()
        name = arch or type(obj).__name__.lower()
        n = num_classes or _infer_classes(obj)
        return LoadedModel(obj, spec, name, {}, n, IMAGENET_PREPROCESS, sha)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        model = build_arch(obj["arch"], obj["num_classes"], obj.get("arch_kwargs"))
        _load_state(model, obj["state_dict"], spec)
        record = {k: v for k, v in obj.items() if k != "state_dict"}
        pre = Preprocess.from_dict(obj["preprocess"]) if obj.get("preprocess") else IMAGENET_PREPROCESS
        return LoadedModel(model.eval(), spec, obj["arch"], dict(obj.get("arch_kwargs") or {}),
                           obj["num_classes"], pre, sha, record)
    state = _unwrap_state(obj)
    if state is None:
        raise MisbenchError(f"{spec} holds neither a misbench checkpoint nor a state_dict of tensors")
    if arch is None:
        raise MisbenchError(f"{spec} is a plain state_dict: pass --arch NAME (and --num-classes if not 1000)")
    if num_classes is None:
        num_classes = _infer_classes_from_state(state) or 1000
    kwargs = _googlenet_kwargs(state, arch_kwargs or {}) if arch == "googlenet" else dict(arch_kwargs or {})
    model = build_arch(arch, num_classes, kwargs)
    _load_state(model, state, spec)
    return LoadedModel(model.eval(), spec, arch, kwargs, num_classes, default_preprocess(arch), sha)


def _infer_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 0


def _infer_classes_from_state(state: dict) -> int | None:
    for key in ("fc.weight", "classifier.weight", "classifier.1.weight", "classifier.6.weight", "head.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None

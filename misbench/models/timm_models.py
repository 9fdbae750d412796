"""timm architectures (optional extra `misbench[timm]`): arch names `timm.NAME` build timm.create_model(NAME).

Only randomly initialised timm networks are built here (`timm.NAME:random`, or `--arch timm.NAME` for a
state_dict file, or a misbench checkpoint of one): timm's pretrained weights come from the Hugging Face hub,
which misbench does not read (its files are read with weights_only=True from local paths only).
"""

__all__ = ["TIMM_PREFIX", "build_timm", "timm_preprocess"]

import math

from torch import nn

from ..errors import MisbenchError, close_matches
from .families import Family, register_family
from .preprocess import Preprocess

TIMM_PREFIX = "timm."

def _timm(name: str):
    try:
        import timm
    except ImportError:
        raise MisbenchError(f"architecture {name!r} is a timm model, but timm is not installed: "
                            "pip install 'misbench[timm]'") from None
    model_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(model_name):
        raise MisbenchError(f"unknown timm architecture {model_name!r} (from {name!r})."
                            f"{close_matches(model_name, timm.list_models())}")
    return timm, model_name


def build_timm(name: str, num_classes: int, arch_kwargs: dict | None = None) -> nn.Module:
    """A randomly initialised timm model `timm.NAME` with `num_classes` outputs."""
    timm, model_name = _timm(name)
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **dict(arch_kwargs or {}))
    except TypeError as err:
        raise MisbenchError(f"timm's {model_name} refuses --arch-kwargs {arch_kwargs}: {err}") from None


def timm_preprocess(name: str) -> Preprocess:
    """The preprocessing of the model's default timm config: crop = input size, resize = crop / crop_pct."""
    timm, model_name = _timm(name)
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:  # a model without any pretrained config: timm's defaults
        return Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    size = int(cfg.input_size[-1])
    crop_pct = cfg.crop_pct or 0.875
    return Preprocess(int(math.floor(size / crop_pct)), size, tuple(cfg.mean), tuple(cfg.std))


register_family(TIMM_PREFIX, Family("timm", build_timm, timm_preprocess,
                                    why_random="timm's pretrained weights come from the Hugging Face hub, which "
                                               "misbench does not read"))

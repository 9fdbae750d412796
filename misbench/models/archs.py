"""Architectures by name: every torchvision classifier plus misbench's own small ones."""

__all__ = ["MiniInception", "TinyCNN", "build_arch", "arch_names", "own_archs", "check_arch", "register_arch",
           "default_preprocess", "load_state"]

from typing import Callable

import torch
from torch import nn

from ..errors import MisbenchError, close_matches
from ..registry import register
from . import timm_models  # noqa: F401  (each model family registers itself on import)
from .families import family_of
from .preprocess import IMAGENET_PREPROCESS, Preprocess

_ARCHS: dict[str, Callable[..., nn.Module]] = {}
_PREPROCESS: dict[str, Preprocess] = {}
SMALL_IMAGES = Preprocess(32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def register_arch(name: str, preprocess: Preprocess | None = None):
    def decorate(builder):
        register(_ARCHS, name, builder, "architecture")
        if preprocess is not None:
            _PREPROCESS[name] = preprocess
        return builder

    return decorate


def default_preprocess(name: str) -> Preprocess:
    """What an untrained `name` expects: misbench's small archs 32 px, a model family's (timm: its timm
    config's) its family's, everything else ImageNet's."""
    family = family_of(name)
    if family is not None:
        return family.preprocess(name)
    return _PREPROCESS.get(name, IMAGENET_PREPROCESS)


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU, named like torchvision's BasicConv2d."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """GoogLeNet's block in miniature: parallel 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.branch1 = ConvBN(cin, c1, 1)
        self.branch2 = nn.Sequential(ConvBN(cin, c3r, 1), ConvBN(c3r, c3, 3))
        self.branch3 = nn.Sequential(ConvBN(cin, c5r, 1), ConvBN(c5r, c5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBN(cin, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class MiniInception(nn.Module):
    """A GoogLeNet in miniature for 28-64 px images: stem, three inception blocks, classifier."""

    def __init__(self, num_classes: int = 10, width: int = 16, dropout: float = 0.2):
        super().__init__()
        w = width
        self.conv1 = ConvBN(3, w, 3)
        self.pool1 = nn.MaxPool2d(2)
        self.inception3a = Inception(w, w // 2, w // 2, w, w // 4, w // 2, w // 2)
        c = self.inception3a.out_channels
        self.inception3b = Inception(c, w, w // 2, w, w // 4, w // 2, w // 2)
        c = self.inception3b.out_channels
        self.pool2 = nn.MaxPool2d(2)
        self.inception4a = Inception(c, w, w, 2 * w, w // 4, w // 2, w // 2)
        c = self.inception4a.out_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


class TinyCNN(nn.Module):
    """Two convolutions and a classifier, without BatchNorm or dropout: a per-sample-independent model
    whose data-parallel training equals one-process training exactly (used to test DDP)."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


@register_arch("tiny_cnn", SMALL_IMAGES)
def _tiny_cnn(num_classes: int = 10, **kwargs) -> nn.Module:
    return TinyCNN(num_classes=num_classes, **kwargs)


@register_arch("mini_inception", SMALL_IMAGES)
def _mini_inception(num_classes: int = 10, **kwargs) -> nn.Module:
    return MiniInception(num_classes=num_classes, **kwargs)


def _torchvision_names() -> list[str]:
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def arch_names() -> list[str]:
    return sorted(set(_ARCHS) | set(_torchvision_names()))


def own_archs() -> list[str]:
    """misbench's own architectures (no pretrained weights exist for them)."""
    return sorted(_ARCHS)


def check_arch(name: str) -> None:
    if family_of(name) is not None:  # checked by its family when built (timm: against timm's registry)
        return
    if name not in _ARCHS and name not in _torchvision_names():
        raise MisbenchError(
            f"unknown architecture {name!r}: expected a torchvision classification model, "
            f"timm.NAME (a timm model, with misbench[timm]) or one of {sorted(_ARCHS)}.{close_matches(name, arch_names())}"
        )


def build_arch(name: str, num_classes: int, arch_kwargs: dict | None = None) -> nn.Module:
    """A randomly initialised `name` with `num_classes` outputs (weights are loaded separately)."""
    kwargs = dict(arch_kwargs or {})
    if name in _ARCHS:
        return _ARCHS[name](num_classes=num_classes, **kwargs)
    family = family_of(name)
    if family is not None:
        return family.build(name, num_classes, kwargs)
    check_arch(name)
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    import torchvision

    if name == "googlenet":
        kwargs.setdefault("init_weights", False)
        kwargs.setdefault("aux_logits", False)
    if name.startswith("inception_v3"):
        kwargs.setdefault("init_weights", False)
        kwargs.setdefault("aux_logits", False)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def load_state(model: nn.Module, state: dict, source: str) -> None:
    """`state` into `model`, refused with every missing, unexpected and mis-shaped key named (of `source`)."""
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

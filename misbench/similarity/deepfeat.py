"""Uncalibrated deep features of any torchvision ImageNet model, compared by cosine distance.

Each stage's features are unit-normalised per position (as LPIPS) and weighted by 1/sqrt(H W) so every
stage counts equally; the concatenation is compared by cosine distance, 1 - cos(a, b), as DreamSim
compares its embeddings. Distances then lie in [0, 2] with DreamSim's scale, whatever the model, and
the sigmoid slope alpha is derived the same way for both (docs/mis.md).
"""

__all__ = ["DeepFeatBackend", "stage_taps"]

import torch
from torch import nn

from ..errors import MisbenchError
from ..models.loading import hub_checkpoint_path, pretrained_torchvision, torchvision_weights
from ..models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from .base import Backend, register_backend
from .features import layer_embedding


def stage_taps(stages: nn.Sequential, image_size: int) -> list[int]:
    """Indices of the last module at each spatial resolution (the end of each stage)."""
    x = torch.zeros(1, 3, image_size, image_size)
    sizes = []
    with torch.no_grad():
        for module in stages:
            x = module(x)
            sizes.append(tuple(x.shape[2:]) if x.dim() == 4 else None)
    taps = [k for k in range(len(sizes)) if sizes[k] is not None and (k + 1 == len(sizes) or sizes[k + 1] != sizes[k])]
    return taps


def _stages(model: nn.Module) -> nn.Sequential:
    if hasattr(model, "features") and isinstance(model.features, nn.Sequential):
        return model.features
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    if all(hasattr(model, n) for n in names):
        return nn.Sequential(*[getattr(model, n) for n in names])
    raise MisbenchError(f"deepfeat: cannot find convolutional stages in {type(model).__name__}; "
                        "use a model with a `features` Sequential (VGG, MobileNet, EfficientNet, ...) or a ResNet")


def _choose_weights(arch: str, weights: str | None):
    """The named weights, else the first of the model's weights already in the hub cache (DEFAULT first)."""
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    import torchvision

    if weights:
        return torchvision_weights(arch, weights)
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise MisbenchError(f"deepfeat:{arch}: torchvision has no pretrained weights for {arch!r}") from None
    for candidate in [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]:
        if hub_checkpoint_path(candidate.url).exists():
            return candidate
    return enum.DEFAULT


@register_backend("deepfeat:", hint="torchvision model")
class DeepFeatBackend(Backend):
    family = "deepfeat"
    default_alpha = 8.8  # median rule (ln 3 / median |delta| on the demo control's tasks, `calibrate --derive`)

    def __init__(self, spec: str, image_size: int = 64, model: nn.Module | None = None):
        super().__init__()
        arch, _, weights = spec.partition(":")
        self.image_size = image_size
        if model is None:
            w = _choose_weights(arch, weights or None)
            weights = w.name
            model = pretrained_torchvision(arch, w)
        self.name = f"deepfeat:{arch}" + (f":{weights}" if weights else "")
        self.stages = _stages(model).eval()
        self.taps = stage_taps(self.stages, image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def _features(self, images):
        h, feats = (images - self.mean) / self.std, []
        for k, module in enumerate(self.stages[: self.taps[-1] + 1]):
            h = module(h)
            if k in self.taps:
                feats.append(h)
        return feats

    def _concat(self, images):
        return torch.cat([layer_embedding(f.float(), None) for f in self._features(images)], 1)

    @torch.no_grad()
    def embed(self, images):
        """Unit vectors / sqrt(2): their squared L2 distance is the cosine distance."""
        e = self._concat(images)
        return e / (e.norm(dim=1, keepdim=True) * 2 ** 0.5)

    @torch.no_grad()
    def pair_distance(self, x, y):
        return 1 - torch.nn.functional.cosine_similarity(self._concat(x), self._concat(y), dim=1)

"""LPIPS v0.1 (alex, vgg, squeeze) as exact embeddings.

Trunks are torchvision's ImageNet networks cut where the lpips package cuts them; the
linear heads are the lpips package's calibrated weights.
"""

__all__ = ["LpipsBackend", "TRUNKS"]

import os

import torch
from torch import nn

from ..errors import MisbenchError
from ..models.loading import pretrained_torchvision, torchvision_weights
from .base import Backend, register_backend
from .features import layer_distance, layer_embedding

# torchvision `features` indices that end each LPIPS slice (as in the lpips package)
TRUNKS = {
    "alex": ("alexnet", (2, 5, 8, 10, 12)),
    "vgg": ("vgg16", (4, 9, 16, 23, 30)),
    "squeeze": ("squeezenet1_1", (2, 5, 8, 10, 11, 12, 13)),
}
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def _lpips_heads(net: str) -> list[torch.Tensor]:
    try:
        # only LPIPS' heads need the package; its absence is a clear error below
        import lpips
    except ImportError:
        raise MisbenchError("the lpips package is not installed: pip install lpips") from None
    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    heads = [state[f"lin{k}.model.1.weight"].flatten().float() for k in range(len(TRUNKS[net][1]))]
    for k, w in enumerate(heads):
        # non-negative heads are what makes LPIPS a squared Euclidean distance
        if (w < 0).any():
            raise MisbenchError(f"lpips head lin{k} of {net} has negative weights; LPIPS is not an embedding then")
    return heads


def _trunk(net: str, pretrained: bool) -> nn.Sequential:
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    import torchvision

    arch, cuts = TRUNKS[net]
    if pretrained:
        model = pretrained_torchvision(arch, torchvision_weights(arch, "IMAGENET1K_V1"))
    else:
        model = torchvision.models.get_model(arch, weights=None)
    return model.features[: cuts[-1]]


class LpipsBackend(Backend):
    family = "lpips"
    default_alpha = 20.0  # placed by hand: LPIPS' weights are not available offline to derive it

    def __init__(self, net: str = "alex", image_size: int = 64, trunk: nn.Sequential | None = None,
                 pretrained: bool = True):
        super().__init__()
        self.name, self.net, self.image_size = f"lpips-{net}", net, image_size
        self.cuts = TRUNKS[net][1]
        self.trunk = (trunk if trunk is not None else _trunk(net, pretrained)).eval()
        for k, w in enumerate(_lpips_heads(net)):
            self.register_buffer(f"head{k}", w)
        self.register_buffer("shift", SHIFT.clone())
        self.register_buffer("scale", SCALE.clone())
        self.requires_grad_(False)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = ((2 * images - 1) - self.shift) / self.scale
        feats, start = [], 0
        for end in self.cuts:
            for idx in range(start, end):
                h = self.trunk[idx](h)
            feats.append(h)
            start = end
        return feats

    def _heads(self):
        return [getattr(self, f"head{k}") for k in range(len(self.cuts))]

    @torch.no_grad()
    def embed(self, images):
        return torch.cat([layer_embedding(f.float(), w) for f, w in zip(self._features(images), self._heads())], 1)

    @torch.no_grad()
    def pair_distance(self, x, y):
        fx, fy = self._features(x), self._features(y)
        return sum(layer_distance(a, b, w) for a, b, w in zip(fx, fy, self._heads()))


for _net in TRUNKS:
    register_backend(f"lpips-{_net}")(lambda net=_net, **kw: LpipsBackend(net, **kw))

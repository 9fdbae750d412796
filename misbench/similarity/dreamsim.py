"""DreamSim (the MIS paper's metric): cosine distance of DreamSim embeddings.

Optional: `pip install misbench[dreamsim]`, weights from a local cache directory
($DREAMSIM_CACHE or --dreamsim-cache). Any callable images -> embeddings can stand in.
"""

__all__ = ["DreamSimBackend"]

import os

import torch

from ..errors import MisbenchError
from .base import Backend, register_backend


def _load_dreamsim(cache_dir: str | None, device: str):
    try:
        from dreamsim import dreamsim
    except ImportError:
        raise MisbenchError("the dreamsim backend needs the optional extra: pip install 'misbench[dreamsim]'") from None
    cache_dir = cache_dir or os.environ.get("DREAMSIM_CACHE")
    if not cache_dir or not os.path.isdir(cache_dir):
        raise MisbenchError("dreamsim weights must be in a local directory: set DREAMSIM_CACHE to the folder "
                            "dreamsim(pretrained=True, cache_dir=...) wrote on a machine with internet")
    model, _ = dreamsim(pretrained=True, cache_dir=cache_dir, device=device)
    return lambda images: model.embed(images)


@register_backend("dreamsim")
class DreamSimBackend(Backend):
    """Unit embeddings / sqrt(2): then ||a - b||^2 = 1 - cos(a, b), DreamSim's distance."""

    family = "dreamsim"

    def __init__(self, image_size: int = 224, embedder=None, cache_dir: str | None = None, device: str = "cpu", **_):
        super().__init__()
        self.name, self.image_size = "dreamsim", image_size
        self.embedder = embedder or _load_dreamsim(cache_dir, device)

    @torch.no_grad()
    def embed(self, images):
        e = self.embedder(images).float()
        return e / (e.norm(dim=1, keepdim=True) * 2 ** 0.5)

    @torch.no_grad()
    def pair_distance(self, x, y):
        return 1 - torch.nn.functional.cosine_similarity(self.embedder(x).float(), self.embedder(y).float(), dim=1)

    def fingerprint(self):
        return "dreamsim-" + str(getattr(self.embedder, "__name__", type(self.embedder).__name__))

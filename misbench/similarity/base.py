"""The backend interface and registry.

Every backend maps a batch of images in [0, 1] to embeddings whose squared L2 distance *is*
the backend's perceptual distance, so distances come from a FAISS index over embeddings
and every image is embedded once. `pair_distance` computes the same metric directly on two
image batches, the way other MIS implementations call it, as the reference path.
"""

__all__ = ["Backend", "register_backend", "build_backend", "backend_names", "DEFAULT_ALPHA"]

import hashlib
from typing import Callable

import torch

from ..errors import MisbenchError, close_matches

# Sigmoid slopes for mis_confidence. Uncalibrated: deepfeat and pixel by the median rule
# (alpha = ln 3 / median |delta| over the demo control network's tasks, `calibrate --derive`),
# lpips and dreamsim placed by hand (their weights are not available offline to derive them).
# docs/mis.md gives the procedure and figures; fit your own with `misbench calibrate`.
DEFAULT_ALPHA = {"lpips": 20.0, "deepfeat": 8.8, "dreamsim": 16.0, "pixel": 17.6}

_BACKENDS: dict[str, Callable[..., "Backend"]] = {}


class Backend(torch.nn.Module):
    """images [B, 3, S, S] in [0, 1] -> embeddings [B, D]; distance = ||e1 - e2||^2."""

    name: str = ""
    family: str = ""
    image_size: int = 64
    resample: str = "square"  # how images reach image_size (images.RESAMPLE): resize shorter side + centre crop

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pair_distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The metric on image pairs, computed directly (reference path): [B] distances."""
        raise NotImplementedError

    @property
    def default_alpha(self) -> float:
        return DEFAULT_ALPHA[self.family]

    def fingerprint(self) -> str:
        """Identity of the metric (name and weights) for embedding caches."""
        digest = hashlib.sha256(self.name.encode())
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def register_backend(name: str):
    def decorate(factory):
        _BACKENDS[name] = factory
        return factory
    return decorate


def _load_backends():
    """The backend modules register themselves on import."""
    import importlib

    for module in ("lpips", "pixel", "dreamsim", "deepfeat"):
        importlib.import_module(f"{__package__}.{module}")


def backend_names() -> list[str]:
    _load_backends()
    return sorted(_BACKENDS) + ["deepfeat:<torchvision model>"]


def build_backend(name: str, **kwargs) -> Backend:
    """`lpips-alex|lpips-vgg|lpips-squeeze`, `deepfeat:<model>`, `dreamsim`, `pixel`."""
    _load_backends()
    if name.startswith("deepfeat:"):
        from .deepfeat import DeepFeatBackend

        return DeepFeatBackend(name.partition(":")[2], **kwargs)
    if name not in _BACKENDS:
        raise MisbenchError(f"unknown similarity {name!r}: expected one of {', '.join(backend_names())}."
                            f"{close_matches(name, list(_BACKENDS))}")
    return _BACKENDS[name](**kwargs)

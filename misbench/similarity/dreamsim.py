"""DreamSim (the MIS paper's metric) as the paper ran it: cosine distance of DreamSim embeddings of
images resized to 224 x 224 (bicubic, the whole image, no crop) unless --image-size says otherwise.

Optional: `pip install misbench[dreamsim]`. Weights come from a local directory (the `cache_dir` that
`dreamsim(pretrained=True, cache_dir=...)` filled on a machine with internet): `--dreamsim-weights DIR`
or $MISBENCH_DREAMSIM_WEIGHTS (or DreamSim's own $DREAMSIM_CACHE). Any torch module images -> embeddings
can stand in (tests do).
"""

__all__ = ["DreamSimBackend", "WEIGHTS_ENV", "weights_dir"]

import hashlib
import os
from pathlib import Path

import torch

from ..errors import MisbenchError
from .base import Backend, register_backend

WEIGHTS_ENV = "MISBENCH_DREAMSIM_WEIGHTS"


def weights_dir(path: str | None) -> Path:
    path = path or os.environ.get(WEIGHTS_ENV) or os.environ.get("DREAMSIM_CACHE")
    if not path:
        raise MisbenchError(f"dreamsim weights must be in a local directory: pass --dreamsim-weights DIR or set "
                            f"{WEIGHTS_ENV} to the folder dreamsim(pretrained=True, cache_dir=DIR) filled on a "
                            "machine with internet (misbench never downloads them)")
    if not Path(path).is_dir() or not any(Path(path).iterdir()):
        raise MisbenchError(f"dreamsim weights directory {path} does not exist or is empty: copy the folder "
                            "dreamsim(pretrained=True, cache_dir=DIR) filled on a machine with internet")
    return Path(path)


def _load_dreamsim(path: str | None) -> torch.nn.Module:
    try:
        # optional: pip install 'misbench[dreamsim]'
        from dreamsim import dreamsim
    except ImportError:
        raise MisbenchError("the dreamsim backend needs the optional extra: pip install 'misbench[dreamsim]'") from None
    folder = weights_dir(path)
    try:
        model, _ = dreamsim(pretrained=True, cache_dir=str(folder), device="cpu")  # moved with the backend
    except OSError as err:  # it tries to download what is missing
        raise MisbenchError(f"dreamsim weights in {folder} are incomplete and cannot be downloaded here ({err}); "
                            "copy the whole folder from a machine with internet") from None
    return model


class _Embed(torch.nn.Module):
    """DreamSim's model (its `embed` method) or a stand-in (called), as a submodule that moves with us."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.embed(images) if hasattr(self.model, "embed") else self.model(images)


@register_backend("dreamsim", settings={"weights": "dreamsim_weights"})
class DreamSimBackend(Backend):
    """Unit embeddings / sqrt(2): then ||a - b||^2 = 1 - cos(a, b), DreamSim's distance."""

    family = "dreamsim"
    default_alpha = 16.0  # placed by hand: DreamSim's weights are not available offline to derive it
    resample = "stretch-bicubic"  # DreamSim's preprocessing: Resize((224, 224), bicubic), no crop

    def __init__(self, image_size: int = 224, embedder=None, weights: str | None = None, **_):
        super().__init__()
        self.name, self.image_size = "dreamsim", image_size
        model = embedder if embedder is not None else _load_dreamsim(weights)
        if isinstance(model, torch.nn.Module):
            self.embedder = _Embed(model)
        else:  # a bare callable: not moved, and its weights cannot be identified
            self._callable = model
            self.embedder = None

    def _embed(self, images):
        return (self.embedder(images) if self.embedder is not None else self._callable(images)).float()

    @torch.no_grad()
    def embed(self, images):
        e = self._embed(images)
        return e / (e.norm(dim=1, keepdim=True) * 2 ** 0.5)

    @torch.no_grad()
    def pair_distance(self, x, y):
        return 1 - torch.nn.functional.cosine_similarity(self._embed(x), self._embed(y), dim=1)

    def fingerprint(self):
        """Name and weights (every tensor of the model): another checkpoint never reads this cache's entries.
        A bare callable has no identifiable weights: its key is unique to this process."""
        if self.embedder is None:
            return hashlib.sha256(f"dreamsim-callable-{id(self._callable)}-{os.getpid()}".encode()).hexdigest()[:16]
        return super().fingerprint()

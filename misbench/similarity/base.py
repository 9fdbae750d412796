"""The backend interface and registry.

Every backend maps a batch of images in [0, 1] to embeddings whose squared L2 distance *is*
the backend's perceptual distance, so distances come from a FAISS index over embeddings
and every image is embedded once. `pair_distance` computes the same metric directly on two
image batches, the way other MIS implementations call it, as the reference path.
"""

__all__ = ["Backend", "register_backend", "build_backend", "backend_names", "BACKENDS"]

import hashlib
from typing import Callable

import torch

from ..errors import MisbenchError, close_matches

# name -> factory; a name ending in ":" is a family whose factory parses what follows (deepfeat:<model>)
BACKENDS: dict[str, Callable[..., "Backend"]] = {}
_HINTS: dict[str, str] = {}  # family -> what follows its colon, for backend_names()


class Backend(torch.nn.Module):
    """images [B, 3, S, S] in [0, 1] -> embeddings [B, D]; distance = ||e1 - e2||^2."""

    name: str = ""
    family: str = ""
    image_size: int = 64
    resample: str = "square"  # how images reach image_size (images.RESAMPLE): resize shorter side + centre crop
    # Sigmoid slope for mis_confidence when neither --alpha nor --alpha-from is given; each backend says how
    # its value was found (docs/mis.md gives the procedure; fit your own with `misbench calibrate`).
    default_alpha: float = 1.0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pair_distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The metric on image pairs, computed directly (reference path): [B] distances."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identity of the metric (name and weights) for embedding caches."""
        digest = hashlib.sha256(self.name.encode())
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def register_backend(name: str, hint: str = ""):
    """Decorator: `factory(**options)` builds the backend `name`; for a family `name:` (ending in a colon)
    `factory(spec, **options)` gets what follows the colon. `hint` names that part in `backend_names()`."""
    def decorate(factory):
        BACKENDS[name] = factory
        _HINTS[name] = hint or "spec"
        return factory
    return decorate


def backend_names() -> list[str]:
    return sorted(n for n in BACKENDS if not n.endswith(":")) + sorted(
        f"{n}<{_HINTS[n]}>" for n in BACKENDS if n.endswith(":"))


def build_backend(name: str, **kwargs) -> Backend:
    """A registered name (`lpips-alex`, `pixel`, `dreamsim`, ...) or `family:spec` (`deepfeat:<model>`)."""
    family, colon, spec = name.partition(":")
    if colon and f"{family}:" in BACKENDS:
        return BACKENDS[f"{family}:"](spec, **kwargs)
    if name not in BACKENDS:
        raise MisbenchError(f"unknown similarity {name!r}: expected one of {', '.join(backend_names())}."
                            f"{close_matches(name, list(BACKENDS))}")
    return BACKENDS[name](**kwargs)

"""The backend interface and registry.

Every backend maps a batch of images in [0, 1] to embeddings whose squared L2 distance *is*
the backend's perceptual distance, so distances come from a FAISS index over embeddings
and every image is embedded once. `pair_distance` computes the same metric directly on two
image batches, the way other MIS implementations call it, as the reference path.
"""

__all__ = ["Backend", "register_backend", "build_backend", "backend_from_settings", "backend_names", "BACKENDS"]

import hashlib
from typing import Callable

import torch

from ..errors import MisbenchError, close_matches
from ..registry import register

# name -> factory; a name ending in ":" is a family whose factory parses what follows (deepfeat:<model>)
BACKENDS: dict[str, Callable[..., "Backend"]] = {}
_HINTS: dict[str, str] = {}  # family -> what follows its colon, for backend_names()
_SETTINGS: dict[str, dict[str, str]] = {}  # name -> {factory keyword: the score setting it is given}


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


def register_backend(name: str, hint: str = "", settings: dict[str, str] | None = None):
    """Decorator: `factory(**options)` builds the backend `name`; for a family `name:` (ending in a colon)
    `factory(spec, **options)` gets what follows the colon. `hint` names that part in `backend_names()`;
    `settings` maps factory keywords to the score settings (ScoreSettings fields) a score run passes them."""
    def decorate(factory):
        register(BACKENDS, name, factory, "similarity backend")
        _HINTS[name] = hint or "spec"
        _SETTINGS[name] = dict(settings or {})
        return factory
    return decorate


def backend_names() -> list[str]:
    return sorted(n for n in BACKENDS if not n.endswith(":")) + sorted(
        f"{n}<{_HINTS[n]}>" for n in BACKENDS if n.endswith(":"))


def _entry(name: str) -> str:
    """The registry entry of a name: itself, or its family `family:` for `family:spec`."""
    family, colon, _ = name.partition(":")
    if colon and f"{family}:" in BACKENDS:
        return f"{family}:"
    if name not in BACKENDS:
        raise MisbenchError(f"unknown similarity {name!r}: expected one of {', '.join(backend_names())}."
                            f"{close_matches(name, list(BACKENDS))}")
    return name


def build_backend(name: str, **kwargs) -> Backend:
    """A registered name (`lpips-alex`, `pixel`, `dreamsim`, ...) or `family:spec` (`deepfeat:<model>`)."""
    entry = _entry(name)
    if entry.endswith(":"):
        return BACKENDS[entry](name.partition(":")[2], **kwargs)
    return BACKENDS[entry](**kwargs)


def backend_from_settings(settings) -> Backend:
    """The backend a score run's settings (ScoreSettings) name: at their image size, when they give one, and
    with the settings its registration asks for (DreamSim's weights directory)."""
    options = {"image_size": settings.image_size} if settings.image_size else {}
    options.update({key: getattr(settings, field) for key, field in _SETTINGS[_entry(settings.similarity)].items()})
    return build_backend(settings.similarity, **options)

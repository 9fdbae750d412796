"""What a score run is asked to do: the settings stored in mis.json, checked where they are made."""

__all__ = ["ENGINES", "METRICS", "ScoreSettings", "parse_shard", "parse_metrics"]

import dataclasses

import numpy as np

from ..datasets.images import VIEWS
from ..errors import MisbenchError
from ..similarity.index import DISTANCE_ENGINES
from .mis import SELECTIONS
from .summaries import is_class_layer

ENGINES = ("embed", "pairwise")
METRICS = ("mis", "ms")  # ms: the MonoSemanticity score (scoring/ms.py) from the same embeddings


def parse_metrics(value) -> tuple[str, ...]:
    """`mis,ms` (or a list) -> ("mis", "ms"); mis is always computed, ms on request."""
    names = [m.strip() for m in (value.split(",") if isinstance(value, str) else value) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or "mis" not in names:
        raise MisbenchError(f"--metrics {','.join(names)!s}: expected mis or mis,ms (mis is always computed; "
                            f"ms, the MonoSemanticity score, is added on request)")
    return tuple(m for m in METRICS if m in names)


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    similarity: str = "lpips-alex"
    image_size: int | None = None  # None: the backend's own size (64; DreamSim 224)
    view: str = "model"  # what the similarity sees: the model's crop, or the raw image file (images.VIEWS)
    selection: str = "fair"
    quantile: float = 0.2
    class_quantile: float | None = None  # --selection quantile: class units' (softmax/logits) own Q, so that a pool
    # fits within a class (10 classes: Q < 0.1); None: `quantile`
    tasks: int = 20
    explanations: int = 9
    alpha: float | None = None  # None: the backend's documented default
    alpha_source: str = ""  # "" -> "default" (alpha None) or "user"; "calibrated:<sha256>" from a calibration file
    seed: int = 0
    engine: str = "embed"
    n_boot: int = 1000
    keep_sparse: bool = False  # sparse units (top pool reaching the minimum) enter means and comparisons
    amp: bool = False  # autocast the embedding network (LPIPS is exact only in float32)
    chunk_units: int = 256  # units whose distances are computed together (bounds memory)
    distances: str = "auto"  # gram | faiss | torch | auto (torch on CUDA, gram on CPU): docs/performance.md
    metrics: tuple = ("mis",)  # METRICS: ("mis",) or ("mis", "ms")
    # how, not what
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # None: auto (see loader_workers)
    dreamsim_weights: str | None = None  # a local directory; the weights' identity is in the backend fingerprint

    RUNTIME = ("device", "batch_size", "workers", "chunk_units", "dreamsim_weights", "distances")

    def for_layer(self, layer: str) -> "ScoreSettings":
        """The settings a layer's units are selected with: `class_quantile` as the quantile of class units."""
        if self.class_quantile is None or not is_class_layer(layer):
            return self
        return dataclasses.replace(self, quantile=self.class_quantile)

    def __post_init__(self):
        if self.class_quantile is not None and not 0 < self.class_quantile <= 0.5:
            raise MisbenchError(f"--class-quantile must be in (0, 0.5], got {self.class_quantile}")
        if self.selection not in SELECTIONS:
            raise MisbenchError(f"--selection {self.selection!r}: expected one of {list(SELECTIONS)}")
        if self.engine not in ENGINES:
            raise MisbenchError(f"--engine {self.engine!r}: expected one of {ENGINES}")
        if self.tasks < 1 or self.explanations < 1:
            raise MisbenchError("--tasks and --explanations must be positive")
        if self.distances not in ("auto", *DISTANCE_ENGINES):
            raise MisbenchError(f"--distances {self.distances!r}: expected one of {['auto', *DISTANCE_ENGINES]}")
        if self.chunk_units < 1:
            raise MisbenchError(f"--chunk-units must be positive, got {self.chunk_units}")
        if self.alpha is not None and not (np.isfinite(self.alpha) and self.alpha > 0):
            raise MisbenchError(f"--alpha {self.alpha}: expected a finite positive sigmoid slope "
                                "(leave it out for the backend's default, or fit one with misbench calibrate)")
        if self.alpha_source not in ("", "default", "user") and not self.alpha_source.startswith("calibrated:"):
            raise MisbenchError(f"alpha_source {self.alpha_source!r}: expected default, user or calibrated:<sha256>")
        if self.view not in VIEWS:
            raise MisbenchError(f"--view {self.view!r}: expected one of {VIEWS}")
        if self.image_size is not None and self.image_size < 16:
            raise MisbenchError(f"--image-size must be at least 16 pixels, got {self.image_size}")
        if self.n_boot < 0:
            raise MisbenchError(f"--bootstrap must be >= 0 resamples, got {self.n_boot}")
        if self.batch_size < 1:
            raise MisbenchError(f"--batch-size must be positive, got {self.batch_size}")
        object.__setattr__(self, "metrics", parse_metrics(self.metrics))

    def resolved(self, image_size: int, default_alpha: float) -> "ScoreSettings":
        """The settings a run uses and records, resolved once: the backend's image size and alpha where none
        was given, and where alpha came from (default, user, or the calibration it was read from)."""
        return dataclasses.replace(
            self, image_size=image_size if self.image_size is None else self.image_size,
            alpha=default_alpha if self.alpha is None else self.alpha,
            alpha_source=self.alpha_source or ("default" if self.alpha is None else "user"))


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise MisbenchError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise MisbenchError(f"--shard {text!r}: expected I/N with 0 <= I < N")
    return i, n

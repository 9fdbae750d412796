"""What a score run is asked to do: the settings stored in mis.json, checked where they are made."""

__all__ = ["ENGINES", "METRICS", "ScoreSettings", "parse_shard", "parse_metrics"]

import dataclasses

import numpy as np

from ..datasets.images import VIEWS
from ..errors import MisbenchError, close_matches
from ..runtime.device import batch_size_setting, device_setting, workers_setting
from ..runtime.fileio import option_label
from ..runtime.schema import setting, validate
from ..similarity import BACKENDS, backend_names
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


def _check_similarity(name: str) -> None:
    if name.partition(":")[0] + ":" in BACKENDS:  # a family (deepfeat:<model>) parses its own spec
        return
    if name not in BACKENDS:
        raise MisbenchError(f"{name!r} is not allowed; expected one of {', '.join(backend_names())}."
                            f"{close_matches(name, list(BACKENDS))}")


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    similarity: str = setting("lpips-alex", check=_check_similarity, help=lambda: "|".join(backend_names()))
    image_size: int | None = setting(None, low=16, high=1024,  # 1024: 12 GB of float32 pixels per 1000 images
                                     help="Pixels the similarity sees (default: the backend's: 64; dreamsim 224 as "
                                          "the MIS paper).")
    view: str = setting("model", choices=VIEWS,
                        help="Explanation images as the model saw them (its resize and crop), or the raw files.")
    selection: str = setting("fair", choices=SELECTIONS, help="Which rows make a unit's tasks (docs/mis.md).")
    quantile: float = setting(0.2, low=0, help="Fraction per side for --selection quantile.")
    # --selection quantile: class units' (softmax/logits) own Q, so that a pool fits within a class (10 classes:
    # Q < 0.1); None: `quantile`
    class_quantile: float | None = setting(None, help="Fraction per side for the class units (softmax/logits) under "
                                           "--selection quantile, so that a pool fits within a class (default: "
                                           "--quantile).")
    tasks: int = setting(20, low=1, help="Tasks (2-AFC trials) per unit.")
    explanations: int = setting(9, low=1, help="Explanation images per side of a task.")
    alpha: float | None = setting(None, help="Sigmoid slope (default: per backend, see docs/mis.md).")
    # "" -> "default" (alpha None) or "user"; "calibrated:<sha256>" from a calibration file (api: alpha_from)
    alpha_source: str = setting("", cli=False, config=False)
    seed: int = setting(0, low=0, config=False, help="Seed of the task sampling and the bootstrap.")
    engine: str = setting("embed", choices=ENGINES, config=False,
                          help="embed: distances of embeddings; pairwise: the backend's own pair distance.")
    n_boot: int = setting(1000, low=0, aliases=("--bootstrap",), help="Bootstrap resamples for intervals.")
    # sparse units (top pool reaching the minimum) enter means and comparisons
    keep_sparse: bool = setting(False, help="Count sparse units (top pool reaching the unit's minimum, chosen by tie "
                                "keys) in means and comparisons; by default they are scored but left out (docs/mis.md).")
    amp: bool = setting(False, config=False, help="Mixed-precision embeddings: float16 on CUDA, bfloat16 on CPU "
                        "(faster; LPIPS is exact only without it).")
    chunk_units: int = setting(256, low=1, config=False,
                               help="Units whose distances are computed together: bounds memory. Each image is "
                                    "embedded once per run whatever the chunks (--cache: once across runs).")
    distances: str = setting("auto", choices=lambda: ["auto", *DISTANCE_ENGINES], config=False,
                             help="Distance engine: auto = torch on the GPU, gram on CPU (docs/performance.md).")
    metrics: tuple[str, ...] | str = setting(("mis",), check=parse_metrics,  # METRICS
                                             help="mis (default), or mis,ms: also the MonoSemanticity score (an ms "
                                                  "column; embeds every row).")
    # how, not what
    device: str = device_setting()
    batch_size: int = batch_size_setting()
    workers: int | None = workers_setting()
    # a local directory; the weights' identity is in the backend fingerprint
    dreamsim_weights: str | None = setting(None, config=False, metavar="DIRECTORY",
                                           help="Local DreamSim weights directory (else $MISBENCH_DREAMSIM_WEIGHTS).")

    RUNTIME = ("device", "batch_size", "workers", "chunk_units", "dreamsim_weights", "distances")

    def for_layer(self, layer: str) -> "ScoreSettings":
        """The settings a layer's units are selected with: `class_quantile` as the quantile of class units."""
        if self.class_quantile is None or not is_class_layer(layer):
            return self
        return dataclasses.replace(self, quantile=self.class_quantile)

    def __post_init__(self):
        validate(self)
        if self.class_quantile is not None and not 0 < self.class_quantile <= 0.5:
            raise MisbenchError(f"{option_label('class_quantile')} must be in (0, 0.5], got {self.class_quantile}")
        if self.alpha is not None and not (np.isfinite(self.alpha) and self.alpha > 0):
            raise MisbenchError(f"{option_label('alpha')} {self.alpha}: expected a finite positive sigmoid slope "
                                "(leave it out for the backend's default, or fit one with misbench calibrate)")
        if self.alpha_source not in ("", "default", "user") and not self.alpha_source.startswith("calibrated:"):
            raise MisbenchError(f"alpha_source {self.alpha_source!r}: expected default, user or calibrated:<sha256>")
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

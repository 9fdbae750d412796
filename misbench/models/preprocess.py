"""Image preprocessing settings: what a model expects, stored with every output."""

__all__ = ["Preprocess", "IMAGENET_PREPROCESS", "build_transform", "check_preprocess"]

import dataclasses
import math

from ..errors import MisbenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise per channel."""

    resize: int = 256
    crop: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["resize"]), int(d["crop"]), tuple(d["mean"]), tuple(d["std"]))

    def override(self, resize: int | None = None, crop: int | None = None) -> "Preprocess":
        resize = resize or self.resize
        crop = crop or (min(self.crop, resize) if resize else self.crop)
        return dataclasses.replace(self, resize=resize, crop=crop)


IMAGENET_PREPROCESS = Preprocess()


def check_preprocess(d, where: str) -> None:
    """A preprocess table (resize, crop: positive integers; mean, std: three numbers, std > 0), checked
    before any work; `where` names it in the error (e.g. 'config [model] preprocess')."""
    keys = [f.name for f in dataclasses.fields(Preprocess)]
    expected = "a table with resize, crop (positive integers) and mean, std (3 numbers each, std > 0)"
    if not isinstance(d, dict):
        raise MisbenchError(f"{where}: expected {expected}, got {d!r}")
    unknown, missing = sorted(set(d) - set(keys)), [k for k in keys if k not in d]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"{', '.join(missing)} missing"
        raise MisbenchError(f"{where}: {what}; expected {expected}")
    for key in ("resize", "crop"):
        value = d[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MisbenchError(f"{where} {key}: expected a positive integer, got {value!r} ({type(value).__name__})")
    for key in ("mean", "std"):
        value = d[key]
        good = isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not good or (key == "std" and min(value) <= 0):
            raise MisbenchError(f"{where} {key}: expected 3 finite numbers (one per RGB channel"
                                f"{', each > 0' if key == 'std' else ''}), got {value!r}")


def build_transform(pre: Preprocess):
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(pre.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(pre.crop),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])

"""Image preprocessing settings: what a model expects, stored with every output."""

__all__ = ["Preprocess", "IMAGENET_PREPROCESS", "build_transform"]

import dataclasses

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


def build_transform(pre: Preprocess):
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(pre.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(pre.crop),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])

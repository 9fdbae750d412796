"""Pixel baseline: distance = mean squared difference of RGB values in [0, 1]."""

__all__ = ["PixelBackend"]

from .base import Backend, register_backend


@register_backend("pixel")
class PixelBackend(Backend):
    family = "pixel"
    default_alpha = 17.6  # median rule (ln 3 / median |delta| on the demo control's tasks, `calibrate --derive`)

    def __init__(self, image_size: int = 64, **_):
        super().__init__()
        self.name, self.image_size = "pixel", image_size

    def embed(self, images):
        flat = images.reshape(len(images), -1).float()
        return flat / flat.shape[1] ** 0.5

    def pair_distance(self, x, y):
        return (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3))

"""The order of images by activation: seeded keys that break ties the same way wherever images are ranked
(top/bottom-k files while extracting, MIS task selection while scoring), and the values that have no order."""

__all__ = ["tie_keys", "non_finite_rows"]

import zlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def tie_keys(seed: int, layer: str, unit, items: np.ndarray) -> np.ndarray:
    """A pseudo-random key per (seed, layer, unit, image) that breaks ties between equal activations.

    `items` are dataset indices: the key belongs to the image, not to its position or to which other
    images are present, so ranking a subset (a top/bottom-k file, a shard) orders its images exactly as
    ranking the full file does. `unit` may be an array [U]; then `items` is [M] or [U, M] and the
    result [U, M].
    """
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([(seed & 0xFFFFFFFF) << 32 | zlib.crc32(layer.encode())], dtype=np.uint64))
        base = _splitmix64(base ^ np.asarray(unit, dtype=np.uint64))
        items = np.asarray(items, dtype=np.uint64)
        if np.ndim(unit):
            return _splitmix64(base[:, None] + (items if items.ndim == 2 else items[None, :]) * _GOLDEN)
        return _splitmix64(base + items * _GOLDEN)


def non_finite_rows(acts: np.ndarray) -> np.ndarray:
    """Positions of NaN/inf activations: they have no rank, so no unit holding one can be scored."""
    return np.flatnonzero(~np.isfinite(acts))

"""Per-position training vectors for dictionaries (issue 24 item 1): every spatial position of a conv map or
every token of a transformer layer is one vector, sampled while the images stream through the model into a
bounded reservoir (Vitter's Algorithm R: after t vectors each is kept with probability size / t), so memory
holds `size` vectors whatever the number of images and positions, and nothing goes to disk.
"""

__all__ = ["Reservoir", "sample_positions"]

import logging

import numpy as np
import torch

from ..datasets.sources import TransformedDataset, load_data
from ..datasets.subset import first_images
from ..errors import MisbenchError
from ..models.preprocess import build_transform
from ..runtime.device import make_loader, prepare_model, resolve_device, to_device
from .tokens import as_positions, channels_last_modules, output_layout

log = logging.getLogger(__name__)


class Reservoir:
    """A uniform sample of at most `size` of the vectors passed to `add`, in any batches (seeded)."""

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise MisbenchError(f"--positions must be at least 1, got {size}")
        self.size, self.seen, self.data = size, 0, None
        self.rng = np.random.default_rng(seed)

    def add(self, vectors: torch.Tensor) -> None:
        vectors = vectors.detach().float().cpu()
        if self.data is None:
            self.data = torch.empty(self.size, vectors.shape[1])
        fill = max(0, min(len(vectors), self.size - self.seen))
        self.data[self.seen:self.seen + fill] = vectors[:fill]
        rest = len(vectors) - fill
        if rest:
            # vector t (counted from 0) replaces slot j, uniform in [0, t], when j < size; of several vectors that
            # draw one slot in this batch the last wins, as one at a time
            t = self.seen + fill + np.arange(rest)
            slot = np.floor(self.rng.random(rest) * (t + 1)).astype(np.int64)
            hit = np.flatnonzero(slot < self.size)
            last = {int(s): int(i) for i, s in zip(hit, slot[hit])}
            if last:
                slots = torch.as_tensor(list(last), dtype=torch.long)
                self.data[slots] = vectors[fill + torch.as_tensor(list(last.values()), dtype=torch.long)]
        self.seen += len(vectors)

    def sample(self) -> torch.Tensor:
        return self.data[:min(self.seen, self.size)].clone() if self.data is not None else torch.empty(0, 0)


def sample_positions(loaded, data, layer: str, size: int, seed: int = 0, limit: int | None = None,
                     batch_size: int = 64, workers: int | None = None, device: str = "auto",
                     labels: str = "folder-order") -> tuple[torch.Tensor, dict]:
    """Up to `size` per-position vectors of module `layer` of `loaded` over the images of `data` (the first
    `limit`), uniformly sampled; returns them [M, D] and a record (images, positions seen, vectors kept).
    Labels play no part (folder order by default, so any folder names do)."""
    model = loaded.model
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise MisbenchError(f"--layer {layer!r}: not a module of the model; `misbench layers MODEL` lists them")
    source = load_data(data, loaded.num_classes, labels, loaded.categories) if isinstance(data, str) else data
    subset = first_images(source, limit)
    total = subset.images
    dev = resolve_device(device)
    model = prepare_model(model, dev).eval()
    pre = loaded.preprocess
    dataset = TransformedDataset(source, build_transform(pre), (3, pre.crop, pre.crop), 0, total)
    reservoir = Reservoir(size, seed)
    grid = layer in channels_last_modules(model)
    images = 0

    def hook(_module, _inputs, output):
        output = output[0] if isinstance(output, (tuple, list)) else output
        positions = as_positions(output, output_layout(output, grid))
        reservoir.add(positions.reshape(-1, positions.shape[-1]))

    handle = modules[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for x, _labels, _index, ok in make_loader(dataset, batch_size, workers, dev):
                if not bool(ok.all()):
                    x = x[ok]
                if len(x):
                    model(to_device(x, dev))
                    images += len(x)
    finally:
        handle.remove()
    if reservoir.seen == 0:
        raise MisbenchError(f"layer {layer!r} was not called on any image of {data}; choose a module on the "
                            "inference path")
    record = {"images": images, "positions_seen": int(reservoir.seen), "n_vectors": min(reservoir.seen, size),
              "positions_per_image": reservoir.seen // max(images, 1)}
    if subset.record():  # the images a limit took and the classes they cover
        record["subset"] = subset.record()
    log.info("%s: %d of %d positions sampled over %d images", layer, record["n_vectors"], reservoir.seen, images)
    return reservoir.sample(), record

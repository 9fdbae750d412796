"""Read back the images behind activation-file rows, at the similarity backend's size."""

__all__ = ["RowImages", "similarity_transform", "VIEWS", "RESAMPLE"]

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import MisbenchError
from .sources import DIGEST_CHARS, FolderSource, load_data

# What the similarity sees of each image: "model" the model's view (its resize and centre crop, as the
# activation file records them), "raw" the whole file; either then resampled to the backend's size.
VIEWS = ("model", "raw")
RESAMPLE = ("square", "stretch-bicubic")


def similarity_transform(size: int, view: str = "raw", model_transform: dict | None = None, resample: str = "square"):
    """raw/model view, then `square` (resize the shorter side, centre crop: LPIPS, deep features, pixel) or
    `stretch-bicubic` (the whole view to size x size, bicubic: DreamSim's own preprocessing)."""
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    from torchvision import transforms as T

    steps = []
    if view == "model" and model_transform and model_transform.get("crop"):
        steps += [T.Resize(int(model_transform["resize"]), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                  T.CenterCrop(int(model_transform["crop"]))]
    if resample == "stretch-bicubic":
        steps.append(T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True))
    else:
        steps += [T.Resize(size, antialias=True), T.CenterCrop(size)]
    return T.Compose(steps + [T.ToTensor()])


class RowImages(torch.utils.data.Dataset):
    """Dataset over activation-file rows -> (image in [0, 1] at `size`, row)."""

    def __init__(self, acts, rows, size: int, view: str = "model", resample: str = "square"):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.index = acts.index
        self.digests = acts.digests  # recorded at extraction (None in older files)
        self.acts_path = acts.path
        model_transform = json.loads(str(acts.attrs.get("transform", "{}")) or "{}")
        self.transform = similarity_transform(size, view, model_transform, resample)
        spec, root = str(acts.attrs["data"]), str(acts.attrs.get("data_root", ""))
        if root:
            if not Path(root).is_dir():
                raise MisbenchError(f"the images of {acts.path} were read from {root}, which no longer exists; "
                                    "scoring needs the same images")
            self.source = FolderSource(spec, Path(root))
            self._check_paths(acts)
        else:
            self.source = load_data(spec)
        geometry = {k: model_transform.get(k) for k in ("resize", "crop")} if view == "model" else {}
        self.identity = f"{spec}|{root}|{len(self.source)}|{view}|{resample}|{json.dumps(geometry, sort_keys=True)}"

    def _check_paths(self, acts):
        stored = acts.paths
        for row in np.unique(np.linspace(0, len(stored) - 1, 50).astype(np.int64)):  # a spread over the file
            i = int(self.index[row])
            if i >= len(self.source) or self.source.path(i) != stored[row]:
                raise MisbenchError(f"{acts.attrs['data_root']} has changed since extraction: row {row} was "
                                    f"{stored[row]!r}; re-extract or restore the folder")

    def with_rows(self, rows) -> "RowImages":
        """The same images source for other rows (no dataset reload)."""
        other = copy.copy(self)
        other.rows = np.asarray(rows, dtype=np.int64)
        return other

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        row = int(self.rows[k])
        return self.transform(self.source.image(int(self.index[row]))), row

    def dataset_index(self, rows) -> np.ndarray:
        return self.index[np.asarray(rows, dtype=np.int64)]

    def content_keys(self, rows, threads: int = 8) -> np.ndarray:
        """Each row's image identity for embedding caches: the first 128 bits of the sha256 of its
        stored bytes (hex, S32), so a folder regenerated in place never returns stale embeddings."""
        items = self.dataset_index(rows).tolist()
        with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL: file reads and hashing overlap
            digests = list(pool.map(self.source.digest, items, chunksize=64))
        return np.array([d[:DIGEST_CHARS] for d in digests], dtype=f"S{DIGEST_CHARS}")

    def checked_content_keys(self, rows) -> np.ndarray | None:
        """content_keys(rows), checked against the digests extraction recorded: an image regenerated in place
        (same name, other pixels) must not be scored as if it had caused the stored activations. None when
        the file records no digests (written before misbench did)."""
        if self.digests is None:
            return None
        keys = self.content_keys(rows)
        changed = np.flatnonzero(keys != self.digests[np.asarray(rows, dtype=np.int64)])
        if len(changed):
            row = int(np.asarray(rows)[changed[0]])
            name = self.source.path(int(self.index[row])) or f"image {int(self.index[row])}"
            raise MisbenchError(f"{self.source.root or self.source.spec}: {len(changed)} of the {len(rows)} images "
                                f"scoring reads have other content than when {self.acts_path} was extracted (e.g. "
                                f"{name!r}); re-extract from the current images, or restore the originals")
        return keys

    def index_keys(self, rows) -> np.ndarray:
        """Dataset indices as store keys: enough within one run, whose images cannot change under it."""
        return np.array([b"%032x" % i for i in self.dataset_index(rows).tolist()], dtype="S32")

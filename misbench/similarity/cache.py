"""On-disk embedding cache: re-scoring another layer, seed or checkpoint embeds nothing twice."""

__all__ = ["EmbeddingCache"]

import hashlib
import logging
from pathlib import Path

import h5py
import numpy as np

log = logging.getLogger(__name__)


class EmbeddingCache:
    """One HDF5 file per (backend fingerprint, image size, dataset identity), keyed by dataset index."""

    def __init__(self, directory, backend_fingerprint: str, image_size: int, data_identity: str):
        key = hashlib.sha256(f"{backend_fingerprint}|{image_size}|{data_identity}".encode()).hexdigest()[:20]
        self.path = Path(directory) / f"emb-{key}.h5"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._known: dict[int, int] = {}
        if self.path.exists():
            try:
                with h5py.File(self.path, "r") as h5:
                    self._known = {int(k): j for j, k in enumerate(h5["keys"][...])}
            except (OSError, KeyError):
                log.warning("embedding cache %s is unreadable; rebuilding it", self.path)
                self.path.unlink()

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(mask of cached keys, their embeddings in key order)."""
        hit = np.array([int(k) in self._known for k in keys], dtype=bool)
        if not hit.any():
            return hit, None
        pos = np.array([self._known[int(k)] for k in keys[hit]])
        order = np.argsort(pos)
        with h5py.File(self.path, "r") as h5:
            emb = np.empty((len(pos), h5["emb"].shape[1]), dtype=np.float32)
            emb[order] = h5["emb"][pos[order]]
        return hit, emb

    def add(self, keys: np.ndarray, emb: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        with h5py.File(self.path, "a") as h5:
            if "keys" not in h5:
                h5.create_dataset("keys", (0,), np.int64, maxshape=(None,), chunks=(4096,))
                h5.create_dataset("emb", (0, emb.shape[1]), np.float32, maxshape=(None, emb.shape[1]),
                                  chunks=(max(1, min(256, (1 << 20) // (4 * emb.shape[1]) or 1)), emb.shape[1]))
            n = h5["keys"].shape[0]
            h5["emb"].resize(n + len(keys), axis=0)
            h5["emb"][n:] = emb
            h5["keys"].resize(n + len(keys), axis=0)
            h5["keys"][n:] = keys
        self._known.update({int(k): n + j for j, k in enumerate(keys)})

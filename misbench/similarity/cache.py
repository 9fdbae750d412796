"""On-disk embedding cache: re-scoring another layer, seed or checkpoint embeds nothing twice."""

__all__ = ["EmbeddingCache"]

import hashlib
import logging
import uuid
from pathlib import Path

import h5py
import numpy as np

from ..fileio import write_hdf5

log = logging.getLogger(__name__)


class EmbeddingCache:
    """Embeddings per (backend fingerprint, image size, dataset identity), keyed by dataset index.

    Every add() writes a new immutable HDF5 part, atomically, and lookups read every part present:
    the ranks of a torchrun job and the jobs of a Slurm array can share one directory without locks
    (HDF5 files written by two processes at once get corrupted, or refused where locking works).
    """

    def __init__(self, directory, backend_fingerprint: str, image_size: int, data_identity: str):
        key = hashlib.sha256(f"{backend_fingerprint}|{image_size}|{data_identity}".encode()).hexdigest()[:20]
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = f"emb-{key}"
        self._known: dict[int, tuple[Path, int]] = {}
        self._read: set[Path] = set()
        self._scan()

    def _scan(self) -> None:
        """Index the parts not seen yet (other processes may have added some)."""
        for path in sorted(self.directory.glob(f"{self.prefix}*.h5")):
            if path in self._read:
                continue
            self._read.add(path)
            try:
                with h5py.File(path, "r") as h5:
                    keys = h5["keys"][...]
            except (OSError, KeyError):
                log.warning("embedding cache part %s is unreadable; ignoring it (delete it to silence this)", path)
                continue
            for row, k in enumerate(keys):
                self._known.setdefault(int(k), (path, row))

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(mask of cached keys, their embeddings in key order)."""
        self._scan()
        hit = np.array([int(k) in self._known for k in keys], dtype=bool)
        if not hit.any():
            return hit, None
        by_part: dict[Path, tuple[list, list]] = {}
        for j, k in enumerate(keys[hit]):
            path, row = self._known[int(k)]
            slots, rows = by_part.setdefault(path, ([], []))
            slots.append(j)
            rows.append(row)
        emb = None
        for path, (slots, rows) in by_part.items():
            slots, rows = np.array(slots), np.array(rows)
            order = np.argsort(rows)  # h5py reads ascending indices
            with h5py.File(path, "r") as h5:
                if emb is None:
                    emb = np.empty((int(hit.sum()), h5["emb"].shape[1]), dtype=np.float32)
                emb[slots[order]] = h5["emb"][rows[order]]
        return hit, emb

    def add(self, keys: np.ndarray, emb: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        path = self.directory / f"{self.prefix}-{uuid.uuid4().hex[:12]}.h5"
        rows = max(1, min(256, (1 << 20) // (4 * emb.shape[1])))

        def build(h5):
            h5.create_dataset("keys", data=keys)
            h5.create_dataset("emb", data=np.asarray(emb, np.float32), chunks=(min(rows, len(keys)), emb.shape[1]))

        write_hdf5(path, build)  # a full disk: a clean error, no broken part
        self._read.add(path)
        for row, k in enumerate(keys):
            self._known.setdefault(int(k), (path, row))

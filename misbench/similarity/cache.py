"""On-disk embedding store: every image is embedded once per score run, and with `--cache` once
across runs (another layer, seed or checkpoint embeds nothing twice)."""

__all__ = ["EmbeddingCache", "FORMAT"]

import hashlib
import logging
import os
import uuid
from pathlib import Path

import h5py
import numpy as np

from ..runtime.fileio import write_hdf5

log = logging.getLogger(__name__)

FORMAT = 2  # 2: keys are the images' content digests (1 keyed by dataset index and is never read)
READ_BYTES = 32 << 20  # largest slice read from a part at once (bounds the read buffer)


class CorruptPart(Exception):
    pass


class EmbeddingCache:
    """Embeddings per (backend fingerprint, image size, dataset identity), keyed by 32-character
    keys (the image's content digest in a `--cache`, its dataset index in a run's own store).

    Every add() writes a new immutable HDF5 part, atomically, with Fletcher-32 checksums on its
    datasets; lookups read every part present: the ranks of a torchrun job and the jobs of a Slurm
    array can share one directory without locks. A part that fails its checksum, holds non-finite
    values or cannot be read is moved aside (`*.h5.corrupt`) with a warning and its images are
    embedded again: a damaged cache costs time, never a score.
    """

    def __init__(self, directory, backend_fingerprint: str, image_size: int, data_identity: str):
        key = hashlib.sha256(f"{FORMAT}|{backend_fingerprint}|{image_size}|{data_identity}".encode()).hexdigest()[:20]
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = f"emb-{key}"
        self._known: dict[bytes, tuple[Path, int]] = {}
        self._parts: dict[Path, np.ndarray] = {}
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
                    if h5["emb"].shape[0] != len(keys):
                        raise CorruptPart("keys and embeddings differ in length")
            except (OSError, KeyError, CorruptPart) as err:
                self._drop(path, err)
                continue
            self._index(path, keys)

    def _index(self, path: Path, keys: np.ndarray) -> None:
        self._parts[path] = keys
        for row, k in enumerate(keys):
            self._known.setdefault(bytes(k), (path, row))

    def _drop(self, path: Path, why) -> None:
        log.warning("embedding cache part %s is damaged (%s): moved aside to %s.corrupt; its images are embedded "
                    "again", path, why, path.name)
        try:
            os.replace(path, path.with_name(path.name + ".corrupt"))
        except OSError:
            pass  # another process moved it first, or the directory is read-only: it is ignored all the same
        self._parts.pop(path, None)
        self._known = {}
        for other, keys in self._parts.items():
            self._index(other, keys)

    def __len__(self):
        self._scan()
        return len(self._known)

    def lookup(self, keys) -> tuple[np.ndarray, np.ndarray | None]:
        """(mask of cached keys, their embeddings in key order), each part verified as it is read."""
        keys = np.asarray(keys, dtype="S32")
        while True:
            self._scan()
            hit = np.array([bytes(k) in self._known for k in keys], dtype=bool)
            if not hit.any():
                return hit, None
            by_part: dict[Path, tuple[list, list]] = {}
            for j, k in enumerate(keys[hit]):
                path, row = self._known[bytes(k)]
                slots, rows = by_part.setdefault(path, ([], []))
                slots.append(j)
                rows.append(row)
            emb = None
            try:
                for path, (slots, rows) in by_part.items():
                    emb = _read_part(path, np.array(slots), np.array(rows), int(hit.sum()), emb)
            except CorruptPart as err:
                self._drop(path, err)
                continue
            return hit, emb

    def add(self, keys, emb: np.ndarray) -> None:
        keys = np.asarray(keys, dtype="S32")
        path = self.directory / f"{self.prefix}-{uuid.uuid4().hex[:12]}.h5"
        rows = max(1, min(256, (1 << 20) // (4 * emb.shape[1])))

        def build(h5):
            h5.create_dataset("keys", data=keys, chunks=True, fletcher32=True)
            h5.create_dataset("emb", data=np.asarray(emb, np.float32), chunks=(min(rows, len(keys)), emb.shape[1]),
                              fletcher32=True)

        write_hdf5(path, build)  # a full disk: a clean error, no broken part
        self._read.add(path)
        self._index(path, keys)


def _read_part(path: Path, slots: np.ndarray, rows: np.ndarray, n: int, emb: np.ndarray | None) -> np.ndarray:
    """Fill emb[slots] with rows of the part, as slices of at most READ_BYTES (h5py's fancy indexing
    is slow for thousands of rows; a slice over a sparse selection would read too much)."""
    order = np.argsort(rows)
    slots, rows = slots[order], rows[order]
    try:
        with h5py.File(path, "r") as h5:
            data = h5["emb"]
            if emb is None:
                emb = np.empty((n, data.shape[1]), dtype=np.float32)
            elif data.shape[1] != emb.shape[1]:
                raise CorruptPart(f"{data.shape[1]} dimensions where other parts have {emb.shape[1]}")
            span = max(1, READ_BYTES // (4 * data.shape[1]))
            i = 0
            while i < len(rows):
                j = int(np.searchsorted(rows, rows[i] + span))
                r, s = rows[i:j], slots[i:j]
                emb[s] = data[r[0]:r[-1] + 1][r - r[0]]
                if not np.isfinite(emb[s]).all():
                    raise CorruptPart("non-finite values")
                i = j
    except (OSError, KeyError) as err:  # Fletcher-32 mismatches surface as OSError
        raise CorruptPart(f"{type(err).__name__}: {err}") from None
    return emb

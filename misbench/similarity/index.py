"""FAISS holds the embeddings of the images in use and answers distance queries."""

__all__ = ["EmbeddingIndex"]

import logging

import numpy as np

log = logging.getLogger(__name__)


def _faiss():
    import faiss

    return faiss


class EmbeddingIndex:
    """Exact L2 index over embeddings keyed by dataset row; a copy on GPU `gpu` serves searches
    when FAISS was built with GPU support (faiss-gpu)."""

    def __init__(self, rows: np.ndarray, embeddings: np.ndarray, gpu: int | None = None):
        faiss = _faiss()
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.position = {int(r): k for k, r in enumerate(self.rows)}
        self.dim = embeddings.shape[1]
        self.cpu = faiss.IndexFlatL2(self.dim)
        self.cpu.add(embeddings)
        self.gpu = None
        if gpu is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > gpu:
            self._resources = faiss.StandardGpuResources()
            self.gpu = faiss.index_cpu_to_gpu(self._resources, gpu, self.cpu)
            log.info("FAISS index over %d embeddings on GPU %d", len(self.rows), gpu)

    def __len__(self):
        return len(self.rows)

    def positions(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        return np.vectorize(self.position.__getitem__, otypes=[np.int64])(rows) if rows.size else rows.astype(np.int64)

    def vectors(self, rows) -> np.ndarray:
        pos = self.positions(np.asarray(rows).ravel())
        return self.cpu.reconstruct_batch(pos).reshape(*np.shape(rows), self.dim)

    def search(self, queries: np.ndarray, k: int):
        """k nearest indexed rows for each query vector: (squared distances, rows)."""
        index = self.cpu if self.gpu is None else self.gpu
        dist, pos = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return dist, np.where(pos >= 0, self.rows[np.clip(pos, 0, None)], -1)

    def distances(self, query_rows: np.ndarray, target_rows: np.ndarray) -> np.ndarray:
        """Squared distances from each query row to its own list of target rows: [n], [n, m] -> [n, m]."""
        faiss = _faiss()
        query_rows, target_rows = np.asarray(query_rows), np.asarray(target_rows)
        n, m = target_rows.shape
        q = np.ascontiguousarray(self.vectors(query_rows), dtype=np.float32)
        labels = np.ascontiguousarray(self.positions(target_rows.ravel()).reshape(n, m))
        out = np.empty((n, m), dtype=np.float32)
        self.cpu.compute_distance_subset(n, faiss.swig_ptr(q), m, faiss.swig_ptr(out), faiss.swig_ptr(labels))
        return out

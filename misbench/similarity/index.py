"""Exact squared-L2 distances between embeddings of the images in use: float64 products, FAISS or torch (DESIGN §7).

Every engine answers `distances(query_rows [n], target_rows [n, m]) -> [n, m]` and
`task_distances(queries [n, a], targets [n, m]) -> [n, a, m]` for a whole chunk of tasks at once.
Which one runs where (docs/performance.md has the measurements):
- "gram", the CPU default: where the run needs a good share of all pairs of its images (a few
  thousand images, many units), all their dot products at once in float64 (similarity/gram.py:
  ||a||^2 + ||b||^2 - 2ab, every vector read once), else the FAISS kernel below;
- "faiss": FAISS' per-pair kernel on CPU (`pairwise_indexed_L2sqr`: the bits `IndexFlatL2.compute_distance_subset`
  gives, read from the embeddings in place, one call per chunk);
- "torch": the embeddings as one tensor on the scoring device, distances from gathered blocks.
FAISS' GPU indexes have no subset-distance call (only k-NN search and all-pairs), so on CUDA the
torch engine is the GPU path; `EmbeddingIndex.search` still uses a GPU copy when faiss-gpu has one.
"""

__all__ = ["EmbeddingIndex", "TorchDistances", "GramDistances", "DISTANCE_ENGINES", "resolve_distances",
           "build_distances", "distances_per_task"]

import logging

import numpy as np
import torch

from . import gram

log = logging.getLogger(__name__)

BLOCK_BYTES = 64 << 20  # gathered target vectors per call (torch): bounds working memory


def _faiss():
    """FAISS, imported quietly: its loader announces at INFO which CPU build it loaded, which is not the user's
    business (the CLI hides it too; `-vv` there, or the logger "faiss" at DEBUG, shows it)."""
    loader = logging.getLogger("faiss")
    if loader.level == logging.NOTSET:  # a level the caller set is theirs
        loader.setLevel(logging.WARNING)
    # FAISS loads on first search: its import is slow
    import faiss

    return faiss


def distances_per_task(distances, queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each task's queries [n, a] against its targets [n, m] -> [n, a, m], from an engine's
    `distances(query_rows [N], target_rows [N, m])` (the targets repeated for every query)."""
    queries, targets = np.asarray(queries), np.asarray(targets)
    n, a = queries.shape
    d = distances(queries.ravel(), np.repeat(targets, a, axis=0))
    return np.asarray(d).reshape(n, a, targets.shape[1])


class _RowPositions:
    def __init__(self, rows: np.ndarray):
        self.rows = np.asarray(rows, dtype=np.int64)
        self._sorted = np.argsort(self.rows, kind="stable")

    def __len__(self):
        return len(self.rows)

    def task_distances(self, queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Dataset rows: each task's queries [n, a] against its own targets [n, m] -> [n, a, m]."""
        return distances_per_task(self.distances, queries, targets)

    def positions(self, rows) -> np.ndarray:
        """Positions of dataset rows in the embedding matrix (every row must be present)."""
        rows = np.asarray(rows, dtype=np.int64)
        where = np.searchsorted(self.rows, rows.ravel(), sorter=self._sorted)
        where = self._sorted[np.clip(where, 0, len(self.rows) - 1)]
        if rows.size and not np.array_equal(self.rows[where], rows.ravel()):
            raise KeyError("rows not in the index")
        return where.reshape(rows.shape)


class EmbeddingIndex(_RowPositions):
    """Exact L2 index over embeddings keyed by dataset row; a copy on GPU `gpu` serves searches
    when FAISS was built with GPU support (faiss-gpu)."""

    def __init__(self, rows: np.ndarray, embeddings: np.ndarray, gpu: int | None = None):
        super().__init__(rows)
        self._emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.dim = self._emb.shape[1]
        self._gpu_id, self._cpu, self.gpu = gpu, None, None
        if gpu is not None:  # a GPU copy is asked for: place it now
            self._searcher()

    def _searcher(self):
        """The FAISS index that serves searches, built on first use (distances read the embeddings in place):
        the GPU copy where one was asked for and exists, else the CPU index."""
        if self._cpu is None:
            faiss = _faiss()
            self._cpu = faiss.IndexFlatL2(self.dim)
            self._cpu.add(self._emb)
            gpu = self._gpu_id
            if gpu is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > gpu:
                self._resources = faiss.StandardGpuResources()
                self.gpu = faiss.index_cpu_to_gpu(self._resources, gpu, self._cpu)
                log.info("FAISS index over %d embeddings on GPU %d", len(self.rows), gpu)
        return self._cpu if self.gpu is None else self.gpu

    def vectors(self, rows) -> np.ndarray:
        pos = self.positions(np.asarray(rows).ravel())
        return self._emb[pos].reshape(*np.shape(rows), self.dim)

    def search(self, queries: np.ndarray, k: int):
        """k nearest indexed rows for each query vector: (squared distances, rows)."""
        dist, pos = self._searcher().search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return dist, np.where(pos >= 0, self.rows[np.clip(pos, 0, None)], -1)

    def distances(self, query_rows: np.ndarray, target_rows: np.ndarray) -> np.ndarray:
        """Squared distances from each query row to its own list of target rows: [n], [n, m] -> [n, m]."""
        faiss = _faiss()
        query_rows, target_rows = np.asarray(query_rows), np.asarray(target_rows)
        n, m = target_rows.shape
        # FAISS' per-pair kernel (fvec_L2sqr, as IndexFlatL2.compute_distance_subset runs it: the same bits) on
        # pairs of positions in the embeddings themselves: no query vectors gathered, no index copy
        first = np.ascontiguousarray(np.repeat(self.positions(query_rows), m), dtype=np.int64)
        second = np.ascontiguousarray(self.positions(target_rows).ravel(), dtype=np.int64)
        out = np.empty(n * m, dtype=np.float32)
        if n * m:
            emb = faiss.swig_ptr(self._emb)
            faiss.pairwise_indexed_L2sqr(self.dim, n * m, emb, faiss.swig_ptr(first), emb, faiss.swig_ptr(second),
                                         faiss.swig_ptr(out))
        return out.reshape(n, m)


class TorchDistances(_RowPositions):
    """The embeddings as one float32 tensor on `device`; distances as sum((q - t)^2) over gathered blocks."""

    def __init__(self, rows: np.ndarray, embeddings: np.ndarray, device):
        super().__init__(rows)
        self.device = torch.device(device)
        self.emb = torch.as_tensor(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
        self.dim = self.emb.shape[1]

    def vectors(self, rows) -> np.ndarray:
        pos = torch.as_tensor(self.positions(np.asarray(rows).ravel()), device=self.device)
        return self.emb[pos].cpu().numpy().reshape(*np.shape(rows), self.dim)

    def distances(self, query_rows: np.ndarray, target_rows: np.ndarray) -> np.ndarray:
        query_rows, target_rows = np.asarray(query_rows), np.asarray(target_rows)
        n, m = target_rows.shape
        q_pos = torch.as_tensor(self.positions(query_rows), device=self.device)
        t_pos = torch.as_tensor(self.positions(target_rows), device=self.device)
        step = max(1, BLOCK_BYTES // max(1, 4 * m * self.dim))
        out = []
        with torch.no_grad():
            for start in range(0, n, step):
                q = self.emb[q_pos[start:start + step]].unsqueeze(1)  # [b, 1, D]
                t = self.emb[t_pos[start:start + step]]  # [b, m, D]
                out.append((t - q).pow_(2).sum(-1))
        return torch.cat(out).cpu().numpy() if out else np.empty((0, m), np.float32)


class GramDistances(_RowPositions):
    """The CPU engine: where the pairs it will be asked for (`pairs`, else each call's) are at least
    1/DENSE_SHARE of all pairs of its images, and their dot products take no more memory than the
    embeddings, all dot products at once in float64 (similarity/gram.py: every vector read once) and
    distances looked up; otherwise FAISS' per-pair kernel (the faster for a few pairs of many images)."""

    DENSE_SHARE = 3  # a product of E E^T costs 1/3 of a FAISS pair at 2,000 rows, as much at 450 (performance.md)

    def __init__(self, rows: np.ndarray, embeddings: np.ndarray, pairs: int | None = None):
        super().__init__(rows)
        self.emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.dim = self.emb.shape[1]
        self.pairs = pairs
        self._dots, self._norms, self._faiss = None, None, None

    def vectors(self, rows) -> np.ndarray:
        return self.emb[self.positions(np.asarray(rows).ravel())].reshape(*np.shape(rows), self.dim)

    def _dense(self, pairs: int) -> bool:
        n = len(self.rows)
        return n * n <= self.emb.size // 2 and n * (n + 1) / 2 <= self.DENSE_SHARE * max(pairs, self.pairs or 0)

    def task_distances(self, queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
        queries, targets = np.asarray(queries), np.asarray(targets)
        if self._dots is None and self._faiss is None:
            if self._dense(queries.size * targets.shape[1]):
                self._dots, self._norms = gram.gram_matrix(self.emb), gram.squared_norms(self.emb)
                log.info("distances from all dot products of %d images", len(self.rows))
            else:
                self._faiss = EmbeddingIndex(self.rows, self.emb)
        if self._faiss is not None:
            return self._faiss.task_distances(queries, targets)
        q, t = self.positions(queries), self.positions(targets)
        return gram.from_products(self._norms[q][:, :, None], self._norms[t][:, None, :],
                                  self._dots[q[:, :, None], t[:, None, :]])

    def distances(self, query_rows: np.ndarray, target_rows: np.ndarray) -> np.ndarray:
        return self.task_distances(np.asarray(query_rows)[:, None], target_rows)[:, 0]


DISTANCE_ENGINES = {"gram": lambda rows, emb, device, pairs=None: GramDistances(rows, emb, pairs),
                    "faiss": lambda rows, emb, device, pairs=None: EmbeddingIndex(rows, emb),
                    "torch": lambda rows, emb, device, pairs=None: TorchDistances(rows, emb, device)}


def resolve_distances(name: str, device) -> str:
    """`auto`: torch on CUDA (the GPU path), the float64 matrix products on CPU (docs/performance.md)."""
    if name != "auto":
        return name
    return "torch" if torch.device(device).type == "cuda" else "gram"


def build_distances(name: str, rows: np.ndarray, embeddings: np.ndarray, device, pairs: int | None = None):
    """The engine `name` over `embeddings` of dataset `rows`; `pairs`: about how many distances it will be
    asked for in all (lets the gram engine compute all dot products at once where that is cheaper)."""
    return DISTANCE_ENGINES[resolve_distances(name, device)](rows, embeddings, device, pairs)

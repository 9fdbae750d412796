"""Squared L2 distances as blocked matrix products: ||a||^2 + ||b||^2 - 2 a.b, in float64.

The float32 embeddings are read once per block and widened to float64 there, so a product of two
coordinates is exact and a sum of thousands of them loses nothing a float32 result would show;
distances are then rounded to float32 like the other engines'. A result within float64 rounding
of 0 (the same image twice) is 0 exactly, as a direct sum of (a - b)^2 gives.

Two layouts, chosen by the caller (docs/performance.md has the measurements):
- `gram_matrix`: every pair of a set of images, symmetric blocks (one product per pair of blocks);
  cheapest when the pairs needed are a good share of all pairs (a few thousand images, many units);
- `task_distances`: each task's queries against its own targets, gathered block by block, every
  vector read once per task (not once per pair).
"""

__all__ = ["squared_norms", "gram_matrix", "from_products", "task_distances", "BLOCK_BYTES"]

import numpy as np

BLOCK_BYTES = 32 << 20  # float64 vectors widened at a time: bounds the working memory
_ZERO = 64 * np.finfo(np.float64).eps  # relative to ||a||^2 + ||b||^2: below it a distance is rounding


def _rows_per_block(dim: int, per_row: int = 1) -> int:
    return max(1, BLOCK_BYTES // (8 * dim * per_row))


def squared_norms(emb: np.ndarray) -> np.ndarray:
    """||e||^2 of every row, float64 [N]."""
    out = np.empty(len(emb))
    step = _rows_per_block(emb.shape[1])
    for start in range(0, len(emb), step):
        x = emb[start:start + step].astype(np.float64)
        out[start:start + step] = np.einsum("ij,ij->i", x, x)
    return out


def gram_matrix(emb: np.ndarray) -> np.ndarray:
    """All dot products e_i . e_j, float64 [N, N]: blocks of rows widened once per pair of blocks, the
    lower triangle of blocks copied from the upper."""
    n = len(emb)
    out = np.empty((n, n))
    step = _rows_per_block(emb.shape[1], 2)
    for i in range(0, n, step):
        a = emb[i:i + step].astype(np.float64)
        out[i:i + step, i:i + step] = a @ a.T
        for j in range(i + step, n, step):
            block = a @ emb[j:j + step].astype(np.float64).T
            out[i:i + step, j:j + step] = block
            out[j:j + step, i:i + step] = block.T
    return out


def from_products(norm_q: np.ndarray, norm_t: np.ndarray, dots: np.ndarray) -> np.ndarray:
    """float32 distances from float64 squared norms and dot products (broadcast alike)."""
    total = norm_q + norm_t
    d = total - 2 * dots
    d[d <= _ZERO * total] = 0.0
    return d.astype(np.float32)


def task_distances(emb: np.ndarray, norms: np.ndarray, queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Distances of each task's queries to its targets: positions [n, a] and [n, m] into `emb` -> float32
    [n, a, m]; the vectors of a block of tasks are gathered once, widened, and multiplied per task."""
    n, a = queries.shape
    m = targets.shape[1]
    out = np.empty((n, a, m), np.float32)
    step = _rows_per_block(emb.shape[1], a + m)
    for start in range(0, n, step):
        q, t = queries[start:start + step], targets[start:start + step]
        qv = np.take(emb, q, axis=0).astype(np.float64)  # [b, a, D]
        tv = np.take(emb, t, axis=0).astype(np.float64)  # [b, m, D]
        out[start:start + step] = from_products(norms[q][:, :, None], norms[t][:, None, :],
                                                np.matmul(qv, tv.transpose(0, 2, 1)))
    return out

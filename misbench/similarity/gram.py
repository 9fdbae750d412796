"""Squared L2 distances from all dot products of a set of images: ||a||^2 + ||b||^2 - 2 a.b, in float64.

One symmetric product E E^T over slices of the embeddings' columns, each slice widened to float64
(a product of two float32 coordinates is then exact, and the sums lose nothing a float32 result
would show), so every vector is read once for all its pairs; distances are looked up and rounded to
float32 like the other engines'. A result within float64 rounding of 0 (the same image twice) is 0
exactly, as a direct sum of (a - b)^2 gives. Worth it where the pairs needed are a good share of all
pairs: a few thousand images scored for many units (docs/performance.md).
"""

__all__ = ["squared_norms", "gram_matrix", "from_products", "BLOCK_BYTES"]

import numpy as np

BLOCK_BYTES = 32 << 20  # float64 columns widened at a time: bounds the working memory beyond the result
_ZERO = 64 * np.finfo(np.float64).eps  # relative to ||a||^2 + ||b||^2: below it a distance is rounding


def _columns_per_block(rows: int) -> int:
    return max(1, BLOCK_BYTES // (8 * max(rows, 1)))


def squared_norms(emb: np.ndarray) -> np.ndarray:
    """||e||^2 of every row, float64 [N]."""
    out = np.zeros(len(emb))
    step = _columns_per_block(len(emb))
    for start in range(0, emb.shape[1], step):
        x = emb[:, start:start + step].astype(np.float64)
        out += np.einsum("ij,ij->i", x, x)
    return out


def gram_matrix(emb: np.ndarray) -> np.ndarray:
    """All dot products e_i . e_j, float64 [N, N]: the sum over column slices of slice @ slice.T (BLAS'
    symmetric product), each slice widened to float64 once."""
    out = np.zeros((len(emb), len(emb)))
    step = _columns_per_block(len(emb))
    for start in range(0, emb.shape[1], step):
        x = emb[:, start:start + step].astype(np.float64)
        out += x @ x.T
    return out


def from_products(norm_q: np.ndarray, norm_t: np.ndarray, dots: np.ndarray) -> np.ndarray:
    """float32 distances from float64 squared norms and dot products (broadcast alike)."""
    total = norm_q + norm_t
    d = total - 2 * dots
    d[d <= _ZERO * total] = 0.0
    return d.astype(np.float32)

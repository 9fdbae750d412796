"""The MonoSemanticity score (Pach et al. 2025, arXiv 2504.02821) as pure functions.

Per unit, the activations a_i over the N images are min-max scaled to [0, 1]; with e_i the image embeddings
scaled to unit norm (cosine similarity s_ij = e_i . e_j),

    MS = sum_{i<j} a_i a_j s_ij / sum_{i<j} a_i a_j.

Both sums are computed in O(N d) per unit, never over the N^2 pairs:

    sum_{i<j} a_i a_j e_i . e_j = (|sum_i a_i e_i|^2 - sum_i a_i^2 |e_i|^2) / 2,
    sum_{i<j} a_i a_j           = ((sum_i a_i)^2   - sum_i a_i^2) / 2,

so all units of a layer are one matrix product A^T E, taken in blocks of rows and units (bounded memory).
An embedding of norm 0 has cosine 0 with every image. A unit whose range is 0 (constant), or whose pair
weights sum to 0 (at most one image above its minimum), has no score: NaN.
"""

__all__ = ["ms_scores", "MS_BLOCK_BYTES"]

import numpy as np
import torch

MS_BLOCK_BYTES = 256 << 20  # the [units, dims] accumulator of one unit block stays below this


def ms_scores(acts, emb, device="cpu", block_bytes: int = MS_BLOCK_BYTES) -> np.ndarray:
    """MS of every unit: `acts` [N, U] raw activations (min-max scaled here), `emb` [N, d] embeddings of the
    same rows, in that order. Returns [U] float64, NaN where undefined. Float64 throughout, on `device`;
    temporaries of about `block_bytes` each. `acts` may be any 2-D array that slices into numpy arrays (an h5py
    dataset): it is read in blocks of rows and units, never whole."""
    if not (hasattr(acts, "shape") and hasattr(acts, "__getitem__")):
        acts = np.asarray(acts)
    emb = np.asarray(emb)
    if len(acts.shape) != 2 or emb.ndim != 2 or acts.shape[0] != len(emb):
        raise ValueError(f"ms_scores: acts [N, U] and emb [N, d] must share N, got {acts.shape} and {emb.shape}")
    n, units = acts.shape
    dim = emb.shape[1]
    device = torch.device(device)
    low, high = np.full(units, np.inf), np.full(units, -np.inf)
    range_rows = max(1, int(block_bytes // (8 * max(units, 1))))
    for r0 in range(0, n, range_rows):  # each unit's range, a block of rows at a time
        block = np.asarray(acts[r0:r0 + range_rows], np.float64)
        low, high = np.minimum(low, block.min(0)), np.maximum(high, block.max(0))
    span = np.where(high > low, high - low, np.inf)  # a constant unit scales to 0 everywhere, then NaN below
    unit_step = max(1, int(block_bytes // (8 * max(dim, 1))))
    row_step = max(1, int(block_bytes // (8 * max(min(units, unit_step), dim, 1))))  # one block of A, E
    out = np.full(units, np.nan)
    for u0 in range(0, units, unit_step):
        cols = slice(u0, min(units, u0 + unit_step))
        lo = torch.as_tensor(low[cols], device=device)
        sp = torch.as_tensor(span[cols], device=device)
        s = torch.zeros(cols.stop - u0, dim, dtype=torch.float64, device=device)  # sum_i a_i e_i
        sum_a = torch.zeros(cols.stop - u0, dtype=torch.float64, device=device)
        sum_a2 = torch.zeros_like(sum_a)  # sum_i a_i^2
        sum_a2e = torch.zeros_like(sum_a)  # sum_i a_i^2 |e_i|^2
        for r0 in range(0, n, row_step):
            e = torch.as_tensor(np.asarray(emb[r0:r0 + row_step], np.float64), device=device)
            norm2 = (e * e).sum(1)
            e = e / torch.where(norm2 > 0, norm2.sqrt(), torch.ones_like(norm2))[:, None]
            norm2 = (norm2 > 0).to(torch.float64)  # |e_i|^2 after scaling: 1, or 0 for a zero embedding
            a = (torch.as_tensor(np.asarray(acts[r0:r0 + row_step, cols], np.float64), device=device) - lo) / sp
            s += a.T @ e
            sum_a += a.sum(0)
            a2 = a * a
            sum_a2 += a2.sum(0)
            sum_a2e += a2.T @ norm2
        num = ((s * s).sum(1) - sum_a2e) / 2
        den = (sum_a * sum_a - sum_a2) / 2
        ms = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                         torch.full_like(den, float("nan")))
        out[cols] = ms.cpu().numpy()
    out[~(high > low)] = np.nan
    return out

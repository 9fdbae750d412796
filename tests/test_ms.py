"""The MonoSemanticity score against its definition computed over every pair (Pach et al. 2025, eq. 7-9)."""

import itertools

import numpy as np
import pytest

from misbench.scoring.ms import ms_scores


def brute_ms(acts: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """O(N^2) per unit: min-max scaled activations, cosine similarity of every pair i < j."""
    out = []
    for a in acts.T.astype(float):
        if a.max() == a.min():
            out.append(np.nan)
            continue
        a = (a - a.min()) / (a.max() - a.min())
        num = den = 0.0
        for i, j in itertools.combinations(range(len(a)), 2):
            ni, nj = np.linalg.norm(emb[i]), np.linalg.norm(emb[j])
            cos = 0.0 if ni == 0 or nj == 0 else float(emb[i] @ emb[j]) / (ni * nj)
            num += a[i] * a[j] * cos
            den += a[i] * a[j]
        out.append(num / den if den > 0 else np.nan)
    return np.array(out)


@pytest.mark.parametrize("blocks", [dict(), dict(block_bytes=8 * 5 * 3)])
def test_ms_matches_brute_force_pairs(blocks):
    rng = np.random.default_rng(0)
    n, d = 60, 5
    emb = rng.normal(size=(n, d))
    emb[3] = 0  # a zero embedding: cosine 0 with every image
    acts = np.column_stack([
        rng.normal(size=n),                       # dense
        np.maximum(rng.normal(size=n) - 1.5, 0),  # sparse: most rows at the minimum
        emb[:, 0] * 3 + 1,                        # follows one embedding direction
        np.full(n, 2.0),                          # constant: no score
        np.eye(n)[5] * 4.0,                       # one image above the minimum: no pairs, no score
        rng.exponential(size=n).astype(np.float16),
    ])
    fast = ms_scores(acts, emb, **blocks)
    ref = brute_ms(acts, emb)
    assert np.array_equal(np.isnan(fast), np.isnan(ref)) and np.isnan(fast[[3, 4]]).all()
    np.testing.assert_allclose(fast[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=0, atol=1e-6)


def test_ms_rewards_units_whose_top_images_look_alike():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16))
    label = rng.integers(0, 4, 400)
    emb = centres[label] + 0.3 * rng.normal(size=(400, 16))
    selective = (label == 2) * rng.uniform(1, 2, 400)
    mixed = rng.uniform(0, 1, 400)
    ms = ms_scores(np.column_stack([selective, mixed]), emb)
    assert ms[0] > 0.8 and ms[1] < 0.5 and ms[0] > ms[1] + 0.3


def test_ms_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="share N"):
        ms_scores(np.zeros((5, 2)), np.zeros((4, 3)))

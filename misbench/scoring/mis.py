"""The Mechanistic Interpretability Score as pure functions (DESIGN §8).

Notation per unit and task t: E+ / E- are K explanations from the top / bottom of the
activation ranking, q+ / q- the queries; s(q, E) = mean_e sim(q, e) with sim = -distance;
delta = [s(q+,E+) - s(q+,E-)] - [s(q-,E+) - s(q-,E-)]; a task is decided correctly when
delta > 0 (ties count 1/2).
"""

__all__ = [
    "Tasks", "unit_rng", "tie_keys", "is_constant", "rank_rows", "select_fair", "select_quantile", "SELECTIONS",
    "task_deltas", "decisions", "confidences", "CONSTANT_RANGE", "non_finite_rows",
]

import dataclasses
import zlib

import numpy as np

from ..activations.order import non_finite_rows, tie_keys
from ..errors import MisbenchError

CONSTANT_RANGE = 1e-8


@dataclasses.dataclass
class Tasks:
    """Row indices of one unit's tasks: pos/neg explanations [T, K], queries [T]."""

    pos_expl: np.ndarray
    neg_expl: np.ndarray
    pos_query: np.ndarray
    neg_query: np.ndarray


def unit_rng(seed: int, layer: str, unit: int, stream: int) -> np.random.Generator:
    """Independent of which other units are scored (shards give the same tasks)."""
    return np.random.default_rng([seed, zlib.crc32(layer.encode()), unit, stream])


def is_constant(acts: np.ndarray) -> bool:
    return bool(np.max(acts) - np.min(acts) < CONSTANT_RANGE)


def rank_rows(acts: np.ndarray, keys: np.ndarray, descending: bool, first: int | None = None) -> np.ndarray:
    """Positions of `acts` by activation; ties broken by the seeded `keys` (tie_keys), never by row order.

    With `first`, only the first `first` positions, the same as the full ranking's: the rows at least as
    extreme as the first-th value (ties included) are found by a partition, and only they are sorted."""
    acts = np.asarray(acts, dtype=np.float64)
    signed = -acts if descending else acts
    if first is not None and 0 < first < len(signed):
        bound = np.partition(signed, first - 1)[first - 1]
        if not np.isnan(bound):  # NaNs rank last: a NaN bound means fewer than `first` numbers
            candidates = np.flatnonzero(signed <= bound)
            return candidates[np.lexsort((keys[candidates], signed[candidates]))][:first]
    return np.lexsort((keys, signed))[:first]


def _check_rows(n_rows: int, needed: int, what: str):
    if n_rows < needed:
        raise MisbenchError(f"{what} needs at least {needed} rows in the activation file, found {n_rows}: "
                            "extract more images, or lower --tasks/--explanations")


def select_fair(acts: np.ndarray, rows: np.ndarray, keys: np.ndarray, n_rows: int, rng: np.random.Generator,
                n_tasks: int = 20, n_expl: int = 9) -> Tasks:
    """IMI's selection: the top (K+1)*T ranks form K+1 bins of T; each bin shuffled; task t takes
    element t of bins 0..K-1 as explanations and of bin K as the query. Same on the bottom side.

    `acts`/`rows`/`keys` are the candidate rows (all rows, or a top/bottom-k subset of `n_rows`)."""
    per_side = (n_expl + 1) * n_tasks
    _check_rows(n_rows, 2 * per_side, "--selection fair")
    if len(acts) < per_side:
        raise MisbenchError(f"only {len(acts)} candidate rows per unit, fair selection needs {per_side} per side: "
                            f"extract with --keep topk:K, K >= {per_side}")
    sides = []
    for descending in (True, False):
        ranked = rows[rank_rows(acts, keys, descending, per_side)].reshape(n_expl + 1, n_tasks)
        bins = np.stack([rng.permutation(b) for b in ranked])  # [K+1, T]
        sides.append((bins[:n_expl].T.copy(), bins[n_expl].copy()))
    (pe, pq), (ne, nq) = sides
    return Tasks(pe, ne, pq, nq)


def select_quantile(acts: np.ndarray, rows: np.ndarray, keys: np.ndarray, n_rows: int, rng: np.random.Generator,
                    n_tasks: int = 20, n_expl: int = 9, quantile: float = 0.2) -> Tasks:
    """Each task samples K+1 rows of the top (bottom) `quantile` fraction; the least extreme is the query."""
    if not 0 < quantile <= 0.5:
        raise MisbenchError(f"--quantile must be in (0, 0.5], got {quantile}")
    pool = int(np.ceil(quantile * n_rows))
    if pool < n_expl + 1:
        raise MisbenchError(f"--quantile {quantile} of {n_rows} rows leaves {pool} images per side; "
                            f"a task needs {n_expl + 1}")
    if pool > len(acts):
        raise MisbenchError(f"--quantile {quantile} needs the top {pool} rows per unit; this file keeps {len(acts)}")
    sides = []
    for descending in (True, False):
        ranked = rows[rank_rows(acts, keys, descending, pool)]
        picks = np.sort(np.stack([rng.choice(pool, n_expl + 1, replace=False) for _ in range(n_tasks)]), axis=1)
        chosen = ranked[picks]  # rank order: most extreme first
        sides.append((chosen[:, :n_expl].copy(), chosen[:, n_expl].copy()))
    (pe, pq), (ne, nq) = sides
    return Tasks(pe, ne, pq, nq)


SELECTIONS = {"fair": select_fair, "quantile": select_quantile}


def task_deltas(d_pos_query: np.ndarray, d_neg_query: np.ndarray, n_expl: int) -> np.ndarray:
    """Distances of q+ and q- to [E+ | E-] ([T, 2K] each) -> delta [T] (similarity = -distance)."""
    s = lambda d: -np.asarray(d, dtype=np.float64)  # noqa: E731
    s_pp, s_pm = s(d_pos_query[:, :n_expl]).mean(1), s(d_pos_query[:, n_expl:]).mean(1)
    s_mp, s_mm = s(d_neg_query[:, :n_expl]).mean(1), s(d_neg_query[:, n_expl:]).mean(1)
    return (s_pp - s_pm) - (s_mp - s_mm)


def decisions(deltas: np.ndarray) -> np.ndarray:
    """1 for delta > 0, 1/2 for a tie, 0 otherwise."""
    return (np.sign(deltas) + 1) / 2


def confidences(deltas: np.ndarray, alpha: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-alpha * np.asarray(deltas, dtype=np.float64)))

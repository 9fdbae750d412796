"""The Mechanistic Interpretability Score as pure functions (DESIGN §8).

Notation per unit and task t: E+ / E- are K explanations from the top / bottom of the
activation ranking, q+ / q- the queries; s(q, E) = mean_e sim(q, e) with sim = -distance;
delta = [s(q+,E+) - s(q+,E-)] - [s(q-,E+) - s(q-,E-)]; a task is decided correctly when
delta > 0 (ties count 1/2).
"""

__all__ = [
    "Tasks", "unit_rng", "tie_keys", "is_constant", "rank_rows", "select_fair", "select_quantile", "SELECTIONS",
    "Selection", "register_selection", "task_deltas", "decisions", "confidences", "CONSTANT_ULPS", "non_finite_rows",
    "UnitScore", "score_unit", "stored_value", "density", "pool_ties", "is_sparse", "unit_facts",
]

import dataclasses
import zlib
from typing import Callable

import numpy as np

from ..activations.order import non_finite_rows, tie_keys
from ..errors import MisbenchError
from ..registry import register
from ..runtime.fileio import option_label
from .summaries import clopper_pearson, confidence_intervals

# a unit whose range is at most this many units of the stored dtype's resolution at its magnitude is constant:
# such differences are rounding, not an ordering of the images (a pruned filter's output after BatchNorm)
CONSTANT_ULPS = 4


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


def is_constant(acts: np.ndarray, dtype=None) -> bool:
    """True when the unit's range is negligible relative to its magnitude at the resolution of `dtype` (the
    stored dtype; default: that of `acts`): max - min <= CONSTANT_ULPS * eps(dtype) * max|a|. Exactly equal
    values are constant at any scale; a unit of magnitude 1e-9 with a real ordering is not."""
    acts = np.asarray(acts)
    dtype = np.dtype(dtype if dtype is not None else acts.dtype)
    eps = float(np.finfo(dtype if np.issubdtype(dtype, np.floating) else np.float64).eps)
    hi, lo = float(np.max(acts)), float(np.min(acts))
    return bool(hi - lo <= CONSTANT_ULPS * eps * max(abs(hi), abs(lo)))


def density(acts: np.ndarray, n_rows: int) -> float:
    """The share of the `n_rows` rows above the unit's minimum. `acts` are all rows, or a top/bottom-k file's
    kept rows: the rows it does not keep are counted as above the minimum (an upper bound when every kept
    bottom row holds the minimum)."""
    acts = np.asarray(acts)
    return float((n_rows - np.count_nonzero(acts == acts.min())) / n_rows)


def _side_ties(values: np.ndarray, pool: int) -> int:
    """Rows of the top `pool` of `values` (descending) chosen among a tie group that straddles the pool's
    boundary: pool - (rows strictly above the boundary value), or 0 when the group ends at the boundary."""
    if pool <= 0 or pool >= len(values):
        return 0
    boundary = -np.partition(-values, pool - 1)[pool - 1]
    above, at_least = np.count_nonzero(values > boundary), np.count_nonzero(values >= boundary)
    return int(pool - above) if at_least > pool else 0


def pool_ties(acts: np.ndarray, pool: int) -> tuple[int, int]:
    """(top_random, bottom_random): how many rows of the top / bottom selection pool of `pool` rows were
    chosen among tied values by the tie keys rather than by activation (DESIGN §8)."""
    acts = np.asarray(acts, dtype=np.float64)
    return _side_ties(acts, pool), _side_ties(-acts, pool)


def is_sparse(acts: np.ndarray, pool: int) -> bool:
    """True when the top pool reaches the unit's minimum: fewer rows lie above the minimum than the pool holds."""
    acts = np.asarray(acts)
    return bool(np.count_nonzero(acts > acts.min()) < pool)


def unit_facts(acts: np.ndarray, n_rows: int, pool: int) -> dict:
    """What mis.csv says about a unit's rows besides its scores: `density`, `top_random`, `bottom_random`,
    and whether it is `sparse` (its top pool of `pool` rows reaches its minimum)."""
    top, bottom = pool_ties(acts, pool)
    return {"density": stored_value(density(acts, n_rows)), "top_random": top, "bottom_random": bottom,
            "sparse": is_sparse(acts, pool)}


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


def _check_rows(n_rows: int, needed: int, selection: str):
    if n_rows < needed:
        hint = f", or use {option_label('selection')} quantile (any number of rows)" if selection == "fair" else ""
        raise MisbenchError(f"{option_label('selection')} {selection} needs at least {needed} rows in the activation "
                            f"file, found {n_rows}: extract more images, or lower {option_label('tasks')}/"
                            f"{option_label('explanations')}{hint}")


def _quantile_pool(n_rows: int, quantile: float, n_expl: int) -> int:
    if not 0 < quantile <= 0.5:
        raise MisbenchError(f"{option_label('quantile')} must be in (0, 0.5], got {quantile}")
    pool = int(np.ceil(quantile * n_rows))
    if pool < n_expl + 1:
        raise MisbenchError(f"{option_label('quantile')} {quantile} of {n_rows} rows leaves {pool} images per side; "
                            f"a task needs {n_expl + 1}")
    return pool


def select_fair(acts: np.ndarray, rows: np.ndarray, keys: np.ndarray, n_rows: int, rng: np.random.Generator,
                n_tasks: int = 20, n_expl: int = 9) -> Tasks:
    """IMI's selection: the top (K+1)*T ranks form K+1 bins of T; each bin shuffled; task t takes
    element t of bins 0..K-1 as explanations and of bin K as the query. Same on the bottom side.

    `acts`/`rows`/`keys` are the candidate rows (all rows, or a top/bottom-k subset of `n_rows`)."""
    per_side = (n_expl + 1) * n_tasks
    _check_rows(n_rows, 2 * per_side, "fair")
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
    pool = _quantile_pool(n_rows, quantile, n_expl)
    if pool > len(acts):
        raise MisbenchError(f"{option_label('quantile')} {quantile} needs the top {pool} rows per unit; this file keeps "
                            f"{len(acts)}")
    sides = []
    for descending in (True, False):
        ranked = rows[rank_rows(acts, keys, descending, pool)]
        picks = np.sort(np.stack([rng.choice(pool, n_expl + 1, replace=False) for _ in range(n_tasks)]), axis=1)
        chosen = ranked[picks]  # rank order: most extreme first
        sides.append((chosen[:, :n_expl].copy(), chosen[:, n_expl].copy()))
    (pe, pq), (ne, nq) = sides
    return Tasks(pe, ne, pq, nq)


@dataclasses.dataclass(frozen=True)
class Selection:
    """A way to choose a unit's tasks. Both functions take the run's settings (ScoreSettings: tasks,
    explanations, quantile, ...): `select(acts, rows, keys, n_rows, rng, settings) -> Tasks` over the candidate
    rows, and `per_side(settings, n_rows)`, how many ranks per side it reads (a top/bottom-k file must keep them).
    `check(settings, n_rows)` refuses a file with too few rows for it: called before any backend loads."""

    select: Callable[..., Tasks]
    per_side: Callable[..., int]
    check: Callable[..., None] = lambda settings, n_rows: None


SELECTIONS: dict[str, Selection] = {}  # --selection, in registration order


def register_selection(name: str, per_side: Callable[..., int], check: Callable[..., None] | None = None):
    """Decorator: `select(acts, rows, keys, n_rows, rng, settings) -> Tasks` is `--selection name`."""
    def decorate(select):
        register(SELECTIONS, name, Selection(select, per_side, *([check] if check else [])), "selection")
        return select
    return decorate


@register_selection("fair", per_side=lambda s, n_rows: (s.explanations + 1) * s.tasks,
                    check=lambda s, n_rows: _check_rows(n_rows, 2 * (s.explanations + 1) * s.tasks, "fair"))
def _fair(acts, rows, keys, n_rows, rng, s) -> Tasks:
    return select_fair(acts, rows, keys, n_rows, rng, s.tasks, s.explanations)


@register_selection("quantile", per_side=lambda s, n_rows: int(np.ceil(s.quantile * n_rows)),
                    check=lambda s, n_rows: _quantile_pool(n_rows, s.quantile, s.explanations) and None)
def _quantile(acts, rows, keys, n_rows, rng, s) -> Tasks:
    return select_quantile(acts, rows, keys, n_rows, rng, s.tasks, s.explanations, s.quantile)


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


def stored_value(x: float) -> float:
    """The value as mis.csv stores it, so summaries recomputed from CSVs (merged shards) are identical."""
    return float(f"{x:.6g}")


@dataclasses.dataclass(frozen=True, eq=False)
class UnitScore:
    """One unit's result, as mis.csv stores it (`tasks` and `deltas` go to tasks.h5; a merge of shards,
    read back from mis.csv, has neither). A constant unit has no tasks and no scores."""

    layer: str
    unit: int
    status: str  # ok | constant | sparse (scored, left out of means unless --keep-sparse)
    mis: float | None = None
    mis_confidence: float | None = None
    mis_ci: tuple = (None, None)
    conf_ci: tuple = (None, None)
    n_tasks: int = 0
    tasks: Tasks | None = None
    deltas: np.ndarray | None = None
    density: float | None = None  # share of rows above the unit's minimum
    top_random: int | None = None  # rows of the top / bottom pool chosen among ties by the tie keys
    bottom_random: int | None = None
    ms: float | None = None  # the MonoSemanticity score (with metrics mis,ms)


def score_unit(layer: str, unit: int, tasks: Tasks, deltas: np.ndarray, settings, conf_ci=None,
               facts: dict | None = None) -> UnitScore:
    """A unit's MIS, confidence and their intervals from its task deltas; `settings` is the run's resolved
    ScoreSettings (alpha). `conf_ci`: the confidence interval when computed for many units at once
    (summaries.confidence_intervals; by default computed here, the same numbers); `facts`: unit_facts (a
    sparse unit gets the status `sparse`)."""
    correct, conf = decisions(deltas), confidences(deltas, settings.alpha)
    if conf_ci is None:
        conf_ci = tuple(float(v[0]) for v in confidence_intervals(conf[None]))
    facts = dict(facts or {})
    status = "sparse" if facts.pop("sparse", False) else "ok"
    return UnitScore(layer, unit, status, mis=stored_value(correct.mean()), mis_confidence=stored_value(conf.mean()),
                     mis_ci=tuple(map(stored_value, clopper_pearson(correct.sum(), len(correct)))),
                     conf_ci=(None, None) if np.isnan(conf_ci[0]) else tuple(map(stored_value, conf_ci)),
                     n_tasks=len(deltas), tasks=tasks, deltas=deltas, **facts)

"""Interval statistics of MIS, computed in one place (DESIGN §8.6).

Per unit, `mis` is a proportion of T tasks, so its interval is exact (Clopper-Pearson);
`mis_confidence` is a mean of T values in [0, 1], whose interval is Clopper-Pearson's at an effective number
of tasks (`confidence_intervals`: closed form, vectorised over units, no random draws). Layer and
model summaries are means over non-constant units with bootstrap intervals over units; every
writer (mis.json, `report layers`, `report sweep`) calls `score_summaries`, so one file gives
one set of intervals whatever reads it.

Layer-balanced means weigh every layer equally: the mean over layers of each layer's mean over
its non-constant units. Pooled unit means move when pruning removes units (pruned filters become
constant and drop out; class units score lower than conv units), even when no remaining unit's
score changes; the layer-balanced feature mean does not.
"""

__all__ = ["CLASS_LAYERS", "clopper_pearson", "bootstrap_mean_ci", "summary_rng", "mean_summary", "score_summaries",
           "is_class_layer", "confidence_intervals", "MAX_TRIALS_PER_TASK", "NO_INTERVAL", "is_counted"]

import zlib

import numpy as np

CLASS_LAYERS = ("softmax", "logits")
LEVEL = 0.95


def _stats():
    # scipy (about a second) loads with the first interval: this module's names are also read by the settings
    # that every command checks, `misbench extract` and `prune` among them
    from scipy import stats

    return stats


def is_class_layer(name: str) -> bool:
    return name in CLASS_LAYERS


def is_counted(status: str, keep_sparse: bool = False) -> bool:
    """Whether a unit of this status enters means and comparisons: `ok` always, `sparse` with --keep-sparse,
    `constant` never (DESIGN §8.1)."""
    return status == "ok" or (keep_sparse and status == "sparse")


def clopper_pearson(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact binomial interval of successes/n (ties counted 1/2 give a half-integer count)."""
    if n <= 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo = 0.0 if successes <= 0 else float(_stats().beta.ppf(a, successes, n - successes + 1))
    hi = 1.0 if successes >= n else float(_stats().beta.ppf(1 - a, successes + 1, n - successes))
    return lo, hi


# a task's confidence counts as at most this many Bernoulli trials: the dispersion of 20 values near a bound
# is often underestimated (a sample that misses the rare low values), and this floor keeps the simulated
# coverage >= 0.94 for true means 0.5-0.95 (tests/test_statistics.py; docs/mis.md)
MAX_TRIALS_PER_TASK = 5
NO_INTERVAL = "one task gives no interval for mis_confidence (its spread is unknown): score with --tasks 2 or more"


def _beta_ppf_or(q: float, a: np.ndarray, b: np.ndarray, where: np.ndarray, fill: float) -> np.ndarray:
    out = np.full(np.shape(a), fill, dtype=np.float64)
    out[where] = _stats().beta.ppf(q, a[where], b[where])
    return out


def confidence_intervals(conf, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Intervals of the mean of each row of `conf` [U, T] (values in [0, 1]): Clopper-Pearson at the effective
    number of tasks (Korn & Graubard 1998). With p the mean and v = var/T its variance (ddof 1),
    n* = min(p(1 - p) / v, MAX_TRIALS_PER_TASK * T) * (z / t_{T-1})^2 and k = p n*:
    [B(a/2; k, n* - k + 1), B(1 - a/2; k + 1, n* - k)] (0 and 1 at the ends). Rows of fewer than two tasks
    get NaN (NO_INTERVAL). Deterministic: the same values give the same interval."""
    conf = np.atleast_2d(np.asarray(conf, dtype=np.float64))
    U, T = conf.shape
    lo, hi = np.full(U, np.nan), np.full(U, np.nan)
    if T < 2:
        return lo, hi
    p = conf.mean(axis=1)
    v = conf.var(axis=1, ddof=1) / T
    cap = MAX_TRIALS_PER_TASK * T
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff = np.where(v > 0, p * (1 - p) / v, cap)
    a = (1 - level) / 2
    n_eff = np.minimum(n_eff, cap) * (_stats().norm.ppf(1 - a) / _stats().t.ppf(1 - a, T - 1)) ** 2
    k = np.clip(p * n_eff, 0, n_eff)
    lo = _beta_ppf_or(a, k, n_eff - k + 1, k > 0, 0.0)
    hi = _beta_ppf_or(1 - a, k + 1, n_eff - k, k < n_eff, 1.0)
    return lo, hi


def summary_rng(seed: int, layer: str, stream: int) -> np.random.Generator:
    """The random stream of one summary: the same for every writer of that summary."""
    return np.random.default_rng([seed, zlib.crc32(layer.encode()), stream])


def bootstrap_mean_ci(samples, rng: np.random.Generator, n_boot: int = 1000, level: float = LEVEL):
    """Percentile bootstrap interval (scipy.stats.bootstrap) of the mean of one sample, or of the
    mean of several samples' means (each resampled within itself: a stratified bootstrap).

    Percentile rather than BCa: BCa's jackknife is quadratic in the sample size, and layers hold
    thousands of units."""
    samples = [np.asarray(s, dtype=np.float64) for s in (samples if isinstance(samples, list) else [samples])]
    samples = [s for s in samples if len(s)]
    if not samples:
        return float("nan"), float("nan")
    # a sample without spread (or of one value) has the same mean in every resample: a constant term
    fixed = [float(s[0]) for s in samples if np.ptp(s) == 0]
    varying = [s for s in samples if np.ptp(s) > 0]
    if not varying:
        value = float(np.mean(fixed))
        return value, value

    def statistic(*xs, axis=-1):
        return (np.sum([np.mean(x, axis=axis) for x in xs], axis=0) + sum(fixed)) / len(samples)

    res = _stats().bootstrap(varying, statistic, n_resamples=n_boot, confidence_level=level, method="percentile",
                          vectorized=True, random_state=rng)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_summary(mis, conf, rng, n_boot: int) -> dict:
    mis, conf = np.asarray(mis, np.float64), np.asarray(conf, np.float64)
    return {"n_units": int(len(mis)),
            "mis": float(mis.mean()) if len(mis) else None,
            "mis_confidence": float(conf.mean()) if len(conf) else None,
            "mis_ci": list(bootstrap_mean_ci(mis, rng, n_boot)) if len(mis) else [None, None],
            "mis_confidence_ci": list(bootstrap_mean_ci(conf, rng, n_boot)) if len(conf) else [None, None]}


def _balanced(groups: dict, rng, n_boot: int) -> dict:
    """Layer-balanced means of (mis, conf) per layer, with a bootstrap over units within each layer."""
    groups = {k: v for k, v in groups.items() if len(v[0])}
    mis = [np.asarray(v[0], np.float64) for v in groups.values()]
    conf = [np.asarray(v[1], np.float64) for v in groups.values()]
    return {"n_layers": len(groups), "n_units": int(sum(len(m) for m in mis)),
            "mis": float(np.mean([m.mean() for m in mis])) if mis else None,
            "mis_confidence": float(np.mean([c.mean() for c in conf])) if conf else None,
            "mis_ci": list(bootstrap_mean_ci(mis, rng, n_boot)) if mis else [None, None],
            "mis_confidence_ci": list(bootstrap_mean_ci(conf, rng, n_boot)) if conf else [None, None]}


def score_summaries(rows, layer_order, seed: int = 0, n_boot: int = 1000, keep_sparse: bool = False) -> dict:
    """Per-layer, pooled model and layer-balanced (feature / class) summaries of mis.csv rows.

    rows: dicts with layer, status ('ok'|'constant'|'sparse'), mis, mis_confidence. `sparse` units are left
    out of the means unless `keep_sparse`; every summary counts the constant and sparse units."""
    per_layer, feature, classes, pooled = {}, {}, {}, ([], [])
    excluded = {"feature": [0, 0], "class": [0, 0]}
    for name in layer_order:
        mine = [r for r in rows if r["layer"] == name]
        ok = [r for r in mine if is_counted(r["status"], keep_sparse)]
        m, c = [r["mis"] for r in ok], [r["mis_confidence"] for r in ok]
        n_constant = sum(1 for r in mine if r["status"] == "constant")
        n_sparse = sum(1 for r in mine if r["status"] == "sparse")
        per_layer[name] = {**mean_summary(m, c, summary_rng(seed, name, 2), n_boot), "n_constant": n_constant,
                           "n_sparse": n_sparse}
        kind = "class" if is_class_layer(name) else "feature"
        (classes if kind == "class" else feature)[name] = (m, c)
        excluded[kind][0] += n_constant
        excluded[kind][1] += n_sparse
        pooled[0].extend(m)
        pooled[1].extend(c)

    def counts(kinds):
        return {"n_constant": sum(excluded[k][0] for k in kinds), "n_sparse": sum(excluded[k][1] for k in kinds),
                "sparse_included": bool(keep_sparse)}

    return {"layers": per_layer,
            "model_mean": {**mean_summary(*pooled, summary_rng(seed, "", 3), n_boot), **counts(("feature", "class"))},
            "feature_mean": {**_balanced(feature, summary_rng(seed, "", 4), n_boot), **counts(("feature",))},
            "class_mean": {**_balanced(classes, summary_rng(seed, "", 5), n_boot), **counts(("class",))}}

"""Interval statistics of MIS, computed in one place (DESIGN §8.6).

Per unit, `mis` is a proportion of T tasks, so its interval is exact (Clopper-Pearson);
`mis_confidence` is a mean of T sigmoid values with a bootstrap interval over tasks. Layer and
model summaries are means over non-constant units with bootstrap intervals over units; every
writer (mis.json, `report layers`, `report sweep`) calls `score_summaries`, so one file gives
one set of intervals whatever reads it.

Layer-balanced means weigh every layer equally: the mean over layers of each layer's mean over
its non-constant units. Pooled unit means move when pruning removes units (pruned filters become
constant and drop out; class units score lower than conv units), even when no remaining unit's
score changes; the layer-balanced feature mean does not.
"""

__all__ = ["CLASS_LAYERS", "clopper_pearson", "bootstrap_mean_ci", "summary_rng", "mean_summary", "score_summaries",
           "is_class_layer"]

import zlib

import numpy as np
from scipy import stats

CLASS_LAYERS = ("softmax", "logits")
LEVEL = 0.95


def is_class_layer(name: str) -> bool:
    return name in CLASS_LAYERS


def clopper_pearson(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact binomial interval of successes/n (ties counted 1/2 give a half-integer count)."""
    if n <= 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo = 0.0 if successes <= 0 else float(stats.beta.ppf(a, successes, n - successes + 1))
    hi = 1.0 if successes >= n else float(stats.beta.ppf(1 - a, successes + 1, n - successes))
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

    res = stats.bootstrap(varying, statistic, n_resamples=n_boot, confidence_level=level, method="percentile",
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


def score_summaries(rows, layer_order, seed: int = 0, n_boot: int = 1000) -> dict:
    """Per-layer, pooled model and layer-balanced (feature / class) summaries of mis.csv rows.

    rows: dicts with layer, status ('ok'|'constant'), mis, mis_confidence."""
    per_layer, feature, classes, pooled = {}, {}, {}, ([], [])
    for name in layer_order:
        ok = [r for r in rows if r["layer"] == name and r["status"] == "ok"]
        m, c = [r["mis"] for r in ok], [r["mis_confidence"] for r in ok]
        per_layer[name] = {**mean_summary(m, c, summary_rng(seed, name, 2), n_boot),
                           "n_constant": sum(1 for r in rows if r["layer"] == name and r["status"] != "ok")}
        (classes if is_class_layer(name) else feature)[name] = (m, c)
        pooled[0].extend(m)
        pooled[1].extend(c)
    return {"layers": per_layer,
            "model_mean": mean_summary(*pooled, summary_rng(seed, "", 3), n_boot),
            "feature_mean": _balanced(feature, summary_rng(seed, "", 4), n_boot),
            "class_mean": _balanced(classes, summary_rng(seed, "", 5), n_boot)}

"""Correlation statistics with bootstrap intervals (scipy for the point estimates and p-values)."""

__all__ = ["correlation", "format_correlation", "moving_average"]

import numpy as np
from scipy import stats


def correlation(x, y, seed: int = 0, n_boot: int = 2000, level: float = 0.95) -> dict:
    """Pearson and Spearman of finite (x, y) pairs, with percentile bootstrap intervals over pairs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(len(x))
    out = {"pearson_r": None, "pearson_p": None, "spearman_rho": None, "spearman_p": None, "n": n,
           "pearson_ci": [None, None], "spearman_ci": [None, None]}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
    out.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
               spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue))
    rng = np.random.default_rng(seed)
    boots_p, boots_s = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        bx, by = x[idx], y[idx]
        if np.ptp(bx) == 0 or np.ptp(by) == 0:
            continue
        boots_p.append(np.corrcoef(bx, by)[0, 1])
        boots_s.append(stats.spearmanr(bx, by).statistic)
    tail = (1 - level) / 2 * 100
    if boots_p:
        out["pearson_ci"] = [float(np.percentile(boots_p, tail)), float(np.percentile(boots_p, 100 - tail))]
        out["spearman_ci"] = [float(np.nanpercentile(boots_s, tail)), float(np.nanpercentile(boots_s, 100 - tail))]
    return out


def format_correlation(c: dict) -> str:
    """A `correlation` as one line of text (report pages, `misbench report` and `misbench study`)."""
    if c["pearson_r"] is None:
        return f"undefined (n={c['n']}: too few points or constant values)"
    ci = c.get("pearson_ci") or [None, None]
    interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci[0] is not None else ""
    return (f"Pearson r={c['pearson_r']:+.3f}{interval} (p={c['pearson_p']:.3g}), "
            f"Spearman rho={c['spearman_rho']:+.3f} (p={c['spearman_p']:.3g}), n={c['n']}")


def moving_average(values, window: int) -> np.ndarray:
    """Centred moving average that ignores NaNs (edges use the points available)."""
    values = np.asarray(values, float)
    ok = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts

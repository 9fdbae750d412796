"""Correlation statistics and the paired sign-flip test (scipy for the reference computations)."""

__all__ = ["correlation", "format_correlation", "moving_average", "sign_flip_test", "PERMUTATIONS", "EXACT_UP_TO",
           "CORRELATION_METHOD"]

import numpy as np
from scipy import stats


CORRELATION_METHOD = ("Fisher z: atanh(r) is normal with standard error 1/sqrt(n-3) (Pearson) or "
                      "sqrt(1.06/(n-3)) (Spearman, Fieller et al. 1957); the 95% interval and the two-sided p come "
                      "from that one approximation, so the interval excludes 0 exactly when p < 0.05")


def _fisher(r: float, se: float, level: float) -> tuple[list, float]:
    if abs(r) >= 1:
        return [float(r), float(r)], 0.0
    z = float(np.arctanh(r))
    q = stats.norm.ppf(1 - (1 - level) / 2)
    return [float(np.tanh(z - q * se)), float(np.tanh(z + q * se))], float(2 * stats.norm.sf(abs(z) / se))


def correlation(x, y, seed: int = 0, n_boot: int = 2000, level: float = 0.95) -> dict:
    """Pearson and Spearman of finite (x, y) pairs, each with its interval and p from one method (Fisher z,
    CORRELATION_METHOD), so that they never disagree. `seed` and `n_boot` are unused (kept for callers)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(len(x))
    out = {"pearson_r": None, "pearson_p": None, "spearman_rho": None, "spearman_p": None, "n": n,
           "pearson_ci": [None, None], "spearman_ci": [None, None], "method": CORRELATION_METHOD}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    r = float(stats.pearsonr(x, y).statistic)
    rho = float(stats.spearmanr(x, y).statistic)
    out.update(pearson_r=r, spearman_rho=rho)
    if n >= 4:  # Fisher's z needs n - 3 > 0: with 3 points the coefficients stand without interval or p
        out["pearson_ci"], out["pearson_p"] = _fisher(r, 1 / np.sqrt(n - 3), level)
        out["spearman_ci"], out["spearman_p"] = _fisher(rho, np.sqrt(1.06 / (n - 3)), level)
    return out


def format_correlation(c: dict) -> str:
    """A `correlation` as one line of text (report pages, `misbench report` and `misbench study`)."""
    if c["pearson_r"] is None:
        return f"undefined (n={c['n']}: too few points or constant values)"
    ci = c.get("pearson_ci") or [None, None]
    interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci[0] is not None else ""
    def p(v):  # no p with 3 points (Fisher's z needs 4)
        return "-" if v is None else f"{v:.3g}"

    return (f"Pearson r={c['pearson_r']:+.3f}{interval} (p={p(c['pearson_p'])}), "
            f"Spearman rho={c['spearman_rho']:+.3f} (p={p(c['spearman_p'])}), n={c['n']}")


def moving_average(values, window: int) -> np.ndarray:
    """Centred moving average that ignores NaNs (edges use the points available)."""
    values = np.asarray(values, float)
    if window > len(values):  # convolve's "same" output is as long as the longer input: at most the values, odd
        window = max(1, len(values) - (1 - len(values) % 2))
    ok = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


PERMUTATIONS = 10_000  # random sign flips when exact enumeration is too large
EXACT_UP_TO = 16  # units: up to 2**16 sign vectors are enumerated exactly


def sign_flip_test(samples, rng: np.random.Generator, n_perm: int = PERMUTATIONS, block: int = 1 << 22) -> dict:
    """Two-sided sign-flip permutation test of the layer-balanced mean of paired differences.

    samples: one array of per-unit differences per layer. The statistic is the mean over layers of each layer's
    mean, i.e. sum_i w_i d_i with w_i = 1 / (L n_layer(i)); under the null each difference is symmetric about 0,
    so every sign vector is equally likely (flips are independent per unit, so within layers). Exact over all
    2**n sign vectors for n <= EXACT_UP_TO; else `n_perm` random sign vectors from `rng`, with
    p = (1 + #{|T*| >= |T|}) / (1 + n_perm). Returns {p, statistic, n, exact, permutations}."""
    samples = [np.asarray(s, np.float64) for s in samples if len(s)]
    if not samples:
        return {"p": None, "statistic": None, "n": 0, "exact": None, "permutations": 0}
    d = np.concatenate(samples)
    w = np.concatenate([np.full(len(s), 1.0 / (len(samples) * len(s))) for s in samples])
    wd = w * d
    observed = float(wd.sum())
    n = len(d)
    out = {"statistic": observed, "n": int(n)}
    if not np.any(d != 0):
        return {**out, "p": 1.0, "exact": True, "permutations": 0}
    tol = 1e-12 * max(1.0, float(np.abs(wd).sum()))  # equal statistics computed in another order
    if n <= EXACT_UP_TO:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        stats_all = (1 - 2 * bits) @ wd
        hits = int(np.count_nonzero(np.abs(stats_all) >= abs(observed) - tol))
        return {**out, "p": hits / 2 ** n, "exact": True, "permutations": int(2 ** n)}
    hits, done = 0, 0
    rows = max(1, block // n)
    while done < n_perm:
        b = min(rows, n_perm - done)
        signs = np.where(rng.random((b, n)) < 0.5, -1.0, 1.0)
        hits += int(np.count_nonzero(np.abs(signs @ wd) >= abs(observed) - tol))
        done += b
    return {**out, "p": (1 + hits) / (1 + n_perm), "exact": False, "permutations": int(n_perm)}

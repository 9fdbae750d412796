"""The findings box: one sentence per question a study asks, each with its estimate, 95 % interval, p and n,
written from the same numbers as the report's tables (summary.json, paired.csv, classwise summaries,
compare.json)."""

__all__ = ["findings", "rate_finding", "paired_finding", "classwise_finding", "compare_finding", "num",
           "RATE_CORRELATIONS", "IMPURE_BELOW"]

import math

from .html import Finding

# a class unit's top pool is impure when, on average over the class units, more than 10 % of its images are
# other classes' (classwise.csv's purity; docs/reports.md)
IMPURE_BELOW = 0.9


def num(value, digits: int = 3) -> str:
    """The one number format of the findings (and of the test that reads them back): `digits` significant."""
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}g}"


def _interval(lo, hi) -> str:
    return f"95 % CI [{num(lo)}, {num(hi)}]"


# the correlations with the pruning rate a study's summary.json holds: its key -> (question, what correlates)
RATE_CORRELATIONS = {
    "correlation_rate_mis_confidence": ("MIS against pruning rate:",
                                        "the layer-balanced MIS confidence of feature units"),
    "correlation_rate_top1": ("Top-1 against pruning rate:", "the top-1 accuracy"),
}


def rate_finding(summary: dict, key: str = "correlation_rate_mis_confidence") -> Finding | None:
    c = summary.get(key)
    if not c:
        return None
    q, what = RATE_CORRELATIONS[key]
    if c.get("pearson_r") is None:
        return Finding(q, f"undefined over n = {c['n']} runs (too few runs, or constant values).", "sweep")
    lo, hi = c.get("pearson_ci") or (None, None)
    return Finding(q, f"across n = {c['n']} runs, {what} correlates with "
                      f"the pruning rate at Pearson r = {num(c['pearson_r'])} ({_interval(lo, hi)}), "
                      f"p = {num(c['pearson_p'])}.", "sweep")


def _p(row: dict, what: str):
    """The paired p of DESIGN §9 (sign-flip, `p_confidence`/`p_mis`), else the pooled Wilcoxon of older tables."""
    value = row.get(f"p_{what}")
    return value if value not in (None, "") else row.get(f"wilcoxon_p_{what}")


def _f(value):
    return None if value in (None, "") else float(value)


def paired_finding(rows: list[dict], baseline: str) -> Finding | None:
    """paired.csv's feature rows: how many runs' intervals exclude 0, and the run that differs most."""
    # the random-weights run is a reference level, not a pruned run (as in the correlations)
    rows = [r for r in rows if r.get("layer") == "features" and r.get("method") != "random"
            and _f(r.get("diff_mis_confidence")) is not None]
    if not rows:
        return None
    differ = [r for r in rows if not _f(r["diff_conf_ci_low"]) <= 0 <= _f(r["diff_conf_ci_high"])]
    top = max(rows, key=lambda r: abs(_f(r["diff_mis_confidence"])))
    return Finding(f"Each run against {baseline} (paired, same feature units):",
                   f"{len(differ)} of {len(rows)} runs differ (95 % interval excludes 0); the largest difference, "
                   f"{top['name']}: Δ MIS confidence = {num(top['diff_mis_confidence'])} "
                   f"({_interval(top['diff_conf_ci_low'], top['diff_conf_ci_high'])}), "
                   f"p = {num(_p(top, 'confidence'))}, n = {top.get('n_pairs') or 'n/a'} units.", "paired")


def classwise_finding(by_run: dict, baseline: str | None) -> Finding | None:
    """The baseline run's (else the first run's) class-unit correlation, and the range over all runs."""
    if not by_run:
        return None
    name = baseline if baseline in by_run else next(iter(by_run))
    c = by_run[name]["correlation_accuracy_mis_confidence"]
    q = "Class-unit MIS against class-wise accuracy:"
    if c.get("pearson_r") is None:
        return Finding(q, f"undefined in {name} (n = {c['n']} classes, or constant values).", "classwise")
    lo, hi = c.get("pearson_ci") or (None, None)
    rs = [s["correlation_accuracy_mis_confidence"]["pearson_r"] for s in by_run.values()]
    rs = [r for r in rs if r is not None]
    spread = f"; over all {len(rs)} runs r lies in [{num(min(rs))}, {num(max(rs))}]" if len(rs) > 1 else ""
    return Finding(q, f"in {name}, Pearson r = {num(c['pearson_r'])} ({_interval(lo, hi)}), p = {num(c['pearson_p'])}, "
                      f"n = {c['n']} classes{spread}{_impure(by_run)}.", "classwise")


def _impure(by_run: dict) -> str:
    """A clause naming the runs whose class units' top pools hold other classes' images (mean purity below
    IMPURE_BELOW, or a pool larger than its class): there class-unit MIS is not the class's alone."""
    impure = {name: s["mean_purity"] for name, s in by_run.items()
              if s.get("mean_purity") is not None and s["mean_purity"] < IMPURE_BELOW}
    over = [name for name, s in by_run.items() if s.get("pool_warning")]
    if not impure and not over:
        return ""
    parts = []
    if impure:
        worst = min(impure, key=impure.get)
        parts.append(f"the class pools are impure in {len(impure)} of {len(by_run)} runs (mean purity below "
                     f"{num(IMPURE_BELOW)}; lowest: {worst}, {num(impure[worst])})" if len(by_run) > 1 else
                     f"the class pools are impure (mean purity {num(impure[worst])}, below {num(IMPURE_BELOW)})")
    if over:
        parts.append(f"in {len(over)} of {len(by_run)} runs top pools are larger than their classes" if len(by_run) > 1
                     else "top pools are larger than their classes")
    return "; " + ", ".join(parts) + ": there class-unit MIS also reflects other classes' images"


def compare_finding(compared: dict | None) -> Finding | None:
    """The first population against the second: layer-balanced means with intervals, the rank-sum test."""
    if not compared or not compared.get("comparisons"):
        return None
    comp = compared["comparisons"][0]
    pops = {p["label"]: p["feature_mean"] for p in compared["populations"]}
    a, b = pops[comp["a"]], pops[comp["b"]]
    r = comp["rank_sum_mis_confidence"]
    if a.get("mis_confidence") is None or b.get("mis_confidence") is None or r.get("p") is None:
        return None

    def mean(m):
        return f"{num(m['mis_confidence'])} ({_interval(*m['mis_confidence_ci'])})"

    return Finding(f"{comp['a']} against {comp['b']}:",
                   f"MIS confidence {mean(a)} against {mean(b)}; P({comp['a']} unit > {comp['b']} unit) = "
                   f"{num(r['prob_a_greater'])}, rank-sum p = {num(r['p'])}, n = {r['n_a']} and {r['n_b']} units.",
                   "compare")


def findings(summary: dict, paired_rows: list[dict], classwise: dict, compared: dict | None = None) -> list[Finding]:
    made = [rate_finding(summary), paired_finding(paired_rows, summary.get("paired_baseline") or "the baseline"),
            classwise_finding(classwise, summary.get("paired_baseline")), compare_finding(compared)]
    return [f for f in made if f is not None]

"""Paired per-unit comparisons of pruned runs against the unpruned run (docs/reports.md).

A unit present and non-constant in both runs (same layer, same unit index) gives one paired
difference run - baseline. Comparing the same units removes the confound of which units remain;
the runs must have been scored on the same footing (rows, data, selection, tasks, similarity, alpha).
"""

__all__ = ["paired_report", "paired_differences", "check_comparable", "PAIRED_COLUMNS", "COMPARED_SETTINGS"]

import logging

import numpy as np
from scipy import stats

from ..errors import MisbenchError
from ..scoring.summaries import bootstrap_mean_ci, is_class_layer, is_counted, summary_rng
from .stats import EXACT_UP_TO, PERMUTATIONS, sign_flip_test

log = logging.getLogger(__name__)

PAIRED_COLUMNS = ["name", "method", "schedule", "rate", "baseline", "layer", "n_pairs",
                  "diff_mis_confidence", "diff_conf_ci_low", "diff_conf_ci_high", "p_confidence",
                  "diff_mis", "diff_mis_ci_low", "diff_mis_ci_high", "p_mis",
                  "wilcoxon_p_confidence", "wilcoxon_p_mis"]
# what must agree between runs compared in one report (mis.json keys; settings.* inside "settings")
COMPARED_SETTINGS = ("n_rows", "data", "settings.selection", "settings.quantile", "settings.class_quantile",
                     "settings.tasks",
                     "settings.explanations", "settings.image_size", "settings.view", "settings.backend_fingerprint",
                     "settings.alpha", "settings.alpha_source")


def _get(meta: dict, key: str):
    part, _, sub = key.partition(".")
    value = meta.get(part)
    return value.get(sub) if sub and isinstance(value, dict) else value


def check_comparable(runs: list[dict], baseline: dict, runs_csv) -> None:
    """Every run's mis.json must agree with the baseline's on COMPARED_SETTINGS; else one error naming it."""
    ref = baseline["score_meta"]
    for run in runs:
        meta = run["score_meta"]
        for key in COMPARED_SETTINGS:
            if key in ("settings.quantile", "settings.class_quantile") and _get(ref, "settings.selection") != "quantile":
                continue
            if _get(meta, key) != _get(ref, key):
                raise MisbenchError(f"{runs_csv}: run {run['name']!r} cannot be compared with {baseline['name']!r}: "
                                    f"{key} is {_get(meta, key)!r} in {run['scores']} but {_get(ref, key)!r} in "
                                    f"{baseline['scores']}; score both with the same data and settings")


def _wilcoxon(diffs: np.ndarray):
    if len(diffs) == 0:
        return None
    if not np.any(diffs != 0):
        return 1.0  # no unit changed
    return float(stats.wilcoxon(diffs).pvalue)


def paired_differences(groups: dict, rng, n_boot: int = 1000, perm_rng=None, n_perm: int = PERMUTATIONS) -> dict:
    """groups: layer -> (diff_confidence [n], diff_mis [n]). One estimand: the layer-balanced mean of per-unit
    differences (each layer's mean, averaged over layers), with its bootstrap interval (units resampled within
    layers) and the two-sided sign-flip permutation p of the same statistic (`p_confidence`, `p_mis`; signs
    flipped per unit, so within layers; `perm_rng`, default `rng`). The Wilcoxon signed-rank p of the pooled
    differences stays beside them as `wilcoxon_p_*` (another estimand: the pooled pairs' median shift)."""
    groups = {k: v for k, v in groups.items() if len(v[0])}
    out = {"n_pairs": int(sum(len(v[0]) for v in groups.values()))}
    for idx, suffix, ci in ((0, "mis_confidence", "conf"), (1, "mis", "mis")):
        p_name = "confidence" if idx == 0 else "mis"
        samples = [np.asarray(v[idx], np.float64) for v in groups.values()]
        if not samples:
            out.update({f"diff_{suffix}": None, f"diff_{ci}_ci_low": None, f"diff_{ci}_ci_high": None,
                        f"p_{p_name}": None, f"wilcoxon_p_{p_name}": None})
            continue
        lo, hi = bootstrap_mean_ci(samples, rng, n_boot)
        test = sign_flip_test(samples, perm_rng if perm_rng is not None else rng, n_perm)
        out.update({f"diff_{suffix}": float(np.mean([s.mean() for s in samples])), f"diff_{ci}_ci_low": lo,
                    f"diff_{ci}_ci_high": hi, f"p_{p_name}": test["p"],
                    f"wilcoxon_p_{p_name}": _wilcoxon(np.concatenate(samples))})
    return out


def _unit_map(run):
    return {(s["layer"], s["unit"]): s for s in run["unit_scores"] if is_counted(s["status"], run.get("keep_sparse", False))}


def _choose_baseline(scored: list[dict], baseline: str | None, runs_csv):
    names = [r["name"] for r in scored]
    if baseline is not None:
        if baseline not in names:
            raise MisbenchError(f"{runs_csv}: baseline run {baseline!r} not found among the runs with scores "
                                f"({', '.join(names) or 'none'}); pass --baseline with one of them")
        return next(r for r in scored if r["name"] == baseline)
    for name in ("control", "base"):
        if name in names:
            return next(r for r in scored if r["name"] == name)
    return None


def paired_report(runs: list[dict], baseline: str | None, seed: int, runs_csv, n_boot: int = 1000) -> dict | None:
    """Rows of paired.csv (one per run: feature and class aggregates) and paired_layers.csv (one per run
    and layer) against `baseline` (a run name; default control, else base). None when there is no
    baseline and none was asked for."""
    scored = [r for r in runs if r.get("unit_scores") is not None]
    base = _choose_baseline(scored, baseline, runs_csv)
    if base is None:
        return None
    missing = [r["scores"] for r in scored if r["score_meta"] is None]
    if missing:
        if baseline is not None:
            raise MisbenchError(f"{runs_csv}: paired comparisons need each mis.csv's mis.json; missing beside "
                                f"{missing[0]}")
        log.warning("no paired comparisons: %s has no mis.json beside it", missing[0])
        return None
    others = [r for r in scored if r is not base]
    check_comparable(others, base, runs_csv)
    ref = _unit_map(base)
    run_rows, layer_rows = [], []
    for run in others:
        mine = _unit_map(run)
        by_layer = {}
        for key in sorted(set(mine) & set(ref), key=lambda k: (k[0], k[1])):
            a, b = mine[key], ref[key]
            d = by_layer.setdefault(key[0], ([], []))
            d[0].append(a["mis_confidence"] - b["mis_confidence"])
            d[1].append(a["mis"] - b["mis"])
        head = {"name": run["name"], "method": run["method"], "schedule": run["schedule"], "rate": run["rate"],
                "baseline": base["name"]}
        order = list(dict.fromkeys(s["layer"] for s in run["unit_scores"]))
        for layer in order:
            if layer in by_layer:
                layer_rows.append({**head, "layer": layer, **paired_differences(
                    {layer: by_layer[layer]}, summary_rng(seed, f"paired:{run['name']}:{layer}", 6), n_boot,
                    summary_rng(seed, f"paired:{run['name']}:{layer}", 7))})
        for label, pick in (("features", lambda n: not is_class_layer(n)), ("classes", is_class_layer)):
            groups = {k: v for k, v in by_layer.items() if pick(k)}
            if groups:
                run_rows.append({**head, "layer": label, **paired_differences(
                    groups, summary_rng(seed, f"paired:{run['name']}:{label}", 6), n_boot,
                    summary_rng(seed, f"paired:{run['name']}:{label}", 7))})
    return {"baseline": base["name"], "runs": run_rows, "layers": layer_rows,
            "test": {"p": "two-sided sign-flip permutation test of the layer-balanced mean difference, signs "
                          "flipped per unit (within layers)", "permutations": PERMUTATIONS,
                     "exact_up_to_units": EXACT_UP_TO, "seed": seed,
                     "wilcoxon_p": "Wilcoxon signed-rank test of all pooled per-unit differences"}}

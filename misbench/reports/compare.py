"""Two unit populations side by side (e.g. a layer's neurons against its dictionary features, or two models).

Each population is one mis.csv (optionally restricted to some of its layers). Per-layer means and intervals
and the layer-balanced means come from summaries.score_summaries, exactly as mis.json computes them; the two
populations' unit distributions are compared with the Wilcoxon rank-sum (Mann-Whitney U) test over their
non-constant units. Unlike report sweep's paired comparison, the units need not correspond.
"""

__all__ = ["compare_report", "rank_sum", "COMPARE_COLUMNS"]

from pathlib import Path

import numpy as np
from scipy import stats

from ..errors import MisbenchError
from ..runtime.fileio import write_json
from ..scoring.summaries import is_counted, score_summaries
from .figures import compare_figure
from .tables import alpha_of, read_scores, score_settings, write_csv

COMPARE_COLUMNS = ["population", "layer", "n_units", "n_constant", "n_sparse", "mis", "mis_ci_low", "mis_ci_high",
                   "mis_confidence", "conf_ci_low", "conf_ci_high"]


def rank_sum(a, b) -> dict:
    """Two-sided Mann-Whitney U test of two samples (scipy), with the common-language effect size
    P(a > b) + P(a = b)/2 = U / (n_a n_b)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return {"u": None, "p": None, "prob_a_greater": None, "n_a": int(len(a)), "n_b": int(len(b))}
    res = stats.mannwhitneyu(a, b, alternative="two-sided")
    return {"u": float(res.statistic), "p": float(res.pvalue), "prob_a_greater": float(res.statistic) / (len(a) * len(b)),
            "n_a": int(len(a)), "n_b": int(len(b))}


def _population(spec) -> tuple[str, str, list | None]:
    """`PATH`, `LABEL=PATH` or `LABEL=PATH:LAYER[+LAYER...]` -> (label, path, layers or None)."""
    label, eq, rest = str(spec).partition("=")
    if not eq:
        label, rest = Path(spec).parent.name or Path(spec).stem, str(spec)
    path, colon, layers = rest.partition(".csv:")
    path = path + ".csv" if colon else rest
    return label, path, (layers.split("+") if colon and layers else None)


def compare_report(populations: list, out, seed: int = 0, n_boot: int = 1000, figure: bool = True) -> dict:
    """populations: two (or more) `[LABEL=]mis.csv[:LAYER+LAYER]` specs; the first is compared with each other.
    Writes DIR/compare.csv, DIR/compare.json (and compare.png); returns the summary."""
    if len(populations) < 2:
        raise MisbenchError(f"report compare needs at least two --scores, got {len(populations)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pops = []
    for spec in populations:
        label, path, layers = _population(spec)
        rows = read_scores(path)
        have = list(dict.fromkeys(r["layer"] for r in rows))
        if layers:
            missing = [name for name in layers if name not in have]
            if missing:
                raise MisbenchError(f"--scores {spec}: layers {', '.join(missing)} are not in {path} (it has "
                                    f"{', '.join(have)})")
            rows = [r for r in rows if r["layer"] in layers]
        order = layers or have
        keep_sparse = score_settings(path)["keep_sparse"]
        summary = score_summaries(rows, order, seed, n_boot, keep_sparse)
        pops.append({"label": label, "scores": path, "layers": order, "rows": rows, "summary": summary,
                     "alpha": alpha_of(rows), "keep_sparse": keep_sparse})
    labels = [p["label"] for p in pops]
    if len(set(labels)) != len(labels):
        raise MisbenchError(f"report compare: population labels {labels} repeat; write LABEL=PATH for each --scores")
    table = []
    for pop in pops:
        for layer, s in pop["summary"]["layers"].items():
            table.append({"population": pop["label"], "layer": layer, "n_units": s["n_units"],
                          "n_constant": s["n_constant"], "n_sparse": s["n_sparse"], "mis": s["mis"], "mis_ci_low": s["mis_ci"][0],
                          "mis_ci_high": s["mis_ci"][1], "mis_confidence": s["mis_confidence"],
                          "conf_ci_low": s["mis_confidence_ci"][0], "conf_ci_high": s["mis_confidence_ci"][1]})
    write_csv(out / "compare.csv", table, COMPARE_COLUMNS)

    def values(pop, key):
        return [r[key] for r in pop["rows"] if is_counted(r["status"], pop["keep_sparse"])]

    first = pops[0]
    result = {"populations": [{"label": p["label"], "scores": str(p["scores"]), "layers": p["layers"],
                               "alpha": p["alpha"][0], "alpha_source": p["alpha"][1],
                               "feature_mean": p["summary"]["feature_mean"], "class_mean": p["summary"]["class_mean"],
                               "model_mean": p["summary"]["model_mean"]} for p in pops],
              "comparisons": [{"a": first["label"], "b": p["label"],
                               "rank_sum_mis_confidence": rank_sum(values(first, "mis_confidence"),
                                                                   values(p, "mis_confidence")),
                               "rank_sum_mis": rank_sum(values(first, "mis"), values(p, "mis"))} for p in pops[1:]]}
    if len({(p["alpha"][0], p["alpha"][1]) for p in pops}) > 1:
        alphas = ", ".join(f"{p['label']}: {p['alpha'][0]}" for p in pops)
        result["alpha_warning"] = (f"the populations were scored with different alphas ({alphas}); "
                                   "mis_confidence is not comparable across them (mis is)")
    sparse = {p["label"]: p["summary"]["model_mean"]["n_sparse"] for p in pops
              if p["summary"]["model_mean"]["n_sparse"] and not p["keep_sparse"]}
    if sparse:
        result["sparse_warning"] = ("sparse units (their top pool reaches their minimum: chosen by tie keys, not by "
                                    "activation) are left out: " + ", ".join(f"{k}: {v}" for k, v in sparse.items()))
    write_json(out / "compare.json", result)
    if figure:
        compare_figure({p["label"]: values(p, "mis_confidence") for p in pops}, out / "compare.png")
    return result

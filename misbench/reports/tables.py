"""Reading score tables and writing CSVs atomically."""

__all__ = ["read_scores", "write_csv", "layer_summary", "read_csv_rows", "score_settings", "alpha_of",
           "LAYER_COLUMNS"]

LAYER_COLUMNS = ["layer", "n_units", "n_constant", "n_sparse", "mis", "mis_confidence", "mis_ci_low", "mis_ci_high",
                 "conf_ci_low", "conf_ci_high", "alpha", "alpha_source"]

from ..runtime.fileio import read_csv_rows, write_csv
from ..scoring.results import read_scores, score_settings
from ..scoring.summaries import score_summaries


def alpha_of(scores: list[dict]) -> tuple[str, str]:
    """(alpha, alpha_source) as the mis.csv rows record them ('' for files written before they did)."""
    first = scores[0] if scores else {}
    return first.get("alpha") or "", first.get("alpha_source") or ""


def layer_summary(scores: list[dict], seed: int = 0, n_boot: int = 1000, keep_sparse: bool = False) -> list[dict]:
    """Mean MIS per layer over the counted units (non-constant, and non-sparse unless `keep_sparse`), as the
    MIS authors publish them, with the bootstrap intervals of mis.json (summaries.score_summaries)."""
    alpha, source = alpha_of(scores)
    layers = list(dict.fromkeys(r["layer"] for r in scores))
    summary = score_summaries(scores, layers, seed, n_boot, keep_sparse)["layers"]
    return [{"layer": name, "n_units": s["n_units"], "n_constant": s["n_constant"], "n_sparse": s["n_sparse"],
             "mis": s["mis"],
             "mis_confidence": s["mis_confidence"], "mis_ci_low": s["mis_ci"][0], "mis_ci_high": s["mis_ci"][1],
             "conf_ci_low": s["mis_confidence_ci"][0], "conf_ci_high": s["mis_confidence_ci"][1],
             "alpha": alpha, "alpha_source": source} for name, s in summary.items()]

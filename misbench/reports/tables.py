"""Reading score tables and writing CSVs atomically."""

__all__ = ["read_scores", "write_csv", "layer_summary", "read_csv_rows"]

import csv

import numpy as np

from ..errors import MisbenchError
from ..fileio import atomic_path
from ..mis import bootstrap_ci

REQUIRED = {"layer", "unit", "status", "mis", "mis_confidence"}


def read_csv_rows(path) -> list[dict]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        raise MisbenchError(f"{path} does not exist") from None


def _num(value):
    return float(value) if value not in ("", None) else float("nan")


def read_scores(path) -> list[dict]:
    """mis.csv rows with numbers parsed; constant units keep NaN scores."""
    rows = read_csv_rows(path)
    if rows and not REQUIRED <= set(rows[0]):
        raise MisbenchError(f"{path} is not a mis.csv: needs columns {sorted(REQUIRED)}, has {sorted(rows[0])}")
    return [{**r, "unit": int(r["unit"]), "mis": _num(r["mis"]), "mis_confidence": _num(r["mis_confidence"])}
            for r in rows]


def write_csv(path, rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return ""
        return f"{v:.6g}" if isinstance(v, float) else v

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([fmt(row.get(c)) for c in columns])


def layer_summary(scores: list[dict], seed: int = 0) -> list[dict]:
    """Mean MIS per layer over non-constant units (as the MIS authors publish them), with bootstrap CIs."""
    out = []
    for layer in dict.fromkeys(r["layer"] for r in scores):
        ok = [r for r in scores if r["layer"] == layer and r["status"] == "ok"]
        m = np.array([r["mis"] for r in ok])
        c = np.array([r["mis_confidence"] for r in ok])
        rng = np.random.default_rng(seed)
        lo, hi = bootstrap_ci(c, rng) if len(c) else (None, None)
        out.append({"layer": layer, "n_units": len(ok),
                    "n_constant": sum(1 for r in scores if r["layer"] == layer and r["status"] != "ok"),
                    "mis": float(m.mean()) if len(m) else None, "mis_confidence": float(c.mean()) if len(c) else None,
                    "conf_ci_low": lo, "conf_ci_high": hi})
    return out

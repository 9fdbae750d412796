"""Fit the sigmoid slope alpha of mis_confidence to human 2-AFC responses by maximum likelihood."""

__all__ = ["fit_alpha", "read_responses"]

import csv
from pathlib import Path

import numpy as np
from scipy import optimize, stats

from .errors import MisbenchError


def _nll(alpha: float, delta: np.ndarray, correct: np.ndarray) -> float:
    z = alpha * delta
    # -log sigmoid(z) = logaddexp(0, -z), stable for any z
    return float(np.sum(correct * np.logaddexp(0, -z) + (1 - correct) * np.logaddexp(0, z)))


def fit_alpha(delta, correct, level: float = 0.95) -> dict:
    """P(correct | delta) = sigmoid(alpha * delta). Returns alpha, profile-likelihood CI, log-likelihood."""
    delta, correct = np.asarray(delta, float), np.asarray(correct, float)
    if len(delta) < 2 or len(delta) != len(correct):
        raise MisbenchError("calibration needs at least two responses with matching delta and correct columns")
    if not np.isin(correct, (0, 1)).all():
        raise MisbenchError("the correct column must hold 0/1 (or true/false) responses")
    if np.all(delta == 0):
        raise MisbenchError("all deltas are zero: alpha is not identifiable")
    res = optimize.minimize_scalar(lambda la: _nll(np.exp(la), delta, correct), bounds=(-12, 12), method="bounded",
                                   options={"xatol": 1e-10})
    alpha, nll = float(np.exp(res.x)), float(res.fun)
    cut = nll + _chi2_half(level)

    def excess(la):
        return _nll(np.exp(la), delta, correct) - cut

    lo = optimize.brentq(excess, -12, res.x) if excess(-12) > 0 else -np.inf
    hi = optimize.brentq(excess, res.x, 12) if excess(12) > 0 else np.inf
    return {"alpha": alpha, "ci_low": float(np.exp(lo)), "ci_high": float(np.exp(hi)), "log_likelihood": -nll,
            "n": int(len(delta)), "level": level, "accuracy": float(correct.mean()),
            "log_likelihood_chance": float(len(delta) * np.log(0.5))}


def _chi2_half(level: float) -> float:
    """Profile-likelihood drop that bounds a `level` interval (Wilks)."""
    return float(stats.chi2.ppf(level, 1) / 2)


def read_responses(path, tasks_h5=None) -> tuple[np.ndarray, np.ndarray]:
    """CSV with `correct` and either `delta`, or `layer,unit,task` looked up in a tasks.h5 file."""
    path = Path(path)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise MisbenchError(f"{path} has no responses")
    cols = set(rows[0])
    if "correct" not in cols:
        raise MisbenchError(f"{path} lacks a 'correct' column (1 when the human chose right); has {sorted(cols)}")
    truth = {"1": 1, "0": 0, "true": 1, "false": 0}
    try:
        correct = np.array([truth[r["correct"].strip().lower()] for r in rows], float)
    except KeyError as err:
        raise MisbenchError(f"{path}: correct must be 0/1 or true/false, found {err}") from None
    if "delta" in cols:
        return np.array([float(r["delta"]) for r in rows]), correct
    if {"layer", "unit", "task"} <= cols and tasks_h5:
        import h5py

        with h5py.File(tasks_h5, "r") as h5:
            lookup = {}
            delta = []
            for r in rows:
                layer = r["layer"]
                if layer not in lookup:
                    units = h5[layer]["unit"][...]
                    lookup[layer] = ({int(u): k for k, u in enumerate(units)}, h5[layer]["delta"][...])
                pos, deltas = lookup[layer]
                delta.append(deltas[pos[int(r["unit"])], int(r["task"])])
        return np.array(delta, float), correct
    raise MisbenchError(f"{path} needs a 'delta' column, or 'layer,unit,task' columns together with --tasks TASKS.h5")

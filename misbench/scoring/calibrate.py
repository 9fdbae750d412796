"""Fit the sigmoid slope alpha of mis_confidence to human 2-AFC responses by maximum likelihood."""

__all__ = ["fit_alpha", "calibrate_responses", "derive_alpha", "tasks_deltas", "read_responses", "calibration_alpha", "IMI_COLUMNS", "SIMPLE_COLUMNS"]

import csv
import json
import logging
from pathlib import Path

import numpy as np
from scipy import optimize, stats

from ..errors import MisbenchError
from ..runtime.fileio import refuse_existing, sha256_file, write_json
from .results import read_tasks

log = logging.getLogger(__name__)


def _nll(alpha: float, delta: np.ndarray, correct: np.ndarray) -> float:
    z = alpha * delta
    # -log sigmoid(z) = logaddexp(0, -z), stable for any z
    return float(np.sum(correct * np.logaddexp(0, -z) + (1 - correct) * np.logaddexp(0, z)))


def fit_alpha(delta, correct, level: float = 0.95) -> dict:
    """P(correct | delta) = sigmoid(alpha * delta). Returns alpha, profile-likelihood CI, log-likelihood.

    When humans are right less often the larger delta is (anti-correlated responses), the likelihood
    over alpha > 0 peaks at its boundary, alpha ~ 0; that is no calibration. Then the result carries
    `anti_correlated: true`, the (negative) slope that fits best and a `warning`, and no usable alpha."""
    delta, correct = np.asarray(delta, float), np.asarray(correct, float)
    if len(delta) < 2 or len(delta) != len(correct):
        raise MisbenchError("calibration needs at least two responses with matching delta and correct columns")
    if not np.isin(correct, (0, 1)).all():
        raise MisbenchError("the correct column must hold 0/1 (or true/false) responses")
    if not np.all(np.isfinite(delta)):
        raise MisbenchError("calibration deltas must be finite numbers (a missing task in tasks.h5 reads as nan)")
    if np.all(delta == 0):
        raise MisbenchError("all deltas are zero: alpha is not identifiable")
    base = {"n": int(len(delta)), "level": level, "accuracy": float(correct.mean()),
            "log_likelihood_chance": float(len(delta) * np.log(0.5))}
    # the score at alpha = 0: its sign is the sign of the unconstrained maximum-likelihood slope
    if float(np.sum((correct - 0.5) * delta)) < 0:
        res = optimize.minimize_scalar(lambda la: _nll(-np.exp(la), delta, correct), bounds=(-12, 12),
                                       method="bounded")
        slope = -float(np.exp(res.x))
        log.warning("calibration responses are anti-correlated with delta (best slope %.4g): no alpha fitted", slope)
        return {**base, "alpha": None, "ci_low": None, "ci_high": None, "anti_correlated": True, "separated": False,
                "fitted_slope": slope, "log_likelihood": -float(res.fun),
                "warning": "the responses are anti-correlated with delta (humans chose wrong more often as the "
                           f"model's evidence grew; best slope {slope:.4g}): no positive alpha fits; check "
                           "that delta and correct refer to the same tasks and the sign convention"}
    if not np.any((correct == 1) & (delta < 0)) and not np.any((correct == 0) & (delta > 0)):
        # separated: no response contradicts delta's sign, so the likelihood grows without bound in alpha and
        # the optimiser would return its search bound (e^12) as if it were a fitted slope
        log.warning("calibration responses never contradict delta's sign: alpha is unbounded, none fitted")
        return {**base, "alpha": None, "ci_low": None, "ci_high": None, "anti_correlated": False, "separated": True,
                "log_likelihood": -float(_nll(np.exp(12), delta, correct)),
                "warning": "every response agrees with the sign of delta (perfect separation): the likelihood "
                           "grows without bound in alpha, so no finite alpha fits; collect more responses, "
                           "including hard tasks (small |delta|) where humans err"}
    res = optimize.minimize_scalar(lambda la: _nll(np.exp(la), delta, correct), bounds=(-12, 12), method="bounded",
                                   options={"xatol": 1e-10})
    alpha, nll = float(np.exp(res.x)), float(res.fun)
    cut = nll + _chi2_half(level)

    def excess(la):
        return _nll(np.exp(la), delta, correct) - cut

    # an interval that reaches the search bound (e^-12 or e^12) is open on that side: the lower end is then 0
    # (alpha > 0), the upper end unbounded, written as null with ci_high_unbounded (JSON has no Infinity)
    lo = float(np.exp(optimize.brentq(excess, -12, res.x))) if excess(-12) > 0 else 0.0
    unbounded = not excess(12) > 0
    hi = None if unbounded else float(np.exp(optimize.brentq(excess, res.x, 12)))
    return {**base, "alpha": alpha, "ci_low": lo, "ci_high": hi, "ci_high_unbounded": unbounded,
            "log_likelihood": -nll, "anti_correlated": False, "separated": False, "warning": None}


REFERENCE_CONFIDENCE = 0.75


def calibrate_responses(responses, tasks_h5=None, model: str | None = None, level: float = 0.95, out=None,
                        overwrite: bool = False) -> dict:
    """`misbench calibrate RESPONSES`: the fit of alpha to human 2-AFC responses (`fit_alpha`) with the
    responses' path and sha256, written to `out` when given (the file `score --alpha-from` reads)."""
    refuse_existing({"out": out}, overwrite)
    delta, correct = read_responses(responses, tasks_h5, model)
    fit = {**fit_alpha(delta, correct, level), "responses": str(responses), "responses_sha256": sha256_file(responses)}
    if out:
        write_json(out, fit)
    return fit


def derive_alpha(deltas, confidence: float = REFERENCE_CONFIDENCE) -> dict:
    """The documented rule behind the default alphas (docs/mis.md): the slope that maps a task of median
    difficulty, |delta| = median over a reference set of tasks, to `confidence` (0.75: halfway between
    chance and certainty). alpha = logit(confidence) / median |delta|. Not a human calibration."""
    d = np.abs(np.asarray(deltas, float))
    d = d[np.isfinite(d)]
    if not len(d) or np.median(d) == 0:
        raise MisbenchError("deriving alpha needs reference tasks with non-zero deltas")
    median = float(np.median(d))
    return {"alpha": float(np.log(confidence / (1 - confidence)) / median), "median_abs_delta": median,
            "confidence": confidence, "n": int(len(d))}


def _chi2_half(level: float) -> float:
    """Profile-likelihood drop that bounds a `level` interval (Wilks)."""
    return float(stats.chi2.ppf(level, 1) / 2)


SIMPLE_COLUMNS = {"delta", "correct", "layer", "unit", "task", "participant", "response_id"}
# the trial table of the IMI study (Zimmermann, Klein & Brendel 2023), as their analysis code builds it from
# the MTurk results (tools/data_analysis: parse_results + append_trial_structure_to_results, saved with to_csv):
# one row per trial; `layer`, `channel` (the unit) and `batch` (the task) say which unit and task it showed
IMI_COLUMNS = {"correct", "is_demo", "catch_trial", "layer", "channel", "batch"}
_TRUTH = {"1": 1, "0": 0, "true": 1, "false": 0, "1.0": 1, "0.0": 0}


def _flag(path, row, column) -> int:
    try:
        return _TRUTH[str(row[column]).strip().lower()]
    except KeyError:
        raise MisbenchError(f"{path}: column {column!r} must be 0/1 or true/false, found {row[column]!r}") from None


def _lookup_deltas(path, keys, tasks_h5) -> np.ndarray:
    """delta of each (layer, unit, task) from a tasks.h5 that `score --tasks-out` wrote for the same tasks."""
    if not tasks_h5:
        raise MisbenchError(f"{path} names tasks by layer, unit and task: pass --tasks TASKS.h5 (score --tasks-out) "
                            "that scored those tasks")
    tasks = read_tasks(tasks_h5, dict.fromkeys(layer for layer, _, _ in keys))
    lookup = {layer: {int(u): k for k, u in enumerate(t["unit"])} for layer, t in tasks.items()}
    delta = []
    for layer, unit, task in keys:
        pos, deltas = lookup[layer], tasks[layer]["delta"]
        if unit not in pos or not 0 <= task < deltas.shape[1]:
            raise MisbenchError(f"{path}: unit {unit} task {task} of layer {layer!r} is not in {tasks_h5}")
        delta.append(deltas[pos[unit], task])
    return np.array(delta, float)


def tasks_deltas(tasks_h5) -> np.ndarray:
    """Every task's delta in a tasks.h5 (constant units' NaN included), for `derive_alpha`."""
    return np.concatenate([t["delta"].ravel() for t in read_tasks(tasks_h5).values()])


def _int(path, row, column) -> int:
    try:
        return int(float(row[column]))
    except (TypeError, ValueError):
        raise MisbenchError(f"{path}: column {column!r} must hold integers, found {row[column]!r}") from None


def read_responses(path, tasks_h5=None, model: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Human 2-AFC responses -> (delta, correct).

    Two layouts: the simple CSV (`correct` and either `delta`, or `layer,unit,task` looked up in tasks.h5;
    optional `participant`, `response_id`; any other column is an error), and the IMI study's trial table
    (columns `correct, is_demo, catch_trial, layer, channel, batch`, more allowed): demo and catch trials
    are left out, `channel` is the unit and `batch` the task; `model` picks one network's trials when the
    table holds several (its `model` column)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets' "CSV UTF-8" starts with a BOM
        rows = list(csv.DictReader(handle))
    if not rows:
        raise MisbenchError(f"{path} has no responses")
    cols = set(rows[0]) - {""}  # pandas' to_csv writes an unnamed index column
    if IMI_COLUMNS <= cols:
        rows = [r for r in rows if not _flag(path, r, "is_demo") and not _flag(path, r, "catch_trial")]
        models = sorted({r.get("model", "") for r in rows})
        if model is not None:
            rows = [r for r in rows if r.get("model", "") == model]
        elif len(models) > 1:
            raise MisbenchError(f"{path} holds the trials of several models ({', '.join(models[:6])}); "
                                "choose one with --model")
        if not rows:
            raise MisbenchError(f"{path} has no main trials{f' of model {model!r}' if model else ''} "
                                "(demo and catch trials are left out)")
        correct = np.array([_flag(path, r, "correct") for r in rows], float)
        keys = [(r["layer"], _int(path, r, "channel"), _int(path, r, "batch")) for r in rows]
        return _lookup_deltas(path, keys, tasks_h5), correct
    unknown = sorted(cols - SIMPLE_COLUMNS)
    if unknown:
        raise MisbenchError(f"{path}: unknown column {unknown[0]!r}; a response CSV has columns correct and delta, "
                            "or correct and layer,unit,task (optional participant, response_id), or is the IMI "
                            f"trial table ({', '.join(sorted(IMI_COLUMNS))}, ...)")
    if "correct" not in cols:
        raise MisbenchError(f"{path} lacks a 'correct' column (1 when the human chose right); has {sorted(cols)}")
    correct = np.array([_flag(path, r, "correct") for r in rows], float)
    if "delta" in cols:
        try:
            return np.array([float(r["delta"]) for r in rows]), correct
        except ValueError as err:
            raise MisbenchError(f"{path}: column 'delta' must hold numbers ({err})") from None
    if {"layer", "unit", "task"} <= cols:
        keys = [(r["layer"], _int(path, r, "unit"), _int(path, r, "task")) for r in rows]
        return _lookup_deltas(path, keys, tasks_h5), correct
    raise MisbenchError(f"{path} needs a 'delta' column, or 'layer,unit,task' columns together with --tasks TASKS.h5")


def calibration_alpha(path) -> tuple[float, str]:
    """(alpha, alpha_source) from a `misbench calibrate --out` file: source is calibrated:<responses sha256>."""
    try:
        fit = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise MisbenchError(f"--alpha-from {path}: cannot read a calibration JSON ({err})") from None
    alpha = fit.get("alpha")
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0 or not fit.get("responses_sha256"):
        raise MisbenchError(f"--alpha-from {path}: expected the JSON of misbench calibrate --out with a positive "
                            f"alpha and responses_sha256; found alpha={alpha!r}")
    return float(alpha), f"calibrated:{fit['responses_sha256']}"

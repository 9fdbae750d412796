"""MIS and accuracy against pruning rate across runs (DESIGN §9; the seed's Figs. 1, 3, 4, 5)."""

__all__ = ["sweep_report", "read_runs", "runs_table", "distinct_runs", "SWEEP_COLUMNS", "LAYER_TREND_COLUMNS", "training_curves",
           "write_curves"]

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import MisbenchError
from ..models.checkpoint import load_checkpoint_dict
from ..runtime.fileio import write_json
from ..scoring.summaries import is_class_layer, is_counted, score_summaries
from .figures import curves_figure, layer_runs_figure, paired_figure, sweep_figure, unit_distribution_figure
from .paired import PAIRED_COLUMNS, paired_report
from .stats import correlation
from .tables import alpha_of, read_csv_rows, read_scores, score_settings, write_csv

log = logging.getLogger(__name__)

SWEEP_COLUMNS = ["name", "method", "schedule", "rate", "n_units", "mis", "mis_confidence", "class_mis",
                 "class_mis_confidence", "top1", "n_constant", "n_sparse", "epochs", "optimizer", "conf_p05", "conf_p95", "mis_ci_low",
                 "mis_ci_high", "conf_ci_low", "conf_ci_high", "alpha", "alpha_source"]
LAYER_TREND_COLUMNS = ["name", "method", "schedule", "rate", "layer", "kind", "n_units", "n_constant", "n_sparse", "mis",
                       "mis_confidence", "mis_ci_low", "mis_ci_high", "conf_ci_low", "conf_ci_high"]


def _float(value, what, name, label="runs.csv"):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MisbenchError(f"{label}: run {name!r} has {what}={value!r}; expected a number") from None


def _int(value, what, name, label="runs.csv"):
    """A whole number as pandas writes one too ('3', '3.0'); empty is None."""
    if value in (None, ""):
        return None
    number = _float(value, what, name, label)
    if not number.is_integer():
        raise MisbenchError(f"{label}: run {name!r} has {what}={value!r}; expected a whole number")
    return int(number)


def _cell(value) -> str:
    """An in-memory table's value as runs.csv would hold it: missing (None, NaN) is empty."""
    if value is None:
        return ""
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        return "" if not np.isfinite(float(value)) else repr(float(value))
    return str(value)


def runs_table(runs) -> tuple[list[dict], Path, str]:
    """(rows as runs.csv's strings, the folder relative paths start from, the name errors use) of runs.csv, a
    study folder holding one, a pandas DataFrame or a list of dicts (relative paths from the working directory)."""
    if isinstance(runs, (str, Path)):
        path = Path(runs)
        if path.is_dir():
            path = path / "runs.csv"
        if not path.exists():
            raise MisbenchError(f"runs={str(runs)!r}: no such runs.csv or study folder")
        return read_csv_rows(path), path.parent, str(path)
    if hasattr(runs, "to_dict") and hasattr(runs, "columns"):  # a pandas DataFrame, not imported here
        records, label = runs.to_dict("records"), "runs (DataFrame)"
    elif isinstance(runs, (list, tuple)):
        records, label = list(runs), "runs (list)"
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise MisbenchError(f"{label}: item {i} is a {type(r).__name__}; expected a dict of runs.csv's "
                                    "columns (name, method, rate, scores or mis_confidence)")
    else:
        raise MisbenchError(f"runs: expected a runs.csv path, a study folder, a pandas DataFrame or a list of dicts, "
                            f"got {type(runs).__name__}")
    columns = list(dict.fromkeys(c for r in records for c in r))
    return [{str(c): _cell(r.get(c)) for c in columns} for r in records], Path.cwd(), label


def _scored_run(run: dict, scores_path: Path) -> dict:
    """A run's means from its mis.csv: layer-balanced over feature layers, and over class-unit layers."""
    scores = read_scores(scores_path)
    settings = score_settings(scores_path)
    layers = list(dict.fromkeys(s["layer"] for s in scores))
    summary = score_summaries(scores, layers, **settings)
    feature, classes = summary["feature_mean"], summary["class_mean"]
    conf = np.array([s["mis_confidence"] for s in scores
                     if is_counted(s["status"], settings["keep_sparse"]) and not is_class_layer(s["layer"])])
    alpha, source = alpha_of(scores)
    sidecar = scores_path.with_suffix(".json")
    layer_rows = [{"layer": name, "kind": "class" if is_class_layer(name) else "feature", "n_units": ls["n_units"],
                   "n_constant": ls["n_constant"], "n_sparse": ls["n_sparse"], "mis": ls["mis"], "mis_confidence": ls["mis_confidence"],
                   "mis_ci_low": ls["mis_ci"][0], "mis_ci_high": ls["mis_ci"][1],
                   "conf_ci_low": ls["mis_confidence_ci"][0], "conf_ci_high": ls["mis_confidence_ci"][1]}
                  for name, ls in summary["layers"].items()]
    return {**run, "scores": str(scores_path), "unit_scores": scores, "layer_rows": layer_rows,
            "keep_sparse": settings["keep_sparse"],
            "score_meta": json.loads(sidecar.read_text()) if sidecar.exists() else None,
            "n_units": sum(1 for s in scores if is_counted(s["status"], settings["keep_sparse"])),
            "n_constant": sum(1 for s in scores if s["status"] == "constant"),
            "n_sparse": sum(1 for s in scores if s["status"] == "sparse"),
            "mis": feature["mis"], "mis_confidence": feature["mis_confidence"],
            "mis_ci_low": feature["mis_ci"][0], "mis_ci_high": feature["mis_ci"][1],
            "conf_ci_low": feature["mis_confidence_ci"][0], "conf_ci_high": feature["mis_confidence_ci"][1],
            "class_mis": classes["mis"], "class_mis_confidence": classes["mis_confidence"],
            "conf_p05": float(np.percentile(conf, 5)) if len(conf) else None,
            "conf_p95": float(np.percentile(conf, 95)) if len(conf) else None,
            "alpha": alpha, "alpha_source": source}


def _sparse_warning(runs) -> str | None:
    """One line naming the runs whose sparse units are left out of the means, with the counts."""
    left_out = [(r["name"], r["n_sparse"]) for r in runs if r.get("n_sparse") and not r.get("keep_sparse")]
    if not left_out:
        return None
    return (f"sparse units (top pool reaching their minimum, filled by tie keys) are left out of the means of "
            f"{len(left_out)} runs: " + ", ".join(f"{name} {n}" for name, n in left_out[:6])
            + (" ..." if len(left_out) > 6 else "") + " (score --keep-sparse counts them)")


def read_runs(runs) -> list[dict]:
    """runs.csv (or a study folder holding one, or the runs in memory: runs_table) -> one dict per run with
    its own rate and means."""
    rows, base, label = runs_table(runs)
    if not rows:
        raise MisbenchError(f"{label} lists no runs")
    cols = set(rows[0])
    missing = {"name", "method", "rate"} - cols
    if missing or not ({"scores", "mis_confidence"} & cols):
        raise MisbenchError(f"{label}: needs columns name,method,rate and scores or mis_confidence; "
                            f"missing {', '.join(sorted(missing)) or 'scores|mis_confidence'}")
    runs = []
    for i, r in enumerate(rows):
        name = r["name"]
        if not name:
            raise MisbenchError(f"{label}: row {i + 1} has an empty name; give every run a name")
        run = {"name": name, "method": r["method"] or "none", "schedule": r.get("schedule") or "oneshot",
               "rate": _float(r["rate"], "rate", name, label), "optimizer": r.get("optimizer") or None,
               "epochs": _int(r.get("epochs"), "epochs", name, label),
               "checkpoint": str(base / r["checkpoint"]) if r.get("checkpoint") else None}
        if r.get("scores"):
            if not (base / r["scores"]).exists():
                raise MisbenchError(f"{label}: run {name!r} has scores={r['scores']!r}, which does not exist"
                                    + ("" if base == Path.cwd() else f" (relative to {base})"))
            run = _scored_run(run, base / r["scores"])
        else:
            run.update(n_units=None, mis_confidence=_float(r.get("mis_confidence"), "mis_confidence", name, label),
                       mis=_float(r["mis"], "mis", name, label) if r.get("mis") else None,
                       alpha=r.get("alpha", ""), alpha_source=r.get("alpha_source", ""))
        if r.get("top1"):
            run["top1"] = _float(r["top1"], "top1", name, label)
        elif r.get("eval"):
            run["top1"] = json.loads((base / r["eval"]).read_text())["top1"]
        else:
            run["top1"] = None
        runs.append(run)
    return runs


def distinct_runs(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """Each run once: rows naming the same scores file, and unpruned rows without scores that repeat the
    same values (a baseline listed once per method, as the seed's table does), are one run.

    Returns the distinct runs (first occurrence kept) and the names of the rows left out."""
    seen, keep, dropped = set(), [], []
    for run in runs:
        if run.get("scores"):
            key = ("scores", str(Path(run["scores"]).resolve()))
        elif run["rate"] == 0:
            key = ("unpruned", run.get("mis_confidence"), run.get("mis"), run.get("top1"), run.get("epochs"))
        else:
            key = ("row", id(run))
        if key in seen:
            dropped.append(run["name"])
            continue
        seen.add(key)
        keep.append(run)
    return keep, dropped


def training_curves(runs: list[dict]) -> list[dict]:
    curves = []
    for run in runs:
        if not run.get("checkpoint"):
            continue
        history = load_checkpoint_dict(run["checkpoint"])["training"]["history"]
        points = [h for h in history if h.get("val_top1") is not None]
        if len(points) < 2:
            continue
        x, epoch = [], 0
        for h in points:
            epoch = epoch + 1 if h["epoch"] > 0 else epoch
            x.append(epoch)
        curves.append({"name": run["name"], "x": x, "val_top1": [h["val_top1"] for h in points],
                       "steps": [h["step"] for h in points]})
    return curves


def write_curves(curves: list[dict], out_dir) -> None:
    """curves.png and curves.csv (name, epoch, step, val_top1)."""
    curves_figure(curves, Path(out_dir) / "curves.png")
    write_csv(Path(out_dir) / "curves.csv", [{"name": c["name"], "epoch": x, "step": s, "val_top1": v}
                                             for c in curves for x, s, v in zip(c["x"], c["steps"], c["val_top1"])],
              ["name", "epoch", "step", "val_top1"])


def _alpha_warning(runs: list[dict]) -> str | None:
    uncalibrated = sorted({r["alpha_source"] or "unrecorded" for r in runs
                           if r.get("mis_confidence") is not None and not str(r.get("alpha_source", "")).startswith("calibrated:")})
    if not uncalibrated:
        return None
    return (f"mis_confidence uses an uncalibrated alpha ({', '.join(uncalibrated)}): its level depends on that "
            "choice; compare runs with one alpha, or fit one with misbench calibrate (docs/mis.md)")


def sweep_report(runs_csv, out_dir, seed: int = 0, baseline: str | None = None) -> dict:
    """sweep.csv, sweep_layers.csv, summary.json, figures; paired.csv against the unpruned `baseline` run
    (default: the run named control, else base, when runs have scores)."""
    out_dir = Path(out_dir)
    runs = read_runs(runs_csv)
    label = runs_table(runs_csv)[2] if not isinstance(runs_csv, (str, Path)) else runs_csv
    paired = paired_report(runs, baseline, seed, label)  # validates before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "sweep.csv", runs, SWEEP_COLUMNS)
    # the random-weights reference is no point on the pruning axis: it stays out of the correlations
    distinct, dropped = distinct_runs([r for r in runs if r["method"] != "random"])
    if dropped:
        log.warning("runs.csv rows %s repeat another row's run; correlations count each run once", dropped)
    rates = [r["rate"] for r in distinct]  # each run's own rate, never inferred from its values

    def values(key):
        return [r[key] if r.get(key) is not None else np.nan for r in distinct]

    figures = []
    sweep_figure(runs, "mis_confidence", out_dir / "sweep_mis_confidence.png",
                 "MIS confidence\n(layer-balanced feature mean;\nbars: 5-95% of units)", band=("conf_p05", "conf_p95"))
    figures.append("sweep_mis_confidence.png")
    if any(r.get("mis") is not None for r in runs):
        sweep_figure(runs, "mis", out_dir / "sweep_mis.png", "MIS\n(layer-balanced feature mean)")
        figures.append("sweep_mis.png")
    if any(r.get("class_mis_confidence") is not None for r in runs):
        sweep_figure(runs, "class_mis_confidence", out_dir / "sweep_class_mis_confidence.png",
                     "MIS confidence of class units")
        figures.append("sweep_class_mis_confidence.png")
    if any(r.get("top1") is not None for r in runs):
        sweep_figure(runs, "top1", out_dir / "sweep_accuracy.png", "validation top-1")
        figures.append("sweep_accuracy.png")
    layer_rows = [{**{k: run[k] for k in ("name", "method", "schedule", "rate")}, **row}
                  for run in runs for row in run.get("layer_rows", [])]
    if layer_rows:
        write_csv(out_dir / "sweep_layers.csv", layer_rows, LAYER_TREND_COLUMNS)
        layer_runs_figure(layer_rows, out_dir / "layers.png")
        figures.append("layers.png")
        unit_distribution_figure(runs, out_dir / "unit_distribution.png")
        figures.append("unit_distribution.png")
    if paired:
        write_csv(out_dir / "paired.csv", paired["runs"], PAIRED_COLUMNS)
        write_csv(out_dir / "paired_layers.csv", paired["layers"], PAIRED_COLUMNS)
        if any(r.get("diff_mis_confidence") is not None for r in paired["runs"]):
            paired_figure(paired["runs"], paired["baseline"], out_dir / "paired.png")
            figures.append("paired.png")
    curves = training_curves(runs)
    if curves:
        write_curves(curves, out_dir)
        figures.append("curves.png")
    summary = {"n_runs": len(distinct), "n_rows": len(runs), "duplicate_rows": dropped, "runs": str(label),
               "means": "layer-balanced: mean over layers of each layer's mean over its non-constant units; "
                        "mis/mis_confidence over feature layers, class_* over softmax/logits",
               "correlation_rate_mis_confidence": correlation(rates, values("mis_confidence"), seed),
               "correlation_rate_mis": correlation(rates, values("mis"), seed),
               "correlation_rate_class_mis_confidence": correlation(rates, values("class_mis_confidence"), seed),
               "correlation_rate_class_mis": correlation(rates, values("class_mis"), seed),
               "correlation_rate_top1": correlation(rates, values("top1"), seed),
               "alpha": sorted({str(r.get("alpha", "")) for r in runs}),
               "alpha_source": sorted({str(r.get("alpha_source", "")) for r in runs}),
               "alpha_warning": _alpha_warning(runs),
               "paired_baseline": paired["baseline"] if paired else None,
               "paired_test": paired["test"] if paired else None,
               "sparse_warning": _sparse_warning(runs),
               # the settings the report's header shows: the paired baseline's mis.json, else the first run's
               "header_scores": next((r["scores"] for r in sorted(runs, key=lambda r: not (paired and r["name"] == paired["baseline"]))
                                      if r.get("scores")), None),
               "figures": figures}
    write_json(out_dir / "summary.json", summary)
    return summary

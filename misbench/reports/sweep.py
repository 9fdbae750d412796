"""MIS and accuracy against pruning rate across runs (DESIGN §9; the seed's Figs. 1, 3, 4, 5)."""

__all__ = ["sweep_report", "read_runs", "SWEEP_COLUMNS", "training_curves", "write_curves", "sweep_section"]

import json
from pathlib import Path

import numpy as np

from ..errors import MisbenchError
from ..fileio import write_json
from .figures import curves_figure, layers_figure, sweep_figure
from .stats import correlation
from .tables import layer_summary, read_csv_rows, read_scores, write_csv

SWEEP_COLUMNS = ["name", "method", "schedule", "rate", "n_units", "mis", "mis_confidence", "top1",
                 "epochs", "optimizer", "conf_p05", "conf_p95"]


def _float(value, what, name):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MisbenchError(f"runs.csv: run {name!r} has {what}={value!r}; expected a number") from None


def read_runs(runs_csv) -> list[dict]:
    """runs.csv (or a study folder holding one) -> one dict per run with its own rate and means."""
    path = Path(runs_csv)
    if path.is_dir():
        path = path / "runs.csv"
    rows = read_csv_rows(path)
    if not rows:
        raise MisbenchError(f"{path} lists no runs")
    cols = set(rows[0])
    missing = {"name", "method", "rate"} - cols
    if missing or not ({"scores", "mis_confidence"} & cols):
        raise MisbenchError(f"{path}: needs columns name,method,rate and scores or mis_confidence; "
                            f"missing {sorted(missing) or ['scores|mis_confidence']}")
    base = path.parent
    runs = []
    for r in rows:
        name = r["name"]
        run = {"name": name, "method": r["method"] or "none", "schedule": r.get("schedule") or "oneshot",
               "rate": _float(r["rate"], "rate", name), "optimizer": r.get("optimizer") or None,
               "epochs": int(r["epochs"]) if r.get("epochs") not in (None, "") else None,
               "checkpoint": str(base / r["checkpoint"]) if r.get("checkpoint") else None}
        if r.get("scores"):
            scores = read_scores(base / r["scores"])
            ok = [s for s in scores if s["status"] == "ok"]
            conf = np.array([s["mis_confidence"] for s in ok])
            run.update(scores=str(base / r["scores"]), unit_scores=scores, n_units=len(ok),
                       mis=float(np.mean([s["mis"] for s in ok])) if ok else None,
                       mis_confidence=float(conf.mean()) if ok else None,
                       conf_p05=float(np.percentile(conf, 5)) if ok else None,
                       conf_p95=float(np.percentile(conf, 95)) if ok else None)
        else:
            run.update(n_units=None, mis_confidence=_float(r["mis_confidence"], "mis_confidence", name),
                       mis=_float(r["mis"], "mis", name) if r.get("mis") else None)
        if r.get("top1"):
            run["top1"] = _float(r["top1"], "top1", name)
        elif r.get("eval"):
            run["top1"] = json.loads((base / r["eval"]).read_text())["top1"]
        else:
            run["top1"] = None
        runs.append(run)
    return runs


def training_curves(runs: list[dict]) -> list[dict]:
    from ..checkpoint import load_checkpoint_dict

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


def sweep_section(summary: dict, out_dir):
    """The report.html section of a sweep written into out_dir."""
    from .html import Section

    tables = ["sweep.csv"] + (["layers.csv"] if (Path(out_dir) / "layers.csv").exists() else [])
    return Section("MIS and accuracy against pruning rate", images=summary["figures"], tables=tables,
                   data={k: v for k, v in summary.items() if k.startswith("correlation")})


def sweep_report(runs_csv, out_dir, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    runs = read_runs(runs_csv)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "sweep.csv", runs, SWEEP_COLUMNS)
    rates = [r["rate"] for r in runs]  # each run's own rate, never inferred from its values

    def values(key):
        return [r[key] if r.get(key) is not None else np.nan for r in runs]

    figures = []
    sweep_figure(runs, "mis_confidence", out_dir / "sweep_mis_confidence.png", "mean MIS confidence (5-95% of units)",
                 band=("conf_p05", "conf_p95"))
    figures.append("sweep_mis_confidence.png")
    if any(r.get("mis") is not None for r in runs):
        sweep_figure(runs, "mis", out_dir / "sweep_mis.png", "mean MIS")
        figures.append("sweep_mis.png")
    if any(r.get("top1") is not None for r in runs):
        sweep_figure(runs, "top1", out_dir / "sweep_accuracy.png", "validation top-1")
        figures.append("sweep_accuracy.png")
    layer_rows = []
    for run in runs:
        if run.get("unit_scores"):
            layer_rows += [{"run": run["name"], **row} for row in layer_summary(run["unit_scores"], seed)]
    if layer_rows:
        write_csv(out_dir / "layers.csv", layer_rows, ["run", "layer", "n_units", "n_constant", "mis", "mis_confidence",
                                                       "conf_ci_low", "conf_ci_high"])
        first = runs[0]["name"]
        layers_figure([r for r in layer_rows if r["run"] == first], out_dir / "layers.png",
                      f"Mean MIS confidence per layer ({first})")
        figures.append("layers.png")
    curves = training_curves(runs)
    if curves:
        write_curves(curves, out_dir)
        figures.append("curves.png")
    summary = {"n_runs": len(runs), "runs": str(runs_csv),
               "correlation_rate_mis_confidence": correlation(rates, values("mis_confidence"), seed),
               "correlation_rate_mis": correlation(rates, values("mis"), seed),
               "correlation_rate_top1": correlation(rates, values("top1"), seed),
               "figures": figures}
    write_json(out_dir / "summary.json", summary)
    return summary

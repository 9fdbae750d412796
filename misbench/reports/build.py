"""Each report kind as one function that writes its folder and returns its main file (`misbench report KIND`)."""

__all__ = ["REPORTS", "classwise", "sweep", "layers", "curves"]

from pathlib import Path

from .classwise import classwise_report
from .figures import layers_figure
from .gallery import unit_galleries
from .html import Section, write_html
from .sweep import sweep_report, sweep_section, training_curves, write_curves
from .tables import LAYER_COLUMNS, layer_summary, read_scores, score_settings, write_csv


def classwise(scores, out, acts=None, eval_json=None, layer: str | None = None, tasks=None, units=(),
              seed: int = 0) -> Path:
    """Softmax-unit MIS against class-wise accuracy: classwise.csv, summary.json, figure, report.html."""
    summary = classwise_report(scores, out, acts=acts, eval_json=eval_json, layer=layer, seed=seed)
    pictures = unit_galleries(out, read_scores(scores), tasks, acts, units) if tasks and acts else []
    sections = [Section("Class-wise accuracy vs MIS", images=["classwise.png"], tables=["classwise.csv"],
                        data={k: summary[k] for k in ("correlation_accuracy_mis_confidence", "correlation_accuracy_mis")})]
    sections += [Section(f"Unit {label}", images=[name]) for name, label in pictures]
    return write_html(out, "misbench class-wise report", sections)


def sweep(runs, out, seed: int = 0, baseline: str | None = None) -> Path:
    """MIS and accuracy against pruning rate: sweep.csv, sweep_layers.csv, paired.csv (against the unpruned
    `baseline` run: default control, else base), summary.json, figures, report.html."""
    summary = sweep_report(runs, out, seed, baseline=baseline)
    return write_html(out, "misbench sweep report", [sweep_section(summary, out)])


def layers(scores, out) -> Path:
    """Mean MIS per layer (as the MIS authors publish them): layers.csv and layers.png."""
    table = layer_summary(read_scores(scores), **score_settings(scores))
    Path(out).mkdir(parents=True, exist_ok=True)
    write_csv(Path(out) / "layers.csv", table, LAYER_COLUMNS)
    layers_figure(table, Path(out) / "layers.png")
    return Path(out) / "layers.csv"


def curves(checkpoints, out) -> Path:
    """Validation accuracy per retraining epoch from checkpoint histories: curves.csv and curves.png."""
    found = training_curves([{"name": Path(c).stem, "checkpoint": c} for c in checkpoints])
    Path(out).mkdir(parents=True, exist_ok=True)
    write_curves(found, out)
    return Path(out) / "curves.csv"


REPORTS = {"classwise": classwise, "sweep": sweep, "layers": layers, "curves": curves}

"""Does MIS follow class-wise accuracy in the softmax layer? (DESIGN §9, the seed's Fig. 6)"""

__all__ = ["classwise_report", "CLASSWISE_COLUMNS"]

import json
import logging
from pathlib import Path

import numpy as np

from ..activations.evaluate import evaluate_acts
from ..errors import MisbenchError
from ..runtime.fileio import write_json
from .figures import class_scatter_figure, classwise_figure
from .stats import correlation
from .tables import alpha_of, read_scores, write_csv

log = logging.getLogger(__name__)

CLASSWISE_COLUMNS = ["class", "name", "n", "accuracy", "mis", "mis_confidence", "alpha", "alpha_source"]
# which class units a score ranked: the mission's softmax, or the pre-softmax outputs the MIS authors ranked
CLASS_UNIT_MEANING = {"softmax": "softmax probabilities", "logits": "pre-softmax logits"}


def classwise_report(scores_csv, out_dir, acts=None, eval_json=None, layer: str | None = None, seed: int = 0) -> dict:
    out_dir = Path(out_dir)
    if (acts is None) == (eval_json is None):
        raise MisbenchError("give exactly one of --acts ACTS.h5 or --eval EVAL.json for the class-wise accuracy")
    accuracy = evaluate_acts(acts) if acts else json.loads(Path(eval_json).read_text())
    if accuracy.get("label_warning"):
        log.warning("class-wise report: %s", accuracy["label_warning"])
    scores = read_scores(scores_csv)
    layers = list(dict.fromkeys(r["layer"] for r in scores))
    layer = layer or next((name for name in CLASS_UNIT_MEANING if name in layers), None)
    if layer not in layers:
        raise MisbenchError(f"{scores_csv} has no layer {layer or 'softmax'!r} of class units; pass --layer "
                            f"(layers there: {', '.join(layers[:10])})")
    by_unit = {r["unit"]: r for r in scores if r["layer"] == layer}
    per_class = accuracy["per_class"]
    if len(by_unit) != len(per_class):
        raise MisbenchError(f"layer {layer!r} has {len(by_unit)} units but the accuracy covers {len(per_class)} "
                            "classes; the softmax units must be the classes")
    alpha, source = alpha_of(scores)
    rows = []
    for c in per_class:
        unit = by_unit.get(c["class"], {})
        rows.append({"class": c["class"], "name": c["name"], "n": c["n"], "accuracy": c["accuracy"],
                     "mis": unit.get("mis", np.nan), "mis_confidence": unit.get("mis_confidence", np.nan),
                     "alpha": alpha, "alpha_source": source})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "classwise.csv", rows, CLASSWISE_COLUMNS)
    acc = [r["accuracy"] if r["accuracy"] is not None else np.nan for r in rows]
    summary = {
        "layer": layer, "class_units": CLASS_UNIT_MEANING.get(layer, f"units of layer {layer}"),
        "scores": str(scores_csv), "n_classes": len(rows),
        "top1": accuracy.get("top1"), "mean_mis": float(np.nanmean([r["mis"] for r in rows])),
        "mean_mis_confidence": float(np.nanmean([r["mis_confidence"] for r in rows])),
        "correlation_accuracy_mis_confidence": correlation(acc, [r["mis_confidence"] for r in rows], seed),
        "correlation_accuracy_mis": correlation(acc, [r["mis"] for r in rows], seed),
        "alpha": alpha, "alpha_source": source, "label_warning": accuracy.get("label_warning", ""),
        "alpha_warning": None if source.startswith("calibrated:") else
        f"mis_confidence uses an uncalibrated alpha ({source or 'unrecorded'}); fit one with misbench calibrate",
        "figures": ["classwise_scatter.png", "classwise.png"],
    }
    write_json(out_dir / "summary.json", summary)
    class_scatter_figure(rows, summary["correlation_accuracy_mis_confidence"], out_dir / "classwise_scatter.png",
                         f"MIS confidence of {summary['class_units']} against class-wise accuracy")
    classwise_figure(rows, out_dir / "classwise.png",
                     f"Class accuracy and MIS confidence per class unit ({summary['class_units']})")
    return summary

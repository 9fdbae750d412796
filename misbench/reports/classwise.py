"""Does MIS follow class-wise accuracy in the softmax layer? (DESIGN §9, the seed's Fig. 6)"""

__all__ = ["classwise_report", "CLASSWISE_COLUMNS"]

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from ..activations.evaluate import evaluate_acts
from ..activations.order import tie_keys
from ..activations.store import open_activations
from ..errors import MisbenchError
from ..runtime.fileio import write_json
from ..scoring.mis import SELECTIONS, rank_rows
from ..scoring.settings import ScoreSettings
from ..scoring.results import read_meta
from .figures import class_scatter_figure, classwise_figure
from .stats import correlation
from .tables import alpha_of, read_scores, write_csv

log = logging.getLogger(__name__)

CLASSWISE_COLUMNS = ["class", "name", "n", "accuracy", "mis", "mis_confidence", "purity", "pool", "class_images",
                     "alpha", "alpha_source"]
# which class units a score ranked: the mission's softmax, or the pre-softmax outputs the MIS authors ranked
CLASS_UNIT_MEANING = {"softmax": "softmax probabilities", "logits": "pre-softmax logits"}


def _acts_for(scores_csv, acts, meta: dict | None) -> Path | None:
    """The activation file the scores were computed from: --acts, acts.h5 beside the scores (a study's run
    folder), or the path mis.json records; None when none of them exists with the scored row count."""
    candidates = [acts, Path(scores_csv).parent / "acts.h5", (meta or {}).get("acts")]
    for path in candidates:
        if path and Path(path).exists():
            with open_activations(path) as f:
                if meta is None or f.n_rows == meta.get("n_rows"):
                    return Path(path)
    return None


def top_pools(acts_path, layer: str, settings: dict) -> dict:
    """Per class unit of `layer`: (the rows of its top selection pool, its class's image count), ranked exactly as
    the score ranked them (activation, then the score seed's tie keys)."""
    with open_activations(acts_path) as f:
        labels, index, n_rows = f.labels, f.index, f.n_rows
        known = {f.name for f in dataclasses.fields(ScoreSettings)} - {"metrics"}
        score_settings = ScoreSettings(**{k: v for k, v in settings.items() if k in known}).for_layer(layer)
        pool = SELECTIONS[score_settings.selection].per_side(score_settings, n_rows)
        out = {}
        for unit, values, rows in f.unit_candidates(layer):
            keys = tie_keys(int(settings.get("seed", 0)), layer, unit, index[rows])
            top = rows[rank_rows(values, keys, True, pool)]
            out[unit] = {"purity": float(np.mean(labels[top] == unit)), "pool": int(len(top)),
                         "class_images": int(np.count_nonzero(labels == unit))}
    return out


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
    meta = read_meta(scores_csv)
    source_acts = _acts_for(scores_csv, acts, meta) if meta is not None else None
    pools = top_pools(source_acts, layer, meta["settings"]) if source_acts is not None else {}
    if not pools:
        log.warning("classwise: purity and pool are left empty: they need the scores' mis.json and activation file "
                    "(--acts, or acts.h5 beside %s)", scores_csv)
    rows = []
    for c in per_class:
        unit = by_unit.get(c["class"], {})
        rows.append({"class": c["class"], "name": c["name"], "n": c["n"], "accuracy": c["accuracy"],
                     "mis": unit.get("mis", np.nan), "mis_confidence": unit.get("mis_confidence", np.nan),
                     **pools.get(c["class"], {}), "alpha": alpha, "alpha_source": source})
    over = [r for r in rows if r.get("pool") is not None and r["pool"] > r["class_images"]]
    pool_warning = None
    if over:
        pool_warning = (f"{len(over)} of {len(rows)} class units have a top pool larger than their class "
                        f"({over[0]['pool']} images against {min(r['class_images'] for r in over)}-"
                        f"{max(r['class_images'] for r in over)} of the class): at least "
                        f"{over[0]['pool'] - max(r['class_images'] for r in over)} of each such pool are other "
                        "classes' images (purity in classwise.csv); score the class units with a smaller "
                        "--quantile (or more rows per class)")
        log.warning("classwise: %s", pool_warning)
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
        "pool_warning": pool_warning,
        "mean_purity": float(np.mean([r["purity"] for r in rows if "purity" in r])) if pools else None,
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

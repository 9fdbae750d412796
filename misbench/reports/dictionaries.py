"""Neurons against dictionary features, layer by layer (issue 24 item 7): the question of Colin et al. (2024,
arXiv 2411.03993) -- are a network's dictionary features more interpretable than its neurons, and more so deeper?

Input: one mis.csv holding each layer's neurons and its dictionaries' feature layers (a study's
dictionary/mis.csv, or any score run over both), and pairs `[LABEL:]LAYER=FEATURES` in depth order. Per layer
and population: units, units scored (status ok: constant and sparse units are left out of every mean, as
DESIGN §8 says, and counted), mean MIS, mean MS (with an ms column), mean density and the share sparse (with
those columns), and for a dictionary its FVU, L0 and dead share (its training record, found through the
activation file's layer attrs). Per pair: the difference of mean MIS (features - neurons) with a bootstrap
interval (units resampled within each population) and the two-sided rank-sum p of the two unit samples.
"""

__all__ = ["dictionary_report", "parse_pair", "DICTIONARY_COLUMNS"]

import json
import zlib
from pathlib import Path

import numpy as np
import torch

from ..activations.store import open_activations
from ..errors import MisbenchError
from ..runtime.fileio import write_json
from .compare import rank_sum
from .figures import depth_figure
from .tables import read_scores, write_csv

DICTIONARY_COLUMNS = ["layer", "depth", "label", "population", "n_units", "n_scored", "mis", "ms", "density",
                      "share_sparse", "fvu", "l0", "dead_share", "diff_mis", "diff_ci_low", "diff_ci_high",
                      "rank_sum_p"]


def parse_pair(text: str) -> tuple[str, str, str]:
    """`[LABEL:]LAYER=FEATURES` -> (label, layer, features); the label defaults to `features`."""
    label, colon, rest = str(text).rpartition(":")
    if not colon:
        label, rest = "features", str(text)
    layer, eq, features = rest.partition("=")
    if not (eq and layer.strip() and features.strip() and (label.strip() or not colon)):
        raise MisbenchError(f"--pair {text!r}: expected [LABEL:]LAYER=FEATURES, e.g. x4:layer3=layer3_sae")
    return label.strip(), layer.strip(), features.strip()


def _training_records(scores: Path) -> dict:
    """Feature layer -> its dictionary's training record, where the activation file and dictionary are at hand."""
    meta_path = scores.with_suffix(".json")
    if not meta_path.is_file():
        return {}
    acts = Path(json.loads(meta_path.read_text()).get("acts", ""))
    if not acts.is_file():
        return {}
    out = {}
    with open_activations(acts) as a:
        files = {name: a.layer_attrs(name).get("dictionary_file") for name in a.layer_names}
    for name, file in files.items():
        if file and Path(str(file)).is_file():
            try:
                obj = torch.load(str(file), map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - another library's file: no record, the columns stay empty
                continue
            if isinstance(obj, dict) and isinstance(obj.get("training"), dict):
                out[name] = obj["training"]
    return out


def _float(value):
    return float(value) if value not in ("", None) else None


def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _population(rows: list[dict], layer: str) -> dict:
    mine = [r for r in rows if r["layer"] == layer]
    ok = [r for r in mine if r["status"] == "ok"]
    return {"n_units": len(mine), "n_scored": len(ok), "mis": _mean([r["mis"] for r in ok]),
            "ms": _mean([_float(r.get("ms")) for r in ok]), "density": _mean([_float(r.get("density")) for r in mine]),
            "share_sparse": (sum(r["status"] == "sparse" for r in mine) / len(mine)) if mine else None,
            "values": np.array([r["mis"] for r in ok], float)}


def _diff_interval(a: np.ndarray, b: np.ndarray, rng, n_boot: int) -> tuple:
    """Percentile bootstrap interval of mean(b) - mean(a), units resampled within each population."""
    if len(a) == 0 or len(b) == 0 or n_boot == 0:
        return None, None
    diffs = b[rng.integers(0, len(b), (n_boot, len(b)))].mean(1) - a[rng.integers(0, len(a), (n_boot, len(a)))].mean(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def dictionary_report(scores, pairs, out, seed: int = 0, n_boot: int = 1000) -> dict:
    """Write DIR/dictionaries.csv (DICTIONARY_COLUMNS), dictionaries.json and dictionaries.png (the difference
    against depth, one line per label); return the summary."""
    scores, out = Path(scores), Path(out)
    rows = read_scores(scores)
    have = set(r["layer"] for r in rows)
    parsed = [parse_pair(p) for p in pairs]
    if not parsed:
        raise MisbenchError("report dictionaries needs at least one --pair LAYER=FEATURES")
    for label, layer, features in parsed:
        for name in (layer, features):
            if name not in have:
                raise MisbenchError(f"--pair {label}:{layer}={features}: layer {name!r} is not in {scores} (it has "
                                    f"{', '.join(sorted(have))})")
    records = _training_records(scores)
    depth = {layer: i for i, layer in enumerate(dict.fromkeys(layer for _, layer, _ in parsed))}
    table, comparisons = [], []
    for layer in depth:
        neurons = _population(rows, layer)
        table.append({"layer": layer, "depth": depth[layer], "label": "neurons", "population": layer,
                      **{k: v for k, v in neurons.items() if k != "values"}})
        for label, _, features in [p for p in parsed if p[1] == layer]:
            feats = _population(rows, features)
            rng = np.random.default_rng([seed, zlib.crc32(f"{layer}={features}".encode())])
            low, high = _diff_interval(neurons["values"], feats["values"], rng, n_boot)
            diff = feats["mis"] - neurons["mis"] if feats["mis"] is not None and neurons["mis"] is not None else None
            test = rank_sum(feats["values"], neurons["values"])
            record = records.get(features, {})
            row = {"layer": layer, "depth": depth[layer], "label": label, "population": features,
                   **{k: v for k, v in feats.items() if k != "values"},
                   "fvu": record.get("fvu"), "l0": record.get("l0"), "dead_share": record.get("dead_share"),
                   "diff_mis": diff, "diff_ci_low": low, "diff_ci_high": high, "rank_sum_p": test["p"]}
            table.append(row)
            comparisons.append({k: row[k] for k in ("layer", "depth", "label", "population", "diff_mis",
                                                    "diff_ci_low", "diff_ci_high", "rank_sum_p")})
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "dictionaries.csv", table, DICTIONARY_COLUMNS)
    summary = {"scores": str(scores), "pairs": [f"{a}:{b}={c}" for a, b, c in parsed], "n_boot": n_boot,
               "seed": seed, "comparisons": comparisons}
    write_json(out / "dictionaries.json", summary)
    depth_figure(comparisons, list(depth), out / "dictionaries.png")
    return summary

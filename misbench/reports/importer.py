"""Import the MIS authors' published per-unit pickles into mis.csv, without running pickled code."""

__all__ = ["import_scores", "RestrictedUnpickler"]

import io
import logging
import pickle
from pathlib import Path

import numpy as np

from ..errors import MisbenchError
from ..runtime.fileio import refuse_same_paths
from ..scoring.mis import UnitScore
from ..scoring.results import write_scores_csv
from ..scoring.summaries import clopper_pearson

# exactly the constructors a pickled DataFrame of numbers and strings needs
ALLOWED = {
    ("pandas.core.frame", "DataFrame"), ("pandas.core.series", "Series"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas.core.internals.blocks", "new_block"),
    ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.indexes.numeric", "Int64Index"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "slice"),
    # pandas >= 2 spells some of them through the top-level namespace and string arrays
    ("pandas", "DataFrame"), ("pandas", "Series"), ("pandas", "Index"), ("pandas", "RangeIndex"),
    ("pandas", "StringDtype"), ("pandas.arrays", "StringArray"), ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas.core.arrays.string_", "StringArray"), ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
}


log = logging.getLogger(__name__)

PUBLISHED_TASKS = 20  # the published scores are fractions of 20 tasks
# confidences this close to 1 are what the authors' deterministic tie-break gives a pruned (zeroed) filter
SATURATED_CONFIDENCE = 0.999


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise MisbenchError(f"refusing to unpickle {module}.{name}: published score files hold only "
                                "pandas/numpy data, and anything else could run code")
        if module.startswith("numpy.core."):  # numpy 1 pickles on numpy 2
            module = module.replace("numpy.core.", "numpy._core.", 1)
        return super().find_class(module, name)


def _load(path):
    data = Path(path).read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except MisbenchError:
        raise
    except Exception as err:
        raise MisbenchError(f"{path} is not a readable score pickle: {type(err).__name__}: {err}") from None


def _parse_units(specs) -> set:
    out = set()
    for spec in specs or ():
        layer, _, units = spec.rpartition(":")
        if not layer:
            raise MisbenchError(f"--constant {spec!r}: expected LAYER:I,J,K")
        out |= {(layer, int(u)) for u in units.split(",") if u.strip()}
    return out


def import_scores(path, out, drop_layer_types=(), constant=(), constant_above: float | None = None) -> dict:
    """The published {'scores': DataFrame[layer, unit, mis, mis_confidence, layer_type], 'layer_types': {...}}
    -> mis.csv rows (status ok/constant, no intervals). Returns per-layer and model means.

    Pruned (zeroed) filters were scored by the authors' deterministic tie-break and show
    mis_confidence near 1: mark them constant by `constant` lists or `constant_above`."""
    refuse_same_paths({"PICKLE_FILE": path}, {"--out": out})
    obj = _load(path)
    if not isinstance(obj, dict) or "scores" not in obj:
        raise MisbenchError(f"{path}: expected a dict with 'scores' (and 'layer_types'); found {type(obj).__name__}")
    frame, types = obj["scores"], obj.get("layer_types", {})
    needed = {"layer", "unit", "mis", "mis_confidence"}
    if not needed <= set(frame.columns):
        raise MisbenchError(f"{path}: the scores table lacks columns {sorted(needed - set(frame.columns))}")
    unknown = [t for t in drop_layer_types if t not in types]
    if unknown:
        raise MisbenchError(f"--drop-type {unknown[0]!r}: the file's layer types are {sorted(types)}")
    drop_codes = {types[t] for t in drop_layer_types}
    constant_units = _parse_units(constant)
    results = []
    for rec in frame.to_dict("records"):
        code = rec.get("layer_type")
        if code in drop_codes:
            continue
        key = (str(rec["layer"]), int(rec["unit"]))
        mis, conf = float(rec["mis"]), float(rec["mis_confidence"])
        saturated = constant_above is not None and conf >= constant_above
        status = "constant" if key in constant_units or saturated else "ok"
        results.append(UnitScore(key[0], key[1], status, mis=mis, mis_confidence=conf, n_tasks=PUBLISHED_TASKS,
                                 mis_ci=clopper_pearson(round(mis * PUBLISHED_TASKS * 2) / 2, PUBLISHED_TASKS)))
    write_scores_csv(out, results, None, "published")  # the authors' alpha is not in the file
    ok = [r for r in results if r.status == "ok"]
    saturated = sum(1 for r in ok if r.mis_confidence >= SATURATED_CONFIDENCE)
    warning = None
    if saturated:
        warning = (f"{saturated} of {len(ok)} scored units have mis_confidence >= {SATURATED_CONFIDENCE}, as pruned "
                   f"(zeroed) filters scored by the authors' deterministic tie-break do; they count in every mean: "
                   f"mark them constant with --constant-above {SATURATED_CONFIDENCE} (or list them with --constant)")
        log.warning("%s: %s", path, warning)
    layers = {}
    for r in ok:
        layers.setdefault(r.layer, []).append(r.mis_confidence)
    return {"n_units": len(results), "n_ok": len(ok), "n_saturated": saturated, "warning": warning,
            "mean_mis": float(np.mean([r.mis for r in ok])) if ok else None,
            "mean_mis_confidence": float(np.mean([r.mis_confidence for r in ok])) if ok else None,
            "layers": {k: {"n": len(v), "mis_confidence": float(np.mean(v))} for k, v in layers.items()},
            "layer_types": {str(k): int(v) for k, v in types.items()}}

"""The score run's files: mis.csv (its columns and rows), tasks.h5, and the merge of shard parts into them."""

__all__ = ["MIS_COLUMNS", "stored_value", "shard_path", "merge_scores", "layer_summaries", "score_rows",
           "write_scores_csv", "write_tasks", "run_key", "refuse_foreign_outputs"]

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import MisbenchError
from ..runtime.fileio import (atomic_path, option_label, overwrite_hint, read_csv_rows, refuse_existing,
                              refuse_same_paths, utc_now, write_hdf5, write_json)
from .settings import ScoreSettings
from .summaries import score_summaries

MIS_COLUMNS = ["layer", "unit", "status", "mis", "mis_confidence", "mis_ci_low", "mis_ci_high",
               "conf_ci_low", "conf_ci_high", "n_tasks", "alpha", "alpha_source"]


def stored_value(x: float) -> float:
    """The value as mis.csv stores it, so summaries recomputed from CSVs (merged shards) are identical."""
    return float(f"{x:.6g}")


def shard_path(out, shard: tuple[int, int]) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.part{shard[0]}of{shard[1]}{out.suffix}")


def _results_from_csv(path) -> list[dict]:
    def num(v):
        return float(v) if v != "" else None

    out = []
    for row in read_csv_rows(path):
        out.append({"layer": row["layer"], "unit": int(row["unit"]), "status": row["status"],
                    "mis": num(row["mis"]), "mis_confidence": num(row["mis_confidence"]),
                    "mis_ci": (num(row["mis_ci_low"]), num(row["mis_ci_high"])),
                    "conf_ci": (num(row["conf_ci_low"]), num(row["conf_ci_high"])),
                    "n_tasks": int(row["n_tasks"])})
    return out


def merge_scores(parts, out, tasks_out=None, overwrite: bool = False) -> dict:
    """Merge `--shard I/N` outputs (mis.csv parts with their .json, and tasks files) into one result."""
    parts = [Path(p) for p in parts]
    refuse_same_paths({f"PART {p}": p for p in parts}, {"--out": out, "mis.json (beside --out)": Path(out).with_suffix(".json"),
                                                       "--tasks-out": tasks_out})
    key = run_key("merge-scores", parts, {}, out, tasks_out)
    refuse_foreign_outputs(out, tasks_out, key, overwrite)
    metas = []
    for p in parts:
        if not p.with_suffix(".json").exists():
            raise MisbenchError(f"{p} has no {p.with_suffix('.json').name} beside it; merge needs both")
        metas.append(json.loads(p.with_suffix(".json").read_text()))
    first = metas[0]

    def content(meta):
        return meta["acts_sha256"], {k: v for k, v in meta["settings"].items() if k not in ScoreSettings.RUNTIME}

    for p, m in zip(parts, metas):
        if content(m) != content(first):
            raise MisbenchError(f"{p} was scored from another file or with other settings than {parts[0]}; "
                                "shards must share both")
    n = int(first["shard"].split("/")[1])
    shards = sorted(int(m["shard"].split("/")[0]) for m in metas)
    if shards != list(range(n)) or any(int(m["shard"].split("/")[1]) != n for m in metas):
        raise MisbenchError(f"merge needs shards 0..{n - 1} of {n} exactly once, got {[m['shard'] for m in metas]}")
    names = first["layer_order"]
    results = [r for p in parts for r in _results_from_csv(p)]
    results.sort(key=lambda r: (names.index(r["layer"]), r["unit"]))
    fields = {k: v for k, v in first["settings"].items() if k in {f.name for f in dataclasses.fields(ScoreSettings)}}
    settings = ScoreSettings(**fields)
    # per shard: a unit's images are counted by the shard that scores it (one store per process)
    meta = {**first, "shard": f"merged {n}", "created_utc": utc_now(),
            "embedded_images": sum(m.get("embedded_images", 0) for m in metas),
            "distinct_images": sum(m.get("distinct_images", 0) for m in metas),
            "timing": {"total_s": round(sum(m["timing"]["total_s"] for m in metas), 3)}, "run_key": key}
    meta.update(layer_summaries(results, names, settings))
    if tasks_out:
        _merge_tasks([m["tasks_out"] for m in metas], tasks_out, names, key)
    write_json(Path(out).with_suffix(".json"), meta)
    write_scores_csv(out, results, first["settings"]["alpha"], first["settings"]["alpha_source"])
    return meta


def _merge_tasks(paths, target, names, run_key: str) -> None:
    def build(out):
        with h5py.File(paths[0], "r") as first:
            for key, value in first.attrs.items():
                out.attrs[key] = value
        out.attrs["run_key"] = run_key
        for name in names:
            pieces = []
            for path in paths:
                with h5py.File(path, "r") as h5:
                    if name in h5:
                        pieces.append({k: h5[name][k][...] for k in h5[name]})
            if not pieces:
                continue
            units = np.concatenate([p["unit"] for p in pieces])
            order = np.argsort(units, kind="stable")
            g = out.create_group(name)
            for key in pieces[0]:
                g.create_dataset(key, data=np.concatenate([p[key] for p in pieces])[order])

    write_hdf5(target, build)


def layer_summaries(results, names, settings) -> dict:
    return score_summaries(results, names, settings.seed, settings.n_boot)


def score_rows(results, alpha: float | None, alpha_source: str) -> list[dict]:
    """mis.csv's rows (MIS_COLUMNS) of scored units; constant units have None scores and 0 tasks."""
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        rows.append(dict(zip(MIS_COLUMNS, [
            r["layer"], r["unit"], r["status"],
            r["mis"] if ok else None, r["mis_confidence"] if ok else None,
            r["mis_ci"][0] if ok else None, r["mis_ci"][1] if ok else None,
            r["conf_ci"][0] if ok else None, r["conf_ci"][1] if ok else None,
            r["n_tasks"] if ok else 0, None if alpha is None else float(alpha), alpha_source])))
    return rows


def write_scores_csv(out, results, alpha: float | None, alpha_source: str) -> None:
    def fmt(v):
        return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)

    with atomic_path(out) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MIS_COLUMNS)
        for row in score_rows(results, alpha, alpha_source):
            writer.writerow([fmt(row[c]) for c in MIS_COLUMNS])


def write_tasks(path, results, names, settings: ScoreSettings, meta: dict) -> None:
    T, K = settings.tasks, settings.explanations
    def build(h5):
        h5.attrs["schema"] = "misbench-tasks"
        h5.attrs["settings"] = json.dumps(meta["settings"])
        h5.attrs["acts"], h5.attrs["acts_sha256"] = meta["acts"], meta["acts_sha256"]
        h5.attrs["run_key"] = meta["run_key"]
        for name in names:
            mine = [r for r in results if r["layer"] == name]
            if not mine:
                continue
            g = h5.create_group(name)
            U = len(mine)
            arrays = {"pos_expl": np.full((U, T, K), -1, np.int64), "neg_expl": np.full((U, T, K), -1, np.int64),
                      "pos_query": np.full((U, T), -1, np.int64), "neg_query": np.full((U, T), -1, np.int64),
                      "delta": np.full((U, T), np.nan)}
            for k, r in enumerate(mine):
                if r["tasks"] is not None:
                    for key in ("pos_expl", "neg_expl", "pos_query", "neg_query"):
                        arrays[key][k] = getattr(r["tasks"], key)
                    arrays["delta"][k] = r["deltas"]
            for key, value in arrays.items():
                g.create_dataset(key, data=value)
            g.create_dataset("unit", data=np.array([r["unit"] for r in mine], np.int64))

    write_hdf5(path, build)


def run_key(command: str, inputs, settings: dict, out, tasks_out) -> str:
    """Identifies one command's outputs: a tasks.h5 or mis.json that carries it and has no mis.csv beside it
    is what a killed run of the same command left (a rerun replaces it); anything else is another run's."""
    text = json.dumps({"command": command, "inputs": [str(Path(p).resolve()) for p in inputs], "settings": settings,
                       "out": str(Path(out).resolve()) if out else "",
                       "tasks_out": str(Path(tasks_out).resolve()) if tasks_out else ""}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _stored_key(path: Path) -> str | None:
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text()).get("run_key")
        with h5py.File(path, "r") as h5:
            return h5.attrs.get("run_key")
    except (OSError, ValueError, AttributeError):
        return None


def refuse_foreign_outputs(out, tasks_out, key: str, overwrite: bool) -> None:
    """--out must not exist; mis.json (beside it) and --tasks-out may only be this command's killed leftovers."""
    if overwrite:
        return
    refuse_existing({"out": out}, overwrite)
    for name, path in (("out", Path(out).with_suffix(".json") if out else None), ("tasks_out", tasks_out)):
        if path and Path(path).exists() and _stored_key(Path(path)) != key:
            raise MisbenchError(f"{option_label(name)}: {path} already exists and is not what a killed run of this "
                                f"same command left; {overwrite_hint()} to replace it, or choose another path")

"""The score run's files: mis.csv (its columns and rows), tasks.h5, and the merge of shard parts into them."""

__all__ = ["read_meta", "write_scores", "read_scores", "score_settings", "load_scores", "scores_frame",
           "SCORE_DTYPES", "REQUIRED_COLUMNS", "MIS_COLUMNS", "score_columns", "stored_value", "shard_path", "merge_scores",
           "layer_summaries", "score_rows", "write_scores_csv", "write_tasks", "read_tasks", "TASK_ARRAYS", "run_key",
           "refuse_foreign_outputs", "SCORED_STATUSES", "STATUSES"]

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from ..errors import MisbenchError
from ..runtime.fileio import (json_plain, option_label, overwrite_hint, read_csv_rows, refuse_existing, utc_now,
                              write_csv, write_hdf5, write_json)
from ..runtime.outputs import writing
from .mis import UnitScore, stored_value
from .settings import ScoreSettings
from .summaries import is_counted, score_summaries

log = logging.getLogger(__name__)

MIS_COLUMNS = ["layer", "unit", "status", "mis", "mis_confidence", "mis_ci_low", "mis_ci_high",
               "conf_ci_low", "conf_ci_high", "n_tasks", "density", "top_random", "bottom_random", "alpha", "alpha_source"]
SCORED_STATUSES = ("ok", "sparse")  # statuses with scores (a sparse unit's are written, but left out of means)
STATUSES = ("ok", "constant", "sparse")


def score_columns(settings: ScoreSettings) -> list[str]:
    """mis.csv's columns for a run: MIS_COLUMNS, then `ms` when the run computes the MonoSemanticity score."""
    return _columns(settings.metrics)


def _columns(metrics) -> list[str]:
    return MIS_COLUMNS + (["ms"] if "ms" in metrics else [])


def shard_path(out, shard: tuple[int, int]) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.part{shard[0]}of{shard[1]}{out.suffix}")


def _results_from_csv(path) -> list[UnitScore]:
    def num(v):
        return float(v) if v not in ("", None) else None

    def count(v):
        return int(v) if v not in ("", None) else None

    def count(v):
        return int(v) if v not in ("", None) else None

    return [UnitScore(row["layer"], int(row["unit"]), row["status"], mis=num(row["mis"]),
                      mis_confidence=num(row["mis_confidence"]), mis_ci=(num(row["mis_ci_low"]), num(row["mis_ci_high"])),
                      conf_ci=(num(row["conf_ci_low"]), num(row["conf_ci_high"])), n_tasks=int(row["n_tasks"]),
                      ms=num(row.get("ms", "")), density=num(row.get("density", "")),
                      top_random=count(row.get("top_random")), bottom_random=count(row.get("bottom_random")))
            for row in read_csv_rows(path)]


def merge_scores(parts, out, tasks_out=None, overwrite: bool = False, key: str | None = None) -> dict:
    """Merge `--shard I/N` outputs (mis.csv parts with their .json, and tasks files) into one result.

    `key`: the run key of a `score` under torchrun, whose own check already ran; its outputs carry that key, so
    a rerun of the same score command after a kill during the merge replaces them."""
    parts = [Path(p) for p in parts]
    metas = [read_meta(p) for p in parts]
    for p, meta in zip(parts, metas):
        if meta is None:
            raise MisbenchError(f"{p} has no {p.with_suffix('.json').name} beside it; merge needs both")
    inputs = {}
    for p, meta in zip(parts, metas):  # every file the merge reads: the parts, their mis.json and tasks files
        inputs.update({f"PART {p}": p, f"{p}'s mis.json": p.with_suffix(".json"),
                       f"{p}'s tasks file": meta.get("tasks_out") if tasks_out else None})
    outputs = {"--out": out, "mis.json (beside --out)": Path(out).with_suffix(".json"), "--tasks-out": tasks_out}
    with writing(outputs, inputs, "misbench merge-scores"):
        return _merge(parts, metas, out, tasks_out, overwrite, key)


def _check_shard_units(parts, rows: list, names: list, n: int, metas: list) -> None:
    """Each part holds exactly its shard's units (unit position % N == I, positions counted over the layers in
    order, as score --shard assigns them) and the parts together every unit once: a part's mis.csv copied
    over another's is refused, not merged twice; a part's rows per layer are the units its mis.json counted (a
    mis.csv cut short loses a layer's last units without a gap)."""
    units = {name: sorted(r.unit for part in rows for r in part if r.layer == name) for name in names}
    offsets, position = {}, 0
    for name in names:
        if units[name] != list(range(len(units[name]))):
            seen = [u for u in units[name] if units[name].count(u) > 1]
            what = f"unit {seen[0]} twice" if seen else "a gap in its units"
            raise MisbenchError(f"the parts hold {what} of layer {name}: each unit must come from exactly one "
                                "shard's mis.csv (a part copied over another?); rerun the shards' score commands")
        offsets[name], position = position, position + len(units[name])
    for p, part, meta in zip(parts, rows, metas):
        keep_sparse = bool(meta.get("settings", {}).get("keep_sparse", False))
        for name, layer in (meta.get("layers") or {}).items():
            counted = layer.get("n_units", 0) + layer.get("n_constant", 0) + (0 if keep_sparse else layer.get("n_sparse", 0))
            found = sum(1 for r in part if r.layer == name)
            if found != counted:
                raise MisbenchError(f"{p} holds {found} unit(s) of layer {name}, its mis.json counted {counted}: the "
                                    "part's mis.csv is damaged or cut short; rerun its score command")
    for p, part, i in zip(parts, rows, range(n)):
        for r in part:
            if (offsets[r.layer] + r.unit) % n != i:
                raise MisbenchError(f"{p} holds unit {r.layer}:{r.unit}, which belongs to shard "
                                    f"{(offsets[r.layer] + r.unit) % n}/{n}, not to its own shard {i}/{n} "
                                    "(its mis.json's): the part's mis.csv is another shard's; rerun its score command")


def _merge(parts, metas, out, tasks_out, overwrite: bool, key) -> dict:
    if key is None:
        key = run_key("merge-scores", parts, {}, out, tasks_out)
        refuse_foreign_outputs(out, tasks_out, key, overwrite)
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
    order = sorted(range(len(parts)), key=lambda j: int(metas[j]["shard"].split("/")[0]))
    per_part = [_results_from_csv(parts[j]) for j in order]
    unknown = [(parts[j], r.layer) for j, part in zip(order, per_part) for r in part if r.layer not in names]
    if unknown:
        raise MisbenchError(f"{unknown[0][0]} holds layer {unknown[0][1]}, which its mis.json does not list")
    _check_shard_units([parts[j] for j in order], per_part, names, n, [metas[j] for j in order])
    results = [r for part in per_part for r in part]
    results.sort(key=lambda r: (names.index(r.layer), r.unit))
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
    write_scores(out, None, results, names, settings, meta)
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


def layer_summaries(results: list[UnitScore], names, settings: ScoreSettings) -> dict:
    summary = score_summaries(score_rows(results, settings.alpha, settings.alpha_source), names, settings.seed,
                              settings.n_boot, settings.keep_sparse)
    if "ms" in settings.metrics:  # the mean MonoSemanticity score over the units the MIS means count
        for name, layer in summary["layers"].items():
            values = [r.ms for r in results if r.layer == name and is_counted(r.status, settings.keep_sparse)
                      and r.ms is not None]
            layer["ms"] = float(np.mean(values)) if values else None
    return summary


def score_rows(results: list[UnitScore], alpha: float | None, alpha_source: str, metrics=("mis",)) -> list[dict]:
    """mis.csv's rows (MIS_COLUMNS, then `ms` among `metrics`) of scored units, with the run's alpha (a score
    run's resolved settings'; None for imported scores); constant units have None scores and 0 tasks; density and
    the tie counts are None where unknown (imported scores)."""
    alpha = None if alpha is None else float(alpha)
    rows = []
    for r in results:
        ok = r.status in SCORED_STATUSES
        rows.append(dict(zip(MIS_COLUMNS, [
            r.layer, r.unit, r.status,
            r.mis if ok else None, r.mis_confidence if ok else None,
            r.mis_ci[0] if ok else None, r.mis_ci[1] if ok else None,
            r.conf_ci[0] if ok else None, r.conf_ci[1] if ok else None,
            r.n_tasks if ok else 0, r.density, r.top_random, r.bottom_random, alpha, alpha_source])))
        if "ms" in metrics:
            rows[-1]["ms"] = r.ms
    return rows


def write_scores_csv(out, results: list[UnitScore], alpha: float | None, alpha_source: str,
                     metrics=("mis",)) -> None:
    write_csv(out, score_rows(results, alpha, alpha_source, metrics), _columns(metrics))


TASK_ARRAYS = ("pos_expl", "neg_expl", "pos_query", "neg_query", "delta")  # per layer in tasks.h5, beside "unit"


def read_tasks(path, layers=None) -> dict[str, dict[str, np.ndarray]]:
    """tasks.h5 (`score --tasks-out`, written by write_tasks) as {layer: {"unit": [U], "pos_expl", "neg_expl":
    [U, T, K], "pos_query", "neg_query": [U, T], "delta": [U, T]}} for `layers` (default: every layer in it);
    a constant unit's rows are -1 and its deltas NaN. The one reader of the format."""
    with h5py.File(path, "r") as h5:
        names = list(h5) if layers is None else list(layers)
        missing = [name for name in names if name not in h5]
        if missing:
            raise MisbenchError(f"{path} has no tasks for layer {missing[0]!r} (layers in it: {', '.join(h5)})")
        return {name: {key: h5[name][key][...] for key in ("unit", *TASK_ARRAYS)} for name in names}


def write_tasks(path, results: list[UnitScore], names, settings: ScoreSettings, meta: dict) -> None:
    T, K = settings.tasks, settings.explanations
    def build(h5):
        h5.attrs["schema"] = "misbench-tasks"
        h5.attrs["settings"] = json.dumps(meta["settings"])
        h5.attrs["acts"], h5.attrs["acts_sha256"] = meta["acts"], meta["acts_sha256"]
        h5.attrs["run_key"] = meta["run_key"]
        for name in names:
            mine = [r for r in results if r.layer == name]
            if not mine:
                continue
            g = h5.create_group(name)
            U = len(mine)
            arrays = {"pos_expl": np.full((U, T, K), -1, np.int64), "neg_expl": np.full((U, T, K), -1, np.int64),
                      "pos_query": np.full((U, T), -1, np.int64), "neg_query": np.full((U, T), -1, np.int64),
                      "delta": np.full((U, T), np.nan)}
            for k, r in enumerate(mine):
                if r.tasks is not None:
                    for key in ("pos_expl", "neg_expl", "pos_query", "neg_query"):
                        arrays[key][k] = getattr(r.tasks, key)
                    arrays["delta"][k] = r.deltas
            for key, value in arrays.items():
                g.create_dataset(key, data=value)
            g.create_dataset("unit", data=np.array([r.unit for r in mine], np.int64))

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


# what the reports read of a mis.csv (imported and older files have at least these)
REPORT_COLUMNS = {"layer", "unit", "status", "mis", "mis_confidence"}


def _num(value):
    return float(value) if value not in ("", None) else float("nan")


def read_scores(path) -> list[dict]:
    """mis.csv rows with numbers parsed; constant units keep NaN scores."""
    rows = read_csv_rows(path)
    if rows and not REPORT_COLUMNS <= set(rows[0]):
        raise MisbenchError(f"{path} is not a mis.csv: needs columns {sorted(REPORT_COLUMNS)}, has {sorted(rows[0])}")
    return [{**r, "unit": int(r["unit"]), "mis": _num(r["mis"]), "mis_confidence": _num(r["mis_confidence"])}
            for r in rows]


def read_meta(scores_csv) -> dict | None:
    """The mis.json beside a mis.csv (settings, summaries, provenance), or None when there is none."""
    sidecar = Path(scores_csv).with_suffix(".json")
    return json.loads(sidecar.read_text()) if sidecar.exists() else None


def write_scores(out, tasks_out, results: list[UnitScore], names, settings: ScoreSettings, meta: dict) -> None:
    """Write a score run's files in the order that keeps them consistent: the tasks, then mis.json, then
    mis.csv (a mis.csv never appears without what it refers to). `out` None: only the tasks, if asked.
    `settings` are resolved (ScoreSettings.resolved): their alpha is the run's."""
    if tasks_out:
        write_tasks(tasks_out, results, names, settings, meta)
    if out is not None:
        write_json(Path(out).with_suffix(".json"), meta)
        write_scores_csv(out, results, settings.alpha, settings.alpha_source, settings.metrics)


def score_settings(path) -> dict:
    """The seed, bootstrap count and sparse policy a mis.csv was summarised with (its mis.json), so that every
    report recomputes the same intervals and counts the same units as mis.json; defaults without a sidecar."""
    settings = (read_meta(path) or {}).get("settings", {})
    return {"seed": int(settings.get("seed", 0)), "n_boot": int(settings.get("n_boot", 1000)),
            "keep_sparse": bool(settings.get("keep_sparse", False))}


# mis.csv's dtypes, whether the rows come from memory or from the file
SCORE_DTYPES = {"layer": str, "unit": "int64", "status": str, "mis": "float64", "mis_confidence": "float64",
                "mis_ci_low": "float64", "mis_ci_high": "float64", "conf_ci_low": "float64", "conf_ci_high": "float64",
                "n_tasks": "int64", "density": "float64", "top_random": "Int64", "bottom_random": "Int64",
                "alpha": "float64", "alpha_source": str, "ms": "float64"}


# the columns DESIGN §8 names; alpha and alpha_source came later (older files lack them)
REQUIRED_COLUMNS = MIS_COLUMNS[:MIS_COLUMNS.index("n_tasks") + 1]


def load_scores(path) -> pd.DataFrame:
    """mis.csv as a DataFrame; the settings, means and provenance of mis.json beside it in `df.attrs`."""
    path = Path(path)
    if not path.exists():
        raise MisbenchError(f"scores file {path} does not exist")
    if path.is_dir():
        found = "; it holds mis.csv" if (path / "mis.csv").is_file() else ""
        raise MisbenchError(f"scores file {path} is a folder{found}: give the mis.csv file (score --out)")
    # an empty cell is a missing number (constant units), but an empty string stays one
    text = [c for c, t in SCORE_DTYPES.items() if t is str]
    try:
        df = pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                         na_values={c: [""] for c in SCORE_DTYPES if c not in text})
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise MisbenchError(f"{path} is not a mis.csv (a CSV text file with columns {','.join(MIS_COLUMNS)}): "
                            f"{str(err).splitlines()[0]}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise MisbenchError(f"{path} is not a mis.csv: columns {', '.join(missing)} are missing "
                            f"(expected {','.join(MIS_COLUMNS)})")
    _check_scores(df, path)
    df = df.astype({c: t for c, t in SCORE_DTYPES.items() if c in df.columns})
    meta = read_meta(path)
    if meta is not None:
        df.attrs.update(meta)
    else:
        log.warning("%s has no %s beside it: its settings and means are unknown (df.attrs is empty)", path,
                    path.with_suffix(".json").name)
    return df


def _check_scores(df: pd.DataFrame, path) -> None:
    """What a mis.csv can hold (DESIGN §8): one row per (layer, unit), unit a non-negative integer, status ok or
    sparse (with a MIS) or constant (without), fractions in [0, 1]."""
    def bad(row: int, what: str):
        raise MisbenchError(f"{path} row {row + 2}: {what}; a mis.csv comes from misbench score, merge-scores or "
                            "import-scores (fix or regenerate the file)")

    numbers = {}
    for column in ("unit", "mis", "mis_confidence", "mis_ci_low", "mis_ci_high", "conf_ci_low", "conf_ci_high",
                   "n_tasks"):
        values = pd.to_numeric(df[column], errors="coerce")
        wrong = values.isna() & df[column].notna()
        if wrong.any():
            i = int(wrong.to_numpy().nonzero()[0][0])
            bad(i, f"{column} {df[column].iloc[i]!r} is not a number")
        numbers[column] = values.to_numpy(dtype=float)
    unit = numbers["unit"]
    wrong = ~((unit >= 0) & (unit == np.floor(unit)))
    if wrong.any():
        i = int(wrong.nonzero()[0][0])
        bad(i, f"unit {unit[i]:g} is not a non-negative integer (a channel or class index)")
    for column in ("density", "top_random", "bottom_random"):
        if column in df.columns:
            values = pd.to_numeric(df[column], errors="coerce")
            wrong = (values.isna() & df[column].notna()) | (values < 0)
            if wrong.any():
                i = int(wrong.to_numpy().nonzero()[0][0])
                bad(i, f"{column} {df[column].iloc[i]!r} is not a non-negative number")
            numbers[column] = values.to_numpy(dtype=float)
    for column in ("mis", "mis_confidence", "mis_ci_low", "mis_ci_high", "conf_ci_low", "conf_ci_high", "density"):
        if column not in numbers:
            continue
        wrong = (numbers[column] < 0) | (numbers[column] > 1)
        if wrong.any():
            i = int(wrong.nonzero()[0][0])
            bad(i, f"{column} {numbers[column][i]:g} is outside [0, 1] (MIS values are fractions of tasks)")
    status = df["status"].to_numpy()
    wrong = ~np.isin(status, STATUSES)
    if wrong.any():
        i = int(wrong.nonzero()[0][0])
        bad(i, f"status {status[i]!r} is not one of {', '.join(STATUSES)}")
    has_mis = ~np.isnan(numbers["mis"])
    wrong = np.isin(status, SCORED_STATUSES) != has_mis
    if wrong.any():
        i = int(wrong.nonzero()[0][0])
        bad(i, f"status {status[i]} needs a mis value" if status[i] in SCORED_STATUSES else
            "a constant unit has no mis value")
    twice = df.duplicated(["layer", "unit"])
    if twice.any():
        i = int(twice.to_numpy().nonzero()[0][0])
        bad(i, f"unit {df['layer'].iloc[i]}:{int(unit[i])} appears twice")


def scores_frame(rows: list[dict], attrs: dict) -> pd.DataFrame:
    """mis.csv's rows held in memory as load_scores would read them back: same columns, dtypes and attrs."""
    columns = MIS_COLUMNS + (["ms"] if rows and "ms" in rows[0] else [])
    df = pd.DataFrame(rows, columns=columns).astype({c: SCORE_DTYPES[c] for c in columns})
    df.attrs.update(json_plain(attrs))
    return df

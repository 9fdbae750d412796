"""Score every unit of an activation file with MIS (DESIGN §8): tasks, embeddings, decisions."""

__all__ = ["ScoreSettings", "score", "parse_shard", "MIS_COLUMNS", "embed_rows", "score_rows", "write_scores_csv",
           "merge_scores", "shard_path"]

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from . import __version__, distributed
from .device import describe, make_loader, precision, prepare_model, resolve_device, to_device
from .errors import MisbenchError
from .fileio import atomic_path, refuse_same_paths, sha256_file, utc_now, write_hdf5, write_json
from .images import VIEWS, RowImages
from .mis import CONSTANT_RANGE, SELECTIONS, Tasks, confidences, decisions, task_deltas, tie_keys, unit_rng
from .summaries import bootstrap_mean_ci, clopper_pearson, score_summaries
from .similarity import EmbeddingIndex, build_backend
from .similarity.cache import EmbeddingCache
from .store import open_activations
from .topk import check_tie_order

log = logging.getLogger(__name__)

MIS_COLUMNS = ["layer", "unit", "status", "mis", "mis_confidence", "mis_ci_low", "mis_ci_high",
               "conf_ci_low", "conf_ci_high", "n_tasks", "alpha", "alpha_source"]
ENGINES = ("embed", "pairwise")


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    similarity: str = "lpips-alex"
    image_size: int | None = None  # None: the backend's own size (64; DreamSim 224)
    view: str = "model"  # what the similarity sees: the model's crop, or the raw image file (images.VIEWS)
    selection: str = "fair"
    quantile: float = 0.2
    tasks: int = 20
    explanations: int = 9
    alpha: float | None = None  # None: the backend's documented default
    alpha_source: str = ""  # "" -> "default" (alpha None) or "user"; "calibrated:<sha256>" from a calibration file
    seed: int = 0
    engine: str = "embed"
    n_boot: int = 1000
    amp: bool = False  # autocast the embedding network (LPIPS is exact only in float32)
    chunk_units: int = 256  # units whose images are embedded together (bounds memory)
    # how, not what
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # None: auto (see loader_workers)
    dreamsim_weights: str | None = None  # a local directory; the weights' identity is in the backend fingerprint

    RUNTIME = ("device", "batch_size", "workers", "chunk_units", "dreamsim_weights")

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise MisbenchError(f"--selection {self.selection!r}: expected one of {list(SELECTIONS)}")
        if self.engine not in ENGINES:
            raise MisbenchError(f"--engine {self.engine!r}: expected one of {ENGINES}")
        if self.tasks < 1 or self.explanations < 1:
            raise MisbenchError("--tasks and --explanations must be positive")
        if self.chunk_units < 1:
            raise MisbenchError(f"--chunk-units must be positive, got {self.chunk_units}")
        if self.alpha is not None and not (np.isfinite(self.alpha) and self.alpha > 0):
            raise MisbenchError(f"--alpha {self.alpha}: expected a finite positive sigmoid slope "
                                "(leave it out for the backend's default, or fit one with misbench calibrate)")
        if self.alpha_source not in ("", "default", "user") and not self.alpha_source.startswith("calibrated:"):
            raise MisbenchError(f"alpha_source {self.alpha_source!r}: expected default, user or calibrated:<sha256>")
        if self.view not in VIEWS:
            raise MisbenchError(f"--view {self.view!r}: expected one of {VIEWS}")
        if self.image_size is not None and self.image_size < 16:
            raise MisbenchError(f"--image-size must be at least 16 pixels, got {self.image_size}")
        if self.n_boot < 0:
            raise MisbenchError(f"--bootstrap must be >= 0 resamples, got {self.n_boot}")
        if self.batch_size < 1:
            raise MisbenchError(f"--batch-size must be positive, got {self.batch_size}")


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise MisbenchError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise MisbenchError(f"--shard {text!r}: expected I/N with 0 <= I < N")
    return i, n


def _round(x: float) -> float:
    """The value as mis.csv stores it, so summaries recomputed from CSVs (merged shards) are identical."""
    return float(f"{x:.6g}")


def shard_path(out, shard: tuple[int, int]) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.part{shard[0]}of{shard[1]}{out.suffix}")


def _needed_per_side(settings: ScoreSettings, n_rows: int) -> int:
    """How many ranks per side a selection reads."""
    if settings.selection == "fair":
        return (settings.explanations + 1) * settings.tasks
    return int(np.ceil(settings.quantile * n_rows))


def _select(settings: ScoreSettings, values: np.ndarray, rows: np.ndarray, items: np.ndarray, n_rows: int, layer: str,
            unit: int) -> Tasks:
    keys = tie_keys(settings.seed, layer, unit, items)
    rng = unit_rng(settings.seed, layer, unit, 0)
    if settings.selection == "fair":
        return SELECTIONS["fair"](values, rows, keys, n_rows, rng, settings.tasks, settings.explanations)
    return SELECTIONS["quantile"](values, rows, keys, n_rows, rng, settings.tasks, settings.explanations,
                                  settings.quantile)


def embed_rows(backend, images: RowImages, device, batch_size: int, workers: int | None = None, cache: EmbeddingCache | None = None,
               progress=None, amp: bool = False) -> EmbeddingIndex:
    """Embed each needed row once (cached rows are read back) into a FAISS index."""
    rows = images.rows
    keys = images.dataset_index(rows)
    hit, cached = cache.lookup(keys) if cache else (np.zeros(len(rows), bool), None)
    todo = np.flatnonzero(~hit)
    chunks, done = [], 0
    if len(todo):
        subset = torch.utils.data.Subset(images, todo.tolist())
        loader = make_loader(subset, batch_size, workers, device)
        for x, _rows in loader:
            with precision(device, amp):
                chunks.append(backend.embed(to_device(x, device)).float().cpu().numpy())
            done += len(x)
            if progress:
                progress(done, len(todo))
    new = np.concatenate(chunks) if chunks else None
    if cache is not None and new is not None:
        cache.add(keys[todo], new)
    dim = (new if new is not None else cached).shape[1]
    emb = np.empty((len(rows), dim), dtype=np.float32)
    if new is not None:
        emb[todo] = new
    if cached is not None:
        emb[hit] = cached
    log.info("embedded %d images (%d from cache), %d dims", len(rows), int(hit.sum()), dim)
    gpu = None
    if device.type == "cuda":
        gpu = torch.cuda.current_device() if device.index is None else device.index
    return EmbeddingIndex(rows, emb, gpu=gpu)


class _PairwiseDistances:
    """The reference path: the backend's metric called on every (query, explanation) pair."""

    def __init__(self, backend, images: RowImages, device, batch_size: int):
        self.backend, self.device, self.batch_size = backend, device, batch_size
        self.images = {int(images.rows[k]): images[k][0] for k in range(len(images))}

    def distances(self, query_rows, target_rows):
        pairs = [(int(q), int(t)) for q, ts in zip(query_rows, target_rows) for t in ts]
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            x = to_device(torch.stack([self.images[q] for q, _ in chunk]), self.device)
            y = to_device(torch.stack([self.images[t] for _, t in chunk]), self.device)
            with precision(self.device, amp=False):
                out.append(self.backend.pair_distance(x, y).float().cpu().numpy())
        return np.concatenate(out).reshape(np.shape(target_rows))


def _unit_deltas(engine, tasks: Tasks, n_expl: int) -> np.ndarray:
    targets = np.concatenate([tasks.pos_expl, tasks.neg_expl], axis=1)  # [T, 2K]
    d_pos = engine.distances(tasks.pos_query, targets)
    d_neg = engine.distances(tasks.neg_query, targets)
    return task_deltas(d_pos, d_neg, n_expl)


def score(acts_path, layers, settings: ScoreSettings, out=None, tasks_out=None, cache_dir=None, shard=(0, 1),
          backend=None, progress=None) -> dict:
    """Score the units of `layers` ('all' for every layer); write mis.csv, mis.json (when `out` is given), tasks.h5.

    Returns mis.json's content plus `rows`, mis.csv's rows (one process; not in mis.json).
    Under torchrun (and no explicit shard) each rank scores every N-th unit into a part; rank 0
    merges the parts into the outputs of a one-process run.
    """
    refuse_same_paths({"ACTS": acts_path}, {"--out": out, "--tasks-out": tasks_out,
                                            "mis.json (beside --out)": Path(out).with_suffix(".json") if out else None})
    rank, size = distributed.world()
    if size > 1 and tuple(shard) == (0, 1):
        if out is None:
            raise MisbenchError("scoring under torchrun merges the ranks' parts through files: give an output path")
        distributed.ensure_initialized(resolve_device(settings.device))
        part = shard_path(out, (rank, size))
        part_tasks = shard_path(tasks_out, (rank, size)) if tasks_out else None
        score(acts_path, layers, settings, part, part_tasks, cache_dir, (rank, size), backend, progress)
        distributed.barrier()
        meta = None
        if rank == 0:
            parts = [shard_path(out, (r, size)) for r in range(size)]
            meta = merge_scores(parts, out, tasks_out)
            for path in parts:
                for extra in (path, path.with_suffix(".json")):
                    extra.unlink()
            if tasks_out:
                for r in range(size):
                    shard_path(tasks_out, (r, size)).unlink()
        distributed.barrier()
        return meta
    t0 = time.time()
    acts = open_activations(acts_path)
    with acts:
        names = acts.layer_names if list(layers) in (["all"], []) else list(dict.fromkeys(layers))
        for name in names:
            acts.layer(name)  # validates before any work
        shard_i, shard_n = shard
        device = resolve_device(settings.device)
        if backend is None:
            options = {"image_size": settings.image_size} if settings.image_size else {}
            if settings.similarity == "dreamsim":
                options["weights"] = settings.dreamsim_weights
            backend = build_backend(settings.similarity, **options)
        if settings.image_size is None:
            settings = dataclasses.replace(settings, image_size=backend.image_size)
        backend = prepare_model(backend, device).eval()
        log.info("scoring with %s on %s", backend.name, describe(device, settings.workers, settings.amp))
        alpha = settings.alpha if settings.alpha is not None else backend.default_alpha
        alpha_source = settings.alpha_source or ("default" if settings.alpha is None else "user")
        fingerprint = backend.fingerprint()

        results, position = [], 0
        dataset_index = acts.index
        for name in names:
            tie_seed = acts.tie_seed(name)
            if tie_seed is not None:
                check_tie_order(*acts.kept_values(name), _needed_per_side(settings, acts.n_rows), acts.n_rows, tie_seed,
                                settings.seed, name, acts_path)
            for unit, values, rows in acts.unit_candidates(name):
                mine = position % shard_n == shard_i
                position += 1
                if not mine:
                    continue
                if np.max(values) - np.min(values) < CONSTANT_RANGE:
                    results.append({"layer": name, "unit": unit, "status": "constant", "tasks": None})
                else:
                    results.append({"layer": name, "unit": unit, "status": "ok",
                                    "tasks": _select(settings, values, rows, dataset_index[rows], acts.n_rows, name,
                                                     unit)})
        acts_sha = sha256_file(acts_path)
        scored = [r for r in results if r["tasks"] is not None]
        cache, t_embed, done = None, 0.0, 0
        all_images = RowImages(acts, np.zeros(0, np.int64), settings.image_size, settings.view,
                               backend.resample)  # the dataset, opened once
        # units in chunks: memory holds the embeddings of one chunk's images, never the dataset's
        for first in range(0, len(scored), settings.chunk_units):
            chunk = scored[first:first + settings.chunk_units]
            needed = np.unique(np.concatenate([np.concatenate([r["tasks"].pos_expl.ravel(), r["tasks"].neg_expl.ravel(),
                                                               r["tasks"].pos_query, r["tasks"].neg_query])
                                               for r in chunk]))
            images = all_images.with_rows(needed)
            t1 = time.time()
            if settings.engine == "embed":
                if cache_dir and cache is None:
                    cache = EmbeddingCache(cache_dir, fingerprint, settings.image_size, images.identity)
                engine = embed_rows(backend, images, device, settings.batch_size, settings.workers, cache,
                                    progress=(lambda d, n: progress("embed", d, n)) if progress else None,
                                    amp=settings.amp)
            else:
                engine = _PairwiseDistances(backend, images, device, settings.batch_size)
            t_embed += time.time() - t1
            for r in chunk:
                deltas = _unit_deltas(engine, r["tasks"], settings.explanations)
                correct, conf = decisions(deltas), confidences(deltas, alpha)
                rng = unit_rng(settings.seed, r["layer"], r["unit"], 1)
                r.update(deltas=deltas, n_tasks=len(deltas), mis=_round(correct.mean()),
                         mis_confidence=_round(conf.mean()),
                         mis_ci=tuple(map(_round, clopper_pearson(correct.sum(), len(correct)))),
                         conf_ci=tuple(map(_round, bootstrap_mean_ci(conf, rng, settings.n_boot))))
                done += 1
                if progress:
                    progress("score", done, len(scored))
            del engine

        meta = {"misbench_version": __version__, "created_utc": utc_now(), "acts": str(acts_path),
                "acts_sha256": acts_sha, "model": str(acts.attrs.get("model", "")),
                "checkpoint_sha256": str(acts.attrs.get("checkpoint_sha256", "")),
                "data": str(acts.attrs.get("data", "")), "n_rows": acts.n_rows,
                "settings": {**dataclasses.asdict(settings), "alpha": alpha, "alpha_source": alpha_source,
                             "backend_fingerprint": fingerprint, "resample": backend.resample},
                "alpha": alpha, "alpha_source": alpha_source,
                "shard": f"{shard_i}/{shard_n}", "layer_order": names, "tasks_out": str(tasks_out or "")}
    summary = _summaries(results, names, settings)
    meta.update(summary, timing={"embed_s": round(t_embed, 3), "total_s": round(time.time() - t0, 3)})
    if out is not None:
        # the tasks, then mis.json, then mis.csv: a mis.csv never appears without what it refers to
        if tasks_out:
            _write_tasks(tasks_out, results, names, settings, meta)
        write_json(Path(out).with_suffix(".json"), meta)
        write_scores_csv(out, results, alpha, alpha_source)
    elif tasks_out:
        _write_tasks(tasks_out, results, names, settings, meta)
    return {**meta, "rows": score_rows(results, alpha, alpha_source)}


def _results_from_csv(path) -> list[dict]:
    from .reports.tables import read_csv_rows

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


def merge_scores(parts, out, tasks_out=None) -> dict:
    """Merge `--shard I/N` outputs (mis.csv parts with their .json, and tasks files) into one result."""
    parts = [Path(p) for p in parts]
    refuse_same_paths({f"PART {p}": p for p in parts}, {"--out": out, "mis.json (beside --out)": Path(out).with_suffix(".json"),
                                                       "--tasks-out": tasks_out})
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
    meta = {**first, "shard": f"merged {n}", "created_utc": utc_now(),
            "timing": {"total_s": round(sum(m["timing"]["total_s"] for m in metas), 3)}}
    meta.update(_summaries(results, names, settings))
    if tasks_out:
        _merge_tasks([m["tasks_out"] for m in metas], tasks_out, names)
    write_json(Path(out).with_suffix(".json"), meta)
    write_scores_csv(out, results, first["settings"]["alpha"], first["settings"]["alpha_source"])
    return meta


def _merge_tasks(paths, target, names) -> None:
    def build(out):
        with h5py.File(paths[0], "r") as first:
            for key, value in first.attrs.items():
                out.attrs[key] = value
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


def _summaries(results, names, settings) -> dict:
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


def _write_tasks(path, results, names, settings: ScoreSettings, meta: dict) -> None:
    T, K = settings.tasks, settings.explanations
    def build(h5):
        h5.attrs["schema"] = "misbench-tasks"
        h5.attrs["settings"] = json.dumps(meta["settings"])
        h5.attrs["acts"], h5.attrs["acts_sha256"] = meta["acts"], meta["acts_sha256"]
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

"""Score every unit of an activation file with MIS (DESIGN §8): tasks, embeddings, decisions."""

__all__ = ["ScoreSettings", "score", "parse_shard", "MIS_COLUMNS", "embed_rows", "score_rows", "write_scores_csv",
           "merge_scores", "shard_path", "embed_missing", "chunk_memory"]

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..activations.store import open_activations
from ..activations.topk import check_tie_order
from ..datasets.images import RowImages
from ..errors import MisbenchError
from ..runtime import distributed
from ..runtime.device import describe, make_loader, precision, prepare_model, resolve_device, to_device
from ..runtime.fileio import sha256_file, temp_dir_beside, utc_now
from ..runtime.outputs import writing
from ..similarity import EmbeddingIndex, build_backend
from ..similarity.cache import EmbeddingCache
from ..similarity.index import build_distances, resolve_distances
from ..version import __version__
from .mis import (SELECTIONS, Tasks, confidences, decisions, is_constant, non_finite_rows, task_deltas, tie_keys,
                  unit_rng)
from .results import (MIS_COLUMNS, layer_summaries, merge_scores, refuse_foreign_outputs, run_key, score_rows,
                      shard_path, stored_value, write_scores, write_scores_csv)
from .settings import ScoreSettings, parse_shard
from .summaries import bootstrap_mean_ci, clopper_pearson

log = logging.getLogger(__name__)

STORE_PART_BYTES = 64 << 20  # embeddings written to the store per part while embedding (bounds the copy)
RESIDENT_FACTOR = 1.5  # all images stay in memory when they are at most this many times a chunk's


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


def embed_missing(backend, images: RowImages, keys, store: EmbeddingCache | None, device, batch_size: int,
                  workers: int | None = None, progress=None, amp: bool = False) -> tuple[np.ndarray, int]:
    """Embeddings of `images.rows` in order: what `store` holds under `keys` is read back, the rest
    is embedded and added to it part by part. Returns (embeddings, number of images embedded)."""
    rows = images.rows
    hit, emb = store.lookup(keys) if store is not None else (np.zeros(len(rows), bool), None)
    if emb is not None and not hit.all():
        cached, emb = emb, np.empty((len(rows), emb.shape[1]), np.float32)
        emb[hit] = cached
        del cached
    todo = np.flatnonzero(~hit)
    done, pending = 0, 0  # pending: embedded rows not yet in the store
    if len(todo):
        subset = torch.utils.data.Subset(images, todo.tolist())
        loader = make_loader(subset, batch_size, workers, device)
        for x, _rows in loader:
            with precision(device, amp):
                batch = backend.embed(to_device(x, device)).float().cpu().numpy()
            if not np.isfinite(batch).all():
                row = int(rows[todo[done + int(np.flatnonzero(~np.isfinite(batch).all(1))[0])]])
                raise MisbenchError(f"the similarity backend {backend.name} gave a non-finite embedding (NaN or inf) "
                                    f"for row {row}: no score could be right; check the backend's weights file "
                                    "(misbench assets stage refreshes the ones it stages)")
            if emb is None:
                emb = np.empty((len(rows), batch.shape[1]), np.float32)
            emb[todo[done:done + len(batch)]] = batch
            done += len(batch)
            if store is not None and (done - pending) * batch.shape[1] * 4 >= STORE_PART_BYTES:
                store.add(np.asarray(keys)[todo[pending:done]], emb[todo[pending:done]])
                pending = done
            if progress:
                progress(done, len(todo))
        if store is not None and done > pending:
            store.add(np.asarray(keys)[todo[pending:done]], emb[todo[pending:done]])
    log.info("%d images: %d embedded, %d read back from the store, %d dims", len(rows), len(todo), int(hit.sum()),
             emb.shape[1])
    return emb, len(todo)


def embed_rows(backend, images: RowImages, device, batch_size: int, workers: int | None = None,
               cache: EmbeddingCache | None = None, progress=None, amp: bool = False) -> EmbeddingIndex:
    """Embed each needed row once (cached rows are read back) into a FAISS index."""
    keys = images.content_keys(images.rows) if cache is not None else None
    emb, _ = embed_missing(backend, images, keys, cache, device, batch_size, workers, progress, amp)
    return EmbeddingIndex(images.rows, emb)


class _PairwiseDistances:
    """The reference path: the backend's metric called on every (query, explanation) pair."""

    def __init__(self, backend, images: RowImages, device, batch_size: int):
        self.backend, self.device, self.batch_size = backend, device, batch_size
        self.forwarded = 0
        self.images = {int(images.rows[k]): images[k][0] for k in range(len(images))}

    def distances(self, query_rows, target_rows):
        pairs = [(int(q), int(t)) for q, ts in zip(query_rows, target_rows) for t in ts]
        self.forwarded += 2 * len(pairs)  # images through the metric: no embedding is shared
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            x = to_device(torch.stack([self.images[q] for q, _ in chunk]), self.device)
            y = to_device(torch.stack([self.images[t] for _, t in chunk]), self.device)
            with precision(self.device, amp=False):
                out.append(self.backend.pair_distance(x, y).float().cpu().numpy())
        return np.concatenate(out).reshape(np.shape(target_rows))


def _chunk_deltas(engine, chunk: list[dict], n_expl: int) -> list[np.ndarray]:
    """Task deltas of every unit of a chunk from one distance call (the engine blocks it as it needs)."""
    queries, targets = [], []
    for r in chunk:
        t = r["tasks"]
        both = np.concatenate([t.pos_expl, t.neg_expl], axis=1)  # [T, 2K]
        queries += [t.pos_query, t.neg_query]
        targets += [both, both]
    d = engine.distances(np.concatenate(queries), np.concatenate(targets))
    out, start = [], 0
    for r in chunk:
        T = len(r["tasks"].pos_query)
        out.append(task_deltas(d[start:start + T], d[start + T:start + 2 * T], n_expl))
        start += 2 * T
    return out


def _needed_rows(chunk: list[dict]) -> np.ndarray:
    return np.unique(np.concatenate([np.concatenate([r["tasks"].pos_expl.ravel(), r["tasks"].neg_expl.ravel(),
                                                     r["tasks"].pos_query, r["tasks"].neg_query]) for r in chunk]))


def _available_bytes(device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    try:
        with open("/proc/meminfo") as handle:
            info = dict(line.split(":", 1) for line in handle)
        return int(info["MemAvailable"].split()[0]) * 1024, "available (MemAvailable)"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available"


def chunk_memory(settings: ScoreSettings, largest: int, dim: int, device) -> tuple[int, int, str]:
    """(bytes the largest chunk needs, bytes available, where) -- embeddings held twice: the array
    read back from the store and the distance engine's copy (FAISS index or device tensor)."""
    need = 2 * largest * dim * 4 + settings.batch_size * dim * 4
    where = device if settings.engine == "embed" and resolve_distances(settings.distances, device) == "torch" \
        else torch.device("cpu")
    avail, how = _available_bytes(where)
    return need, avail, how


def _check_chunk_memory(settings: ScoreSettings, chunks: list[np.ndarray], dim: int, device) -> None:
    if not chunks:
        return
    largest = max(len(c) for c in chunks)
    need, avail, how = chunk_memory(settings, largest, dim, device)
    log.info("largest chunk: %d images x %d dims, about %.2f GiB (%.1f GiB %s)", largest, dim, need / 2**30,
             avail / 2**30, how)
    if need > 0.9 * avail:
        fit = max(1, int(settings.chunk_units * 0.9 * avail / need))
        raise MisbenchError(f"--chunk-units {settings.chunk_units}: the largest chunk needs about {need / 2**30:.1f} GiB "
                            f"({largest} images x {dim} dims x 4 B, twice: embeddings and the distance engine's copy) "
                            f"but {avail / 2**30:.1f} GiB is {how}; use --chunk-units {fit} or fewer")


def _probe_dim(backend, settings: ScoreSettings, device) -> int:
    """The embedding width, from one blank image (not a dataset image: not counted as embedded)."""
    if settings.engine == "pairwise":
        return 3 * settings.image_size ** 2  # the pairwise engine holds the images themselves
    with torch.no_grad():
        blank = torch.zeros(1, 3, settings.image_size, settings.image_size, device=device)
        return int(backend.embed(blank).shape[1])


def score(acts_path, layers, settings: ScoreSettings, out=None, tasks_out=None, cache_dir=None, shard=(0, 1),
          backend=None, progress=None, overwrite: bool = False) -> dict:
    """Score the units of `layers` ('all' for every layer); write mis.csv, mis.json (when `out` is given), tasks.h5.

    Returns mis.json's content plus `rows`, mis.csv's rows (one process; not in mis.json).
    Under torchrun (and no explicit shard) each rank scores every N-th unit into a part; rank 0
    merges the parts into the outputs of a one-process run. Existing outputs are refused unless `overwrite`
    (a killed run's tasks.h5 / mis.json, from the same command, is replaced).
    """
    outputs = {"--out": out, "--tasks-out": tasks_out,
               "mis.json (beside --out)": Path(out).with_suffix(".json") if out else None}
    with writing(outputs, {"ACTS": acts_path}, "misbench score"):
        return _score(acts_path, layers, settings, out, tasks_out, cache_dir, shard, backend, progress, overwrite)


def _score(acts_path, layers, settings: ScoreSettings, out, tasks_out, cache_dir, shard, backend, progress,
           overwrite: bool) -> dict:
    key = run_key("score", [acts_path], {"layers": list(layers), "shard": list(shard),
                                         **{k: v for k, v in dataclasses.asdict(settings).items()
                                            if k not in ScoreSettings.RUNTIME}}, out, tasks_out)
    refuse_foreign_outputs(out, tasks_out, key, overwrite)
    rank, size = distributed.world()
    if size > 1 and tuple(shard) == (0, 1):
        if out is None:
            raise MisbenchError("scoring under torchrun merges the ranks' parts through files: give an output path")
        distributed.ensure_initialized(resolve_device(settings.device))
        part = shard_path(out, (rank, size))
        part_tasks = shard_path(tasks_out, (rank, size)) if tasks_out else None
        # the parts are this command's own scratch files: a killed run's are replaced
        score(acts_path, layers, settings, part, part_tasks, cache_dir, (rank, size), backend, progress, overwrite=True)
        distributed.barrier()
        meta = None
        if rank == 0:
            parts = [shard_path(out, (r, size)) for r in range(size)]
            meta = merge_scores(parts, out, tasks_out, overwrite=True, key=key)  # checked above, before any work
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

        t_sel0, results, position = time.time(), [], 0
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
                bad = non_finite_rows(values)
                if len(bad):
                    row = int(rows[bad[0]])
                    raise MisbenchError(
                        f"{acts_path}: layer {name} unit {unit} has {len(bad)} non-finite activations (NaN or inf), "
                        f"the first {values[bad[0]]} at row {row} ({acts.paths[row]}); such values cannot be ranked, "
                        "so no MIS is given: re-extract from a model whose activations are finite (a float16 file "
                        "that overflowed: --dtype float32)")
                if is_constant(values):
                    results.append({"layer": name, "unit": unit, "status": "constant", "tasks": None})
                else:
                    results.append({"layer": name, "unit": unit, "status": "ok",
                                    "tasks": _select(settings, values, rows, dataset_index[rows], acts.n_rows, name,
                                                     unit)})
        t_select = time.time() - t_sel0
        acts_sha = sha256_file(acts_path)
        scored = [r for r in results if r["tasks"] is not None]
        all_images = RowImages(acts, np.zeros(0, np.int64), settings.image_size, settings.view,
                               backend.resample)  # the dataset, opened once
        # units in chunks: memory holds the embeddings of one chunk's images, never the dataset's
        chunks = [scored[first:first + settings.chunk_units] for first in range(0, len(scored), settings.chunk_units)]
        needed = [_needed_rows(chunk) for chunk in chunks]
        distinct = np.unique(np.concatenate(needed)) if needed else np.zeros(0, np.int64)
        # when the chunks need most of the images anyway (a few thousand images, or many units), all of
        # them stay resident in one distance engine instead of being read back chunk after chunk
        resident = settings.engine == "embed" and bool(needed) and \
            len(distinct) <= RESIDENT_FACTOR * max(len(rows) for rows in needed)
        _check_chunk_memory(settings, [distinct] if resident else needed, _probe_dim(backend, settings, device),
                            device)
        t_embed, t_decide, done, embedded = 0.0, 0.0, 0, 0
        # every image read back must be the one extraction saw (digests in the file): one hash per image
        content = all_images.checked_content_keys(distinct) if len(distinct) else None
        with contextlib.ExitStack() as stack:
            store, keys = None, None
            if settings.engine == "embed" and len(distinct):
                if cache_dir:
                    # content digests, computed once per image per run: a regenerated folder never hits stale entries
                    keys = content if content is not None else all_images.content_keys(distinct)
                    store = EmbeddingCache(cache_dir, fingerprint, settings.image_size, all_images.identity)
                else:
                    # the run's own store, beside the output (no output: the system's temp dir): each image
                    # is embedded once whatever the chunks
                    # (pid-named: the store a SIGKILLed run leaves is removed by the next run beside it)
                    own = stack.enter_context(temp_dir_beside(out, ".emb") if out is not None
                                              else tempfile.TemporaryDirectory(prefix="misbench-emb-"))
                    keys = all_images.index_keys(distinct)
                    store = EmbeddingCache(own, fingerprint, settings.image_size, all_images.identity)
            engine = None
            for chunk, rows in zip(chunks, needed):
                t1 = time.time()
                if resident:
                    rows = distinct
                images = all_images.with_rows(rows)
                if engine is not None:  # resident: built for the first chunk
                    pass
                elif settings.engine == "embed":
                    emb, n_new = embed_missing(backend, images, keys[np.searchsorted(distinct, rows)], store, device,
                                               settings.batch_size, settings.workers,
                                               progress=(lambda d, n: progress("embed", d, n)) if progress else None,
                                               amp=settings.amp)
                    embedded += n_new
                    engine = build_distances(settings.distances, rows, emb, device)
                    del emb
                else:
                    engine = _PairwiseDistances(backend, images, device, settings.batch_size)
                t2 = time.time()
                t_embed += t2 - t1
                for r, deltas in zip(chunk, _chunk_deltas(engine, chunk, settings.explanations)):
                    correct, conf = decisions(deltas), confidences(deltas, alpha)
                    rng = unit_rng(settings.seed, r["layer"], r["unit"], 1)
                    r.update(deltas=deltas, n_tasks=len(deltas), mis=stored_value(correct.mean()),
                             mis_confidence=stored_value(conf.mean()),
                             mis_ci=tuple(map(stored_value, clopper_pearson(correct.sum(), len(correct)))),
                             conf_ci=tuple(map(stored_value, bootstrap_mean_ci(conf, rng, settings.n_boot))))
                    done += 1
                    if progress:
                        progress("score", done, len(scored))
                if not resident:
                    embedded += getattr(engine, "forwarded", 0)
                    engine = None
                t_decide += time.time() - t2

        meta = {"misbench_version": __version__, "created_utc": utc_now(), "acts": str(acts_path),
                "acts_sha256": acts_sha, "model": str(acts.attrs.get("model", "")),
                "checkpoint_sha256": str(acts.attrs.get("checkpoint_sha256", "")),
                "data": str(acts.attrs.get("data", "")), "n_rows": acts.n_rows,
                "settings": {**dataclasses.asdict(settings), "alpha": alpha, "alpha_source": alpha_source,
                             "backend_fingerprint": fingerprint, "resample": backend.resample},
                "alpha": alpha, "alpha_source": alpha_source,
                "embedded_images": int(embedded), "distinct_images": int(len(distinct)),
                "distances": resolve_distances(settings.distances, device) if settings.engine == "embed" else "pairwise",
                "shard": f"{shard_i}/{shard_n}", "layer_order": names, "tasks_out": str(tasks_out or ""),
                "run_key": key}
    summary = layer_summaries(results, names, settings)
    meta.update(summary, timing={"select_s": round(t_select, 3), "embed_s": round(t_embed, 3),
                                 "decide_s": round(t_decide, 3), "total_s": round(time.time() - t0, 3)})
    write_scores(out, tasks_out, results, names, settings, meta, alpha, alpha_source)
    return {**meta, "rows": score_rows(results, alpha, alpha_source)}



"""Score every unit of an activation file with MIS (DESIGN §8): tasks, embeddings, decisions."""

__all__ = ["ScoreSettings", "score", "parse_shard", "MIS_COLUMNS", "embed_rows", "score_rows", "write_scores_csv",
           "merge_scores", "shard_path", "embed_missing", "chunk_memory"]

import contextlib
import dataclasses
import logging
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
from ..runtime.device import (available_memory, describe, make_loader, precision, prepare_model, resolve_device,
                              to_device)
from ..runtime.fileio import sha256_file, temp_dir_beside, utc_now
from ..runtime.outputs import writing
from ..similarity import EmbeddingIndex, backend_from_settings
from ..similarity.cache import EmbeddingCache
from ..similarity.index import build_distances, distances_per_task, resolve_distances
from ..version import __version__
from .mis import (SELECTIONS, Tasks, UnitScore, confidences, is_constant, non_finite_rows, score_unit, stored_value,
                  task_deltas, tie_keys, unit_facts, unit_rng)
from .results import (MIS_COLUMNS, layer_summaries, merge_scores, refuse_foreign_outputs, run_key, score_rows,
                      shard_path, write_scores, write_scores_csv)
from .ms import ms_scores
from .settings import ScoreSettings, parse_shard
from .summaries import NO_INTERVAL, confidence_intervals

log = logging.getLogger(__name__)

STORE_PART_BYTES = 64 << 20  # embeddings written to the store per part while embedding (bounds the copy)
RESIDENT_FACTOR = 1.5  # all images stay in memory when they are at most this many times a chunk's


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

    def task_distances(self, queries, targets):
        return distances_per_task(self.distances, queries, targets)

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


def _chunk_deltas(engine, chunk: list[Tasks], n_expl: int) -> list[np.ndarray]:
    """Task deltas of every unit of a chunk from one distance call (the engine blocks it as it needs):
    each task's two queries against its targets [E+ | E-], which both share."""
    queries = np.concatenate([np.stack([t.pos_query, t.neg_query], axis=1) for t in chunk])  # [T, 2]
    targets = np.concatenate([np.concatenate([t.pos_expl, t.neg_expl], axis=1) for t in chunk])  # [T, 2K]
    d = engine.task_distances(queries, targets)
    out, start = [], 0
    for t in chunk:
        T = len(t.pos_query)
        out.append(task_deltas(d[start:start + T, 0], d[start:start + T, 1], n_expl))
        start += T
    return out


def _needed_rows(chunk: list[Tasks]) -> np.ndarray:
    return np.unique(np.concatenate([np.concatenate([t.pos_expl.ravel(), t.neg_expl.ravel(), t.pos_query,
                                                     t.neg_query]) for t in chunk]))


def chunk_memory(settings: ScoreSettings, largest: int, dim: int, device) -> tuple[int, int, str]:
    """(bytes the largest chunk needs, bytes available, where) -- embeddings held twice: the array
    read back from the store and the distance engine's copy (FAISS index, device tensor, or the gram
    engine's dot products, which it computes only when they take no more memory than the embeddings)."""
    need = 2 * largest * dim * 4 + settings.batch_size * dim * 4
    where = device if settings.engine == "embed" and resolve_distances(settings.distances, device) == "torch" \
        else torch.device("cpu")
    avail, how = available_memory(where)
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
    if distributed.world()[1] > 1 and tuple(shard) == (0, 1):
        return _score_ranks(acts_path, layers, settings, out, tasks_out, cache_dir, backend, progress, key)
    t0 = time.time()
    acts = open_activations(acts_path)
    with acts:
        names = acts.layer_names if list(layers) in (["all"], []) else list(dict.fromkeys(layers))
        for name in names:
            acts.layer(name)  # validates before any work
            # enough rows for the selection: refused here, before the backend's load (a minute or more)
            SELECTIONS[settings.selection].check(settings.for_layer(name), acts.n_rows)
            if "ms" in settings.metrics and acts.tie_seed(name) is not None:
                raise MisbenchError(f"--metrics ms: layer {name!r} of {acts_path} keeps only its top/bottom-k rows; "
                                    "the MonoSemanticity score weighs every image: extract without --keep")
        device = resolve_device(settings.device)
        backend = prepare_model(backend_from_settings(settings) if backend is None else backend, device).eval()
        settings = settings.resolved(backend.image_size, backend.default_alpha)
        log.info("scoring with %s on %s", backend.name, describe(device, settings.workers, settings.amp))
        fingerprint = backend.fingerprint()
        t_select = time.time()
        units = _select_units(acts, acts_path, names, settings, shard)
        t_select = time.time() - t_select
        acts_sha = sha256_file(acts_path)
        ms, ms_work = {}, None
        with contextlib.ExitStack() as stack:  # the run's embedding store lives until MS is computed too
            scored, work, store = _score_tasks(acts, [u for u in units if u[2] is not None], backend, fingerprint,
                                               settings, device, out, cache_dir, progress, stack,
                                               all_rows="ms" in settings.metrics)
            if "ms" in settings.metrics:
                ms, ms_work = _ms_by_unit(acts, names, backend, settings, device, store, progress)
        meta = {"misbench_version": __version__, "created_utc": utc_now(), "acts": str(acts_path),
                "acts_sha256": acts_sha, "model": str(acts.attrs.get("model", "")),
                "checkpoint_sha256": str(acts.attrs.get("checkpoint_sha256", "")),
                "data": str(acts.attrs.get("data", "")), "n_rows": acts.n_rows,
                "settings": {**dataclasses.asdict(settings), "backend_fingerprint": fingerprint,
                             "resample": backend.resample},
                "alpha": settings.alpha, "alpha_source": settings.alpha_source,
                "embedded_images": work["embedded"], "distinct_images": work["distinct"],
                "distances": resolve_distances(settings.distances, device) if settings.engine == "embed" else "pairwise",
                "shard": f"{shard[0]}/{shard[1]}", "layer_order": names, "tasks_out": str(tasks_out or ""),
                "run_key": key}
        if ms_work is not None:
            meta["ms"] = ms_work
    scored = iter(scored)
    results = [UnitScore(layer, unit, "constant", **{k: v for k, v in facts.items() if k != "sparse"})
               if tasks is None else next(scored) for layer, unit, tasks, facts in units]
    if ms:
        results = [r if r.status == "constant" else dataclasses.replace(r, ms=ms[(r.layer, r.unit)]) for r in results]
    summary = layer_summaries(results, names, settings)
    n_sparse = summary["model_mean"]["n_sparse"]
    if n_sparse:
        log.warning("%d of %d units are sparse (their top pool reaches their minimum: rows chosen by the tie keys, "
                    "not by activation): scored, but %s means and comparisons%s", n_sparse, len(results),
                    "counted in" if settings.keep_sparse else "left out of",
                    "" if settings.keep_sparse else " (--keep-sparse counts them)")
    if settings.tasks < 2:
        log.warning("conf_ci_low/high are left empty: %s", NO_INTERVAL)
    meta.update(summary,
                timing={"select_s": round(t_select, 3), "embed_s": round(work["embed_s"], 3),
                        "decide_s": round(work["decide_s"], 3), "total_s": round(time.time() - t0, 3)})
    write_scores(out, tasks_out, results, names, settings, meta)
    return {**meta, "rows": score_rows(results, settings.alpha, settings.alpha_source, settings.metrics)}


def _ms_by_unit(acts, names, backend, settings: ScoreSettings, device, store: "_RunStore", progress) -> tuple[dict, dict]:
    """(layer, unit) -> MonoSemanticity score (None where undefined) over every row of the file, from the
    backend's embeddings of all rows: those the MIS pass embedded are read back from the run's store (each image
    embedded once per run), and each layer's activations are read in row blocks (ms_scores), never whole."""
    t0 = time.time()
    rows = np.arange(acts.n_rows)
    images = store.images.with_rows(rows)
    emb, embedded = embed_missing(backend, images, store.keys_of(rows), store.store, device, settings.batch_size,
                                  settings.workers, progress=(lambda d, n: progress("embed", d, n)) if progress else None,
                                  amp=settings.amp)
    out = {}
    for name in names:
        for unit, value in enumerate(ms_scores(acts.layer(name)["activations"], emb, device)):
            out[(name, unit)] = stored_value(value) if np.isfinite(value) else None
    return out, {"embedded_images": int(embedded), "rows": int(acts.n_rows), "dims": int(emb.shape[1]),
                 "seconds": round(time.time() - t0, 3)}


class _RunStore:
    """The run's embedding store and its rows' keys: the cache's content digests (checked against the file's), or
    dataset indices in the run's own store beside the output. MIS chunks and MS read one another's embeddings."""

    def __init__(self, stack, images: RowImages, rows: np.ndarray, fingerprint: str, settings: ScoreSettings, out,
                 cache_dir):
        self.images, self.rows = images, rows
        # every image read back must be the one extraction saw (digests in the file): one hash per image
        content = images.checked_content_keys(rows) if len(rows) else None
        if cache_dir:
            # content digests, computed once per image per run: a regenerated folder never hits stale entries
            self.keys = content if content is not None else images.content_keys(rows)
            self.store = EmbeddingCache(cache_dir, fingerprint, settings.image_size, images.identity)
        else:
            # the run's own store, beside the output (no output: the system's temp dir): each image is embedded
            # once whatever the chunks (pid-named: the store a SIGKILLed run leaves is removed by the next run beside it)
            own = stack.enter_context(temp_dir_beside(out, ".emb") if out is not None
                                      else tempfile.TemporaryDirectory(prefix="misbench-emb-"))
            self.keys = images.index_keys(rows)
            self.store = EmbeddingCache(own, fingerprint, settings.image_size, images.identity)

    def keys_of(self, rows) -> np.ndarray:
        return self.keys[np.searchsorted(self.rows, rows)]


def _score_ranks(acts_path, layers, settings: ScoreSettings, out, tasks_out, cache_dir, backend, progress,
                 key: str) -> dict | None:
    """Under torchrun: each rank scores its shard into a part; rank 0 merges the parts into the outputs."""
    rank, size = distributed.world()
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


def _select_units(acts, acts_path, names: list[str], settings: ScoreSettings, shard) -> list[tuple]:
    """(layer, unit, Tasks or None for a constant unit, unit_facts) of this shard's units, in the file's order.
    Each layer's units are selected with its own settings (ScoreSettings.for_layer: class units' quantile)."""
    selection, (shard_i, shard_n) = SELECTIONS[settings.selection], shard
    units, position, dataset_index = [], 0, acts.index
    for name in names:
        layer_settings = settings.for_layer(name)
        pool = selection.per_side(layer_settings, acts.n_rows)
        tie_seed = acts.tie_seed(name)
        if tie_seed is not None:
            check_tie_order(*acts.kept_values(name), pool, acts.n_rows, tie_seed, settings.seed, name, acts_path)
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
            tasks = None
            if not is_constant(values):  # values in the file's stored dtype: its resolution
                tasks = selection.select(values, rows, tie_keys(settings.seed, name, unit, dataset_index[rows]),
                                         acts.n_rows, unit_rng(settings.seed, name, unit, 0), layer_settings)
            units.append((name, unit, tasks, unit_facts(values, acts.n_rows, pool)))
    return units


def _score_tasks(acts, units: list[tuple], backend, fingerprint: str, settings: ScoreSettings, device, out, cache_dir,
                 progress, stack, all_rows: bool = False) -> tuple[list[UnitScore], dict, "_RunStore | None"]:
    """Each (layer, unit, Tasks)'s UnitScore, in order, the work done (images embedded and distinct, seconds
    embedding and deciding) and the run's embedding store (open while `stack` is; None when nothing was stored).
    Units go in chunks: memory holds the embeddings of one chunk's images, never the dataset's; every image is
    embedded once per run whatever the chunks. `all_rows`: the store covers every row of the file (MS reads them
    all), not only the rows the tasks need."""
    all_images = RowImages(acts, np.zeros(0, np.int64), settings.image_size, settings.view,
                           backend.resample)  # the dataset, opened once
    chunks = [units[first:first + settings.chunk_units] for first in range(0, len(units), settings.chunk_units)]
    needed = [_needed_rows([tasks for _, _, tasks, _ in chunk]) for chunk in chunks]
    distinct = np.unique(np.concatenate(needed)) if needed else np.zeros(0, np.int64)
    # when the chunks need most of the images anyway (a few thousand images, or many units), all of
    # them stay resident in one distance engine instead of being read back chunk after chunk
    resident = settings.engine == "embed" and bool(needed) and \
        len(distinct) <= RESIDENT_FACTOR * max(len(rows) for rows in needed)
    _check_chunk_memory(settings, [distinct] if resident else needed, _probe_dim(backend, settings, device), device)
    t_embed, t_decide, embedded, scored = 0.0, 0.0, 0, []
    store = None
    if all_rows:
        store = _RunStore(stack, all_images, np.arange(acts.n_rows), fingerprint, settings, out, cache_dir)
    elif settings.engine == "embed" and len(distinct):
        store = _RunStore(stack, all_images, distinct, fingerprint, settings, out, cache_dir)
    elif len(distinct):
        all_images.checked_content_keys(distinct)  # the pairwise engine reads the images: the ones extraction saw
    engine = None
    for chunk, rows in zip(chunks, needed):
        t1 = time.time()
        if resident:
            rows = distinct
        if engine is None:  # resident: the first chunk's engine serves every chunk
            images = all_images.with_rows(rows)
            if settings.engine == "embed":
                emb, n_new = embed_missing(backend, images, store.keys_of(rows), store.store, device,
                                           settings.batch_size, settings.workers,
                                           progress=(lambda d, n: progress("embed", d, n)) if progress else None,
                                           amp=settings.amp)
                embedded += n_new
                # the pairs it will be asked for: every chunk's when resident, else this chunk's
                tasks = sum(len(t.pos_query) for c in (chunks if resident else [chunk]) for _, _, t, _ in c)
                engine = build_distances(settings.distances, rows, emb, device,
                                         pairs=tasks * 4 * settings.explanations)
                del emb
            else:
                engine = _PairwiseDistances(backend, images, device, settings.batch_size)
        t2 = time.time()
        t_embed += t2 - t1
        deltas = _chunk_deltas(engine, [tasks for _, _, tasks, _ in chunk], settings.explanations)
        conf_lo, conf_hi = confidence_intervals(confidences(np.stack(deltas), settings.alpha))  # the chunk at once
        for (layer, unit, tasks, facts), unit_deltas, lo, hi in zip(chunk, deltas, conf_lo, conf_hi):
            scored.append(score_unit(layer, unit, tasks, unit_deltas, settings, (lo, hi), facts))
            if progress:
                progress("score", len(scored), len(units))
        if not resident:
            embedded += getattr(engine, "forwarded", 0)
            engine = None
        t_decide += time.time() - t2
    return scored, {"embedded": int(embedded), "distinct": int(len(distinct)), "embed_s": t_embed,
                    "decide_s": t_decide}, store

"""The activation file (HDF5 schema 1, DESIGN §4): streaming writer, refusing reader."""

__all__ = ["ActivationWriter", "ActivationFile", "open_activations", "partial_path", "part_path", "layer_dtype",
           "merge_activation_parts", "SCHEMA", "SCHEMA_VERSION", "PartialUnusable", "check_schema", "add_permuted_layers",
           "PERMUTED_SUFFIX"]

import json
import logging
import os
import resource
import shutil
import time
import zlib
from pathlib import Path

import h5py
import numpy as np

from ..errors import MisbenchError, close_matches
from ..runtime.fileio import DiskFullError, atomic_path, disk_full_error
from ..runtime.interrupts import uninterruptible
from .topk import TOPK_SEED, TopK, merge_topk

log = logging.getLogger(__name__)

SCHEMA = "misbench-activations"
SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
ROW_CHUNK = 256
HEADROOM = 1 << 20  # bytes kept free for HDF5's metadata when checking room for a batch
TOPK_COMMIT_SECONDS = 60.0  # how often a top-k extraction makes its progress resumable
# HDF5 1.8 format: its superblock (v2) has no "open for writing" flag, so a partial file of a process
# killed by SIGKILL opens again for --resume ("latest" writes superblock v3, which then needs h5clear)
LIBVER = ("v108", "v108")


class PartialUnusable(MisbenchError):
    """An interrupted extraction that cannot be continued exactly (unreadable, or torn)."""


def check_schema(attrs, path) -> None:
    """Refuse activation files of another schema or schema version, naming what was found and what is read."""
    if attrs.get("schema") != SCHEMA:
        raise MisbenchError(f"{path} is not a misbench activation file (schema attribute {attrs.get('schema')!r})")
    version = attrs.get("schema_version")
    version = version.item() if hasattr(version, "item") else version
    try:
        found = int(version)
    except (TypeError, ValueError):
        found = None
    if found not in SUPPORTED_VERSIONS or (version is not None and float(version) != found):
        raise MisbenchError(f"{path} has schema_version {version!r}; this misbench reads schema_version "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))}: re-extract it with this misbench "
                            "(or use the misbench version that wrote it)")


def _open_partial(path: Path) -> h5py.File:
    """Read-only, whatever state a killed process left it in."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        if "consistency flags" not in str(err):
            raise PartialUnusable(f"{path} is not a readable HDF5 file ({err})") from None
    try:  # an older misbench wrote the "latest" format, whose open-for-writing flag outlives SIGKILL
        return h5py.File(path, "r", swmr=True)
    except OSError as err:
        raise PartialUnusable(f"{path} is not a readable HDF5 file ({err})") from None


def _committed_rows(h5: h5py.File, path: Path) -> int:
    try:
        check_schema(h5.attrs, path)
        rows = int(h5.attrs["rows_written"])
        int(h5.attrs["next_index"])
    except MisbenchError as err:
        raise PartialUnusable(str(err)) from None
    except (KeyError, ValueError, TypeError) as err:
        raise PartialUnusable(f"{path} has no valid rows_written/next_index ({err})") from None
    if int(h5.attrs.get("topk_rows", rows)) != rows:
        raise PartialUnusable(f"{path} was interrupted while writing its top-k state")
    return rows


def _copy_rows(src, dst, rows: int, block: int) -> None:
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    for name, obj in src.items():
        if isinstance(obj, h5py.Group):
            _copy_rows(obj, dst.create_group(name), rows, block)
        elif obj.maxshape and obj.maxshape[0] is None:  # a row dataset: only the committed rows
            if obj.shape[0] < rows:
                raise PartialUnusable(f"{obj.name} has {obj.shape[0]} rows, {rows} were committed")
            ds = dst.create_dataset(name, (rows, *obj.shape[1:]), obj.dtype, maxshape=obj.maxshape, chunks=obj.chunks)
            for start in range(0, rows, block):
                ds[start:min(rows, start + block)] = obj[start:min(rows, start + block)]
            for key, value in obj.attrs.items():
                ds.attrs[key] = value
        else:  # top-k state, stats: whole
            src.copy(obj, dst, name=name)


def _rebuild_partial(path: Path, block: int = 4096) -> None:
    """Copy the committed rows of an interrupted extraction into a fresh file that replaces it. Reading every
    committed row verifies it; the fresh file has none of the half-written metadata (HDF5's heaps, chunk
    indexes) a kill can leave behind, which HDF5 would otherwise build the next rows on."""
    tmp = path.with_name(path.name + ".rebuild")
    src = _open_partial(path)
    try:
        rows = _committed_rows(src, path)
        with h5py.File(tmp, "w", libver=LIBVER) as dst:
            _copy_rows(src, dst, rows, block)
    except PartialUnusable:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as err:  # h5py raises OSError, KeyError, RuntimeError, ValueError for torn files
        tmp.unlink(missing_ok=True)
        full = disk_full_error(err, tmp, "the interrupted extraction is kept: free space, then rerun with --resume")
        if full is not None:
            raise full from None
        raise PartialUnusable(f"{path} is damaged ({type(err).__name__}: {err})") from None
    finally:
        src.close()
    os.replace(tmp, path)


def partial_path(out) -> Path:
    """Where an unfinished extraction lives; renamed onto `out` when complete."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def part_path(out, rank: int, size: int) -> Path:
    """One rank's share of a distributed extraction."""
    out = Path(out)
    return out.with_name(f"{out.name}.partial.rank{rank}of{size}")


TOPK_FIELDS = ("top_value", "top_index", "top_item", "bottom_value", "bottom_index", "bottom_item", "sum")


def _chunk(units: int) -> tuple:
    # about 1 MiB per chunk at float32, whatever the layer width
    rows = max(16, min(ROW_CHUNK, (1 << 18) // max(units, 1)))
    return (rows, units)


def layer_dtype(dtype, name: str):
    """The storage dtype of layer `name`: `dtype` itself, or its entry when it maps layer names to dtypes."""
    return dtype[name] if isinstance(dtype, dict) else dtype


class ActivationWriter:
    """Appends rows batch by batch; every commit leaves a resumable file.

    Without top-k layers every batch is committed. Top-k state (units x K per layer, rewritten
    whole) is committed every TOPK_COMMIT_SECONDS at most: rows appended since the last commit
    are beyond `rows_written`, so a resume truncates them and extracts them again.
    """

    def __init__(self, path, attrs: dict | None = None, resume: bool = False, start: int = 0):
        self.path = Path(path)
        if resume:
            _rebuild_partial(self.path)
            self.h5 = h5py.File(self.path, "r+")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.h5 = h5py.File(self.path, "w", libver=LIBVER)
            for key, value in (attrs or {}).items():
                self.h5.attrs[key] = value
            self.h5.attrs["complete"] = False
            self.h5.attrs["rows_written"] = 0
            self.h5.attrs["next_index"] = start
            self.h5.attrs["skipped_paths"] = "[]"
            images = self.h5.create_group("images")
            images.create_dataset("index", (0,), np.int64, maxshape=(None,), chunks=(4096,))
            images.create_dataset("path", (0,), h5py.string_dtype("utf-8"), maxshape=(None,), chunks=(4096,))
            images.create_dataset("label", (0,), np.int64, maxshape=(None,), chunks=(4096,))
            self.h5.create_group("outputs")
            self.h5.create_group("layers")
        self._rows, self._next = int(self.h5.attrs["rows_written"]), int(self.h5.attrs["next_index"])
        self._skipped, self._topk, self._last_commit = [], None, time.monotonic()
        self.broken = False  # a write failed (disk full): closing cannot flush

    @property
    def rows(self) -> int:
        """Rows appended (committed or not)."""
        return self._rows

    @property
    def next_index(self) -> int:
        return self._next

    def _datasets(self):
        yield from self.h5["images"].values()
        yield from self.h5["outputs"].values()
        for group in self.h5["layers"].values():
            if "activations" in group:
                yield group["activations"]

    def _ensure(self, group, name: str, units: int, dtype, attrs: dict | None = None):
        if name not in group:
            ds = group.create_dataset(name, (0, units), dtype, maxshape=(None, units), chunks=_chunk(units))
            for key, value in (attrs or {}).items():
                ds.attrs[key] = value
        return group[name]

    def topk_state(self, name: str) -> dict | None:
        group = self.h5["layers"].get(name)
        if group is None or "top_value" not in group:
            return None
        return {f: group[f][...] for f in TOPK_FIELDS}

    def _write_topk(self, name: str, state: dict, dtype, layer_attrs: dict) -> None:
        group = self.h5["layers"].require_group(name)
        if not group.attrs:
            for key, value in layer_attrs.items():
                group.attrs[key] = value
            group.attrs["tie_seed"] = TOPK_SEED  # the seed whose tie keys chose the kept rows
        for field in TOPK_FIELDS:
            value = state[field]
            if field.endswith("value"):
                value = value.astype(layer_dtype(dtype, name))
            if field in group and group[field].shape != value.shape:
                del group[field]
            if field in group:
                group[field][...] = value
            else:
                group.create_dataset(field, data=value)

    def append(self, index, paths, labels, logits, layers: dict, layer_attrs: dict, dtype, next_index: int,
               skipped: list[str] = (), topk: dict | None = None, digests=None) -> None:
        """Write one batch: `layers` maps layer name -> [B, U] array; `topk` layer name -> TopK (its state is
        taken when committed) or a TopK state;
        `dtype` is one storage dtype or a mapping layer name -> dtype; `digests` the images' content digests
        (data.DIGEST_CHARS hex characters; kept only by files that hold them from their first row)."""
        with uninterruptible():  # Ctrl-C or SIGTERM stop at a batch boundary
            self._append(index, paths, labels, logits, layers, layer_attrs, dtype, next_index, skipped, topk, digests)

    def _ensure_room(self, rows: int, logits, layers: dict, dtype) -> None:
        """Refuse a batch that the disk (or the file-size limit) cannot take, before HDF5 writes any of it:
        HDF5 failing in the middle of a write leaves its library state broken."""
        need = HEADROOM + rows * (8 * 2 + 256 + 4 * logits.shape[1])
        for name, values in layers.items():  # partly filled chunks are written whole
            units = values.shape[1]
            need += max(rows, _chunk(units)[0]) * units * np.dtype(layer_dtype(dtype, name)).itemsize
        free = shutil.disk_usage(self.path.parent).free
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        size = self.path.stat().st_size
        if free < need or (limit != resource.RLIM_INFINITY and size + need > limit):
            raise DiskFullError(f"cannot write {self.path}: {free >> 10} KiB free"
                                + (f", file-size limit {limit >> 10} KiB (ulimit -f)" if limit != resource.RLIM_INFINITY else "")
                                + f", the next batch needs about {need >> 10} KiB; the rows so far are kept: "
                                "free space, then rerun with --resume")

    def _append(self, index, paths, labels, logits, layers, layer_attrs, dtype, next_index, skipped, topk, digests):
        self._ensure_room(len(index), logits, layers, dtype)
        n0, end = self._rows, self._rows + len(index)
        columns = [("index", index), ("path", paths), ("label", labels)]
        images = self.h5["images"]
        if digests is not None and n0 == 0 and "sha256" not in images:  # digests for every row, or for none
            images.create_dataset("sha256", (0,), np.asarray(digests).dtype, maxshape=(None,), chunks=(4096,))
        if "sha256" in images:
            if digests is None:
                raise ValueError(f"{self.path} records image digests: append needs them")
            columns.append(("sha256", digests))
        for name, values in columns:
            ds = self.h5["images"][name]
            ds.resize(end, axis=0)
            ds[n0:end] = values
        ds = self._ensure(self.h5["outputs"], "logits", logits.shape[1], np.float32)
        ds.resize(end, axis=0)
        ds[n0:end] = logits
        for name, values in layers.items():
            group = self.h5["layers"].require_group(name)
            if not group.attrs:
                for key, value in layer_attrs[name].items():
                    group.attrs[key] = value
            ds = self._ensure(group, "activations", values.shape[1], layer_dtype(dtype, name))
            ds.resize(end, axis=0)
            ds[n0:end] = values
        self._rows, self._next = end, next_index
        self._skipped += list(skipped)
        if topk:
            self._topk = (topk, dtype, layer_attrs)
        if not topk or time.monotonic() - self._last_commit >= TOPK_COMMIT_SECONDS:
            self._commit()

    def commit(self) -> None:
        """Make everything appended so far part of the resumable file."""
        with uninterruptible():
            self._commit()

    def _commit(self) -> None:
        if self._topk is not None:
            states, dtype, layer_attrs = self._topk
            for name, state in states.items():  # a TopK ranks its candidates only now, once per commit
                self._write_topk(name, state.state() if isinstance(state, TopK) else state, dtype, layer_attrs[name])
            self.h5.attrs["topk_rows"] = self._rows
            self._topk = None
        if self._skipped:
            self.h5.attrs["skipped_paths"] = json.dumps(json.loads(self.h5.attrs["skipped_paths"]) + self._skipped)
            self._skipped = []
        self.h5.attrs["rows_written"] = self._rows
        self.h5.attrs["next_index"] = self._next
        self.h5.flush()
        self._last_commit = time.monotonic()

    def finish(self, block: int = 4096) -> None:
        """Per-unit stats, then complete=True."""
        self.commit()
        rows = max(self.rows, 1)
        for group in self.h5["layers"].values():
            if "activations" in group:
                acts = group["activations"]
                units = acts.shape[1]
                lo, hi, total = np.full(units, np.inf), np.full(units, -np.inf), np.zeros(units)
                for start in range(0, acts.shape[0], block):
                    x = acts[start:start + block].astype(np.float64)
                    lo, hi, total = np.minimum(lo, x.min(0)), np.maximum(hi, x.max(0)), total + x.sum(0)
            else:  # top/bottom-k: the extremes are the first kept values, the sum was kept exactly
                lo, hi, total = group["bottom_value"][:, 0], group["top_value"][:, 0], group["sum"][...]
            stats = group.require_group("stats")
            for name, values in (("min", lo), ("max", hi), ("mean", total / rows)):
                if name in stats:
                    del stats[name]
                stats.create_dataset(name, data=values.astype(np.float32))
        self.h5.attrs["complete"] = True
        self.h5.flush()

    def close(self):
        try:
            self.h5.close()
        except RuntimeError:
            if not self.broken:  # after a failed write HDF5 cannot flush; the last commit is what counts
                raise


def merge_activation_parts(parts: list, target, block: int = 4096) -> None:
    """Concatenate ranks' part files (in rank order) into one file with the content of a one-process run."""
    first = h5py.File(parts[0], "r")
    attrs = {k: v for k, v in first.attrs.items() if k not in ("complete", "rows_written", "next_index",
                                                               "skipped_paths", "topk_rows")}
    layer_attrs = {name: dict(g.attrs) for name, g in first["layers"].items()}
    first.close()
    writer = ActivationWriter(target, attrs)
    skipped, topk_parts, offset, next_index = [], {}, 0, 0
    for part in parts:
        with h5py.File(part, "r") as h5:
            n = int(h5.attrs["rows_written"])
            for start in range(0, n, block):
                stop = min(n, start + block)
                full = {name: g["activations"][start:stop] for name, g in h5["layers"].items() if "activations" in g}
                dtype = {name: values.dtype for name, values in full.items()}
                writer.append(h5["images/index"][start:stop], h5["images/path"][start:stop],
                              h5["images/label"][start:stop], h5["outputs/logits"][start:stop], full, layer_attrs,
                              dtype, next_index=int(h5.attrs["next_index"]),
                              digests=h5["images/sha256"][start:stop] if "images/sha256" in h5 else None)
            for name, g in h5["layers"].items():
                if "top_value" in g:
                    state = {f: g[f][...] for f in TOPK_FIELDS}
                    state["top_index"] = state["top_index"] + offset
                    state["bottom_index"] = state["bottom_index"] + offset
                    topk_parts.setdefault(name, (g["top_value"].dtype, []))[1].append(state)
            skipped += json.loads(h5.attrs["skipped_paths"])
            offset += n
            next_index = int(h5.attrs["next_index"])
    k = json.loads(attrs["settings"]).get("keep")
    for name, (dtype, states) in topk_parts.items():
        writer._write_topk(name, merge_topk(name, states, int(k.partition(":")[2])), dtype, layer_attrs[name])
    if topk_parts:
        writer.h5.attrs["topk_rows"] = writer.rows
    writer._next, writer._skipped = next_index, skipped
    writer.finish()
    writer.close()


PERMUTED_SUFFIX = "_permuted"
PERMUTE_UNITS = 256  # units permuted at once (bounds the memory of the permutation keys)


def add_permuted_layers(src, out, layers, seed: int = 0) -> list[str]:
    """Copy the complete activation file `src` to `out` with, for each of `layers`, a control layer
    `<layer>_permuted`: each unit's values permuted across images (an independent seeded permutation per unit,
    so units stay independent draws and a layer mean's interval over units keeps its coverage): each unit keeps
    its activation distribution but loses its link to the images. Returns the new layer names; `out` is written
    atomically."""
    with open_activations(src) as acts:
        names = list(acts.layer_names)
        for name in layers:
            acts.layer(name)  # an unknown layer is named with close matches
            if "activations" not in acts.layer(name):
                raise MisbenchError(f"{src}: layer {name!r} keeps only top/bottom-k rows; a permuted control needs "
                                    "its full activations (extract without --keep)")
            if name + PERMUTED_SUFFIX in names:
                raise MisbenchError(f"{src} already has a layer {name + PERMUTED_SUFFIX!r}; permute the original file")
    added = []
    with atomic_path(out) as tmp:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "r+") as h5:
            for name in layers:
                group = h5["layers"][name]
                values = group["activations"]
                rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
                new = h5["layers"].create_group(name + PERMUTED_SUFFIX)
                new.attrs.update({**dict(group.attrs), "control": "permuted", "permuted_from": name,
                                  "permutation_seed": seed})
                # the source's chunks were sized for a growing dataset: no larger than this fixed one
                chunks = values.chunks and tuple(max(1, min(c, n)) for c, n in zip(values.chunks, values.shape))
                target = new.create_dataset("activations", shape=values.shape, dtype=values.dtype,
                                            chunks=chunks, compression=values.compression)
                for u0 in range(0, values.shape[1], PERMUTE_UNITS):
                    block = values[:, u0:u0 + PERMUTE_UNITS]
                    order = np.argsort(rng.random(block.shape), axis=0)
                    target[:, u0:u0 + PERMUTE_UNITS] = np.take_along_axis(block, order, axis=0)
                group.copy("stats", new)  # a permutation keeps each unit's min, max and mean
                added.append(name + PERMUTED_SUFFIX)
            h5.attrs["layer_names"] = json.dumps(names + added)
    return added


class ActivationFile:
    """Read access to a complete activation file."""

    def __init__(self, path):
        self.path = Path(path)
        self.h5 = h5py.File(self.path, "r")
        self.attrs = dict(self.h5.attrs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.h5.close()

    @property
    def layer_names(self) -> list[str]:
        order = json.loads(self.attrs.get("layer_names", "[]"))
        return order or list(self.h5["layers"].keys())

    @property
    def n_rows(self) -> int:
        return int(self.h5["images/index"].shape[0])

    def layer(self, name: str):
        if name not in self.h5["layers"]:
            raise MisbenchError(f"layer {name!r} is not in {self.path}.{close_matches(name, self.layer_names)} "
                                f"Layers there: {', '.join(self.layer_names[:12])}{' ...' if len(self.layer_names) > 12 else ''}")
        return self.h5["layers"][name]

    def layer_attrs(self, name: str) -> dict:
        """A layer's attributes (module, kind, n_units, reduction; a features layer's dictionary_file, ...)."""
        return dict(self.layer(name).attrs)

    def activations(self, name: str) -> np.ndarray:
        group = self.layer(name)
        if "activations" not in group:
            raise MisbenchError(f"layer {name!r} of {self.path} holds only top/bottom-k values, not full activations")
        return group["activations"][...]

    def tie_seed(self, name: str) -> int | None:
        """The tie-break seed that chose a top/bottom-k layer's kept rows; None for full activations."""
        group = self.layer(name)
        return None if "activations" in group else int(group.attrs.get("tie_seed", TOPK_SEED))

    def kept_values(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A top/bottom-k layer's kept values [U, K], each side in rank order."""
        group = self.layer(name)
        return group["top_value"][...], group["bottom_value"][...]

    def unit_candidates(self, name: str):
        """(unit, values, rows) per unit: every row of a full file; the kept top and bottom rows of a
        top/bottom-k file (each row once). Constancy and rankings are the same on both."""
        group = self.layer(name)
        if "activations" in group:
            values = group["activations"][...]
            rows = np.arange(values.shape[0])
            for unit in range(values.shape[1]):
                yield unit, values[:, unit], rows
            return
        top_i, top_v = group["top_index"][...], group["top_value"][...]
        bot_i, bot_v = group["bottom_index"][...], group["bottom_value"][...]
        for unit in range(top_i.shape[0]):
            rows, first = np.unique(np.concatenate([top_i[unit], bot_i[unit]]), return_index=True)
            yield unit, np.concatenate([top_v[unit], bot_v[unit]])[first], rows

    @property
    def labels(self) -> np.ndarray:
        return self.h5["images/label"][...]

    @property
    def index(self) -> np.ndarray:
        return self.h5["images/index"][...]

    @property
    def paths(self) -> list[str]:
        return [p.decode() if isinstance(p, bytes) else p for p in self.h5["images/path"][...]]

    @property
    def logits(self) -> np.ndarray:
        return self.h5["outputs/logits"][...]

    @property
    def digests(self) -> np.ndarray | None:
        """Each row's image content digest (the first 128 bits of the sha256 of its bytes, hex, S32) as read at
        extraction; None for files written before misbench recorded them."""
        return self.h5["images/sha256"][...] if "images/sha256" in self.h5 else None

    @property
    def class_names(self) -> list[str]:
        return json.loads(self.attrs.get("class_names", "[]"))


def open_activations(path) -> ActivationFile:
    """Open for reading; refuse files that are not complete activation files."""
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            raise MisbenchError(f"{path} is not finished: an interrupted extraction is at {partial_path(path)}. "
                                "Run the same `misbench extract` command with --resume to complete it.")
        raise MisbenchError(f"activation file {path} does not exist")
    try:
        acts = ActivationFile(path)
    except OSError as err:
        raise MisbenchError(f"{path} is not a readable HDF5 file: {err}") from None
    try:
        check_schema(acts.attrs, path)
        for required in ("images/index", "images/path", "images/label", "outputs/logits", "layers"):
            if required not in acts.h5:
                raise MisbenchError(f"{path} has no {required}: it is damaged or not written by misbench; "
                                    "extract it again")
    except MisbenchError:
        acts.close()
        raise
    if not bool(acts.attrs.get("complete", False)):
        acts.close()
        raise MisbenchError(f"{path} is incomplete (complete=false): run the same `misbench extract` command "
                            "with --resume to finish it, or --overwrite to start again")
    return acts

"""Run a model over a dataset and stream per-unit activations into an HDF5 file (DESIGN §4)."""

__all__ = ["ExtractSettings", "extract"]

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..datasets.labels import labels_setting
from ..datasets.sources import DIGEST_CHARS, ImageSource, TransformedDataset, data_folders, load_data
from ..datasets.subset import first_images
from ..errors import MisbenchError
from ..models.loading import LoadedModel, model_input_file
from ..models.preprocess import build_transform
from ..runtime import distributed
from ..runtime.device import (batch_size_setting, describe, device_setting, make_loader, precision, prepare_model,
                              resolve_device, to_device, workers_setting)
from ..runtime.fileio import disk_full_error, flag_hint, refuse_existing, utc_now
from ..runtime.outputs import writing
from ..runtime.schema import setting, validate
from ..version import __version__
from .dictionary import encode, parse_features, resolve_features
from .hooks import FeatureHooks, LayerRequest, resolve_layers
from .order import non_finite_rows
from .store import (SCHEMA, SCHEMA_VERSION, ActivationWriter, PartialUnusable, merge_activation_parts, part_path,
                    partial_path)
from .tokens import LAYER_KINDS, TOKEN_REDUCTIONS, channels_last_modules
from .topk import TopK, parse_keep

log = logging.getLogger(__name__)

DTYPES = {"float16": np.float16, "float32": np.float32}
# class units are always float32: in float16 most of a class's softmax values round to exactly 0 and
# the bottom of the ranking becomes a random draw among them
CLASS_KINDS = ("softmax", "logits")


def storage_dtypes(requests, dtype: str) -> dict:
    """Layer name -> numpy dtype: `dtype` for module layers, float32 for the class-unit layers."""
    return {r.name: np.float32 if r.kind in CLASS_KINDS else DTYPES[dtype] for r in requests}


@dataclasses.dataclass(frozen=True)
class ExtractSettings:
    # the API's and the command line's LAYERS argument; the study config's [extract] layers
    layers: tuple[str, ...] = setting(("conv", "softmax"), cli=False)
    reduction: str = setting("mean", choices=("mean", "max"), help="Conv feature maps to one value per channel.")
    dtype: str = setting("float32", choices=DTYPES, help="Storage type of module layers (class units: float32).")
    limit: int | None = setting(None, low=1, help="Only the first N images.")
    on_bad_image: str = setting("fail", choices=("fail", "skip"), config=False,
                                help="An unreadable image stops the run (fail) or is left out (skip).")
    resize: int | None = setting(None, low=1, help="Override the resize of the model's preprocessing.")
    crop: int | None = setting(None, low=1, help="Override the centre crop of the model's preprocessing.")
    amp: bool = setting(False, config=False,
                        help="Mixed precision: float16 on CUDA, bfloat16 on CPU (off by default: exact activations).")
    # "topk:K": only the K highest and lowest activations per unit
    keep: str | None = setting(None, check=parse_keep, config=False, metavar="topk:K",
                               help="topk:K: store only the K highest and lowest activations per unit (exact MIS for "
                                    "K >= (explanations+1) x tasks; bounded memory on huge datasets).")
    labels: str = labels_setting()  # how class folders map to the model's classes (labels.py)
    token_reduction: str = setting("mean", choices=TOKEN_REDUCTIONS,  # over the tokens of token layers (tokens.py)
                                   help="How token layers ([N, tokens, D]) reduce over tokens; cls = the class token.")
    # "NAME=LAYER:FILE" dictionary feature layers (dictionary.py)
    features: tuple[str, ...] = setting((), check=lambda specs: [parse_features(s) for s in specs],
                                        metavar="NAME=LAYER:FILE",
                                        help="Add a layer NAME of dictionary features of module LAYER (FILE: W_enc "
                                             "[K, D], b_enc [K], optional b_dec [D], activation); repeatable or "
                                             "comma-separated.")
    # how, not what: these do not change the file's content and may differ on --resume
    batch_size: int = batch_size_setting()
    workers: int | None = workers_setting()
    device: str = device_setting()

    RUNTIME = ("batch_size", "workers", "device")

    def __post_init__(self):
        validate(self)

    def content_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["features"] = list(self.features)
        return {k: v for k, v in d.items() if k not in self.RUNTIME}


def _file_attrs(loaded: LoadedModel, source: ImageSource, settings: ExtractSettings, pre, layer_names) -> dict:
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "misbench_version": __version__,
        "model": loaded.spec, "checkpoint_sha256": loaded.sha256, "arch": loaded.arch,
        "arch_kwargs": json.dumps(loaded.arch_kwargs, sort_keys=True),
        "label_mapping": getattr(getattr(source, "label_map", None), "mapping", "dataset"),
        "label_warning": getattr(getattr(source, "label_map", None), "warning", ""),
        "data": source.spec, "data_root": source.root, "num_classes": loaded.num_classes,
        "class_names": json.dumps(list(source.classes)),
        "transform": json.dumps(pre.to_dict()), "reduction": settings.reduction,
        "token_reduction": settings.token_reduction,
        "created_utc": utc_now(), "settings": json.dumps(settings.content_dict()),
        "layer_names": json.dumps(layer_names), "n_dataset": len(source), "data_fingerprint": _fingerprint(source),
    }


def _fingerprint(source: ImageSource) -> str:
    """The dataset's identity for --resume: its size and every image's path (a folder can gain images)."""
    digest = hashlib.sha256(f"{len(source)}\n".encode())
    for i in range(len(source)):
        digest.update(f"{source.path(i)}\t{source.label(i)}\n".encode())
    return digest.hexdigest()


def _skip_added(old: str, new: str) -> bool:
    """--on-bad-image fail stops before the first bad image, so its rows are those of a skip run:
    continuing with skip is exact (the advice the bad-image error gives)."""
    old, new = json.loads(old), json.loads(new)
    return old.get("on_bad_image") == "fail" and new.get("on_bad_image") == "skip" and \
        {**old, "on_bad_image": "skip"} == new


RESUME_KEYS = ("model", "checkpoint_sha256", "data", "data_root", "n_dataset", "data_fingerprint", "settings",
               "layer_names", "transform")


def _check_resumable(writer: ActivationWriter, attrs: dict) -> None:
    differences = []
    for key in RESUME_KEYS:
        old = writer.h5.attrs.get(key)
        if key == "data_fingerprint" and old is None:  # written before misbench stored it: n_dataset decides
            continue
        if hasattr(old, "item"):
            old = old.item()
        if key == "settings" and old != attrs[key] and _skip_added(old, attrs[key]):
            continue
        if old != attrs[key]:
            differences.append(f"{key} was {old!r}, now {attrs[key]!r}")
    if differences:
        raise MisbenchError(
            f"cannot resume {writer.path}: it was started with other inputs or settings ({'; '.join(differences)}). "
            "Run the original command with --resume, or start again with --overwrite."
        )


def extract(loaded: LoadedModel, data: str | ImageSource, out, settings: ExtractSettings,
            resume: bool = False, overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None, trust_pickle: bool = False) -> Path:
    """Extract activations of `loaded` on `data` into `out` (atomic: `out` appears only when complete).

    Under torchrun each rank extracts a contiguous block of rows into its own part file; rank 0
    then merges the parts into one file with exactly the content of a one-process run.
    """
    out = Path(out)
    inputs = {"MODEL": model_input_file(loaded.spec),
              **{f"--features {spec}": parse_features(spec).file for spec in settings.features}}
    with writing({"--out": out}, inputs, "misbench extract", data_folders({"--data": data})):
        return _extract(loaded, data, out, settings, resume, overwrite, progress, trust_pickle)


def _extract(loaded, data, out: Path, settings: ExtractSettings, resume: bool, overwrite: bool, progress,
             trust_pickle: bool = False) -> Path:
    source = load_data(data, loaded.num_classes, settings.labels, loaded.categories) if isinstance(data, str) else data
    model = loaded.model
    pre = loaded.preprocess.override(settings.resize, settings.crop)
    probe_device = next(model.parameters()).device
    probe = torch.zeros(1, 3, pre.crop, pre.crop, device=probe_device)
    requests = resolve_layers(model, settings.layers, probe=probe)
    features = resolve_features(model, settings.features, [r.name for r in requests], probe, trust_pickle)
    requests += [LayerRequest(name, module, "features") for name, (module, _) in features.items()]
    _check_cls(model, requests, settings.token_reduction)
    partial = partial_path(out)
    rank, size = distributed.world()
    refuse_existing({"out": out}, overwrite)  # with overwrite, the old file stays until the new one is complete
    own = partial if size == 1 else part_path(out, rank, size)
    if own.exists() and not (resume or overwrite):
        raise MisbenchError(f"an interrupted extraction exists at {own}: pass {flag_hint('resume')} to continue it or "
                            f"{flag_hint('overwrite')} to restart")
    if resume and not own.exists():
        log.info("nothing to resume at %s; starting from the beginning", own)
        resume = False
    subset = first_images(source, settings.limit)
    total = subset.images
    # whole batches per rank: every image is computed in the same batch as in one process (bit-identical)
    first, last = distributed.block(-(-total // settings.batch_size), rank, size)
    start, stop = min(first * settings.batch_size, total), min(last * settings.batch_size, total)
    attrs = _file_attrs(loaded, source, settings, pre, [r.name for r in requests])
    if subset.record():  # the images a limit took and the classes they cover
        attrs["subset"] = json.dumps(subset.record())
    device = resolve_device(settings.device)
    distributed.ensure_initialized(device)
    writer = _open_writer(own, attrs, resume, start, features)
    try:
        _run(model, source, requests, settings, pre, writer, stop, device, progress, features)
        if size == 1:
            writer.finish()
        else:
            writer.commit()  # rank 0 finishes the merged file
    except (OSError, RuntimeError) as err:
        full = disk_full_error(err, own, "the interrupted extraction is kept: free space, then rerun with --resume")
        if full is None:
            raise
        writer.broken = True
        raise full from None
    finally:
        writer.close()
    if size > 1:
        distributed.barrier()
        if rank == 0:
            merge_activation_parts([part_path(out, r, size) for r in range(size)], partial)
            for r in range(size):
                part_path(out, r, size).unlink()
            os.replace(partial, out)
        distributed.barrier()
        return out
    os.replace(partial, out)
    return out


def _check_dictionaries(writer: ActivationWriter, features: dict) -> None:
    """A dictionary file changed in place since the interrupted run (retrained, re-exported) would give the rows
    still to come other features than the rows written: refused, like a changed checkpoint."""
    for name, (_, dictionary) in features.items():
        group = writer.h5["layers"].get(name)
        old = group.attrs.get("dictionary_sha256") if group is not None else None
        if old is not None and old != dictionary.sha256:
            raise MisbenchError(f"cannot resume {writer.path}: the dictionary file {dictionary.path} of feature layer "
                                f"{name!r} changed since the extraction started (sha256 {old[:12]}..., now "
                                f"{dictionary.sha256[:12]}...). Restore it and rerun with --resume, or start again "
                                "with --overwrite.")


def _open_writer(own: Path, attrs: dict, resume: bool, start: int, features: dict) -> ActivationWriter:
    """A new partial file, or the interrupted one when it can be continued exactly (else start again)."""
    if resume:
        try:
            writer = ActivationWriter(own, resume=True)
        except PartialUnusable as err:
            log.warning("cannot resume %s (%s): starting again from the first image", own, err)
        else:
            try:
                _check_resumable(writer, attrs)
                _check_dictionaries(writer, features)
            except BaseException:
                writer.close()
                raise
            writer.h5.attrs["settings"] = attrs["settings"]
            log.info("resuming %s at dataset index %d (%d rows written)", own, writer.next_index, writer.rows)
            return writer
    return ActivationWriter(own, attrs, start=start)


def _check_cls(model, requests, token_reduction: str) -> None:
    grids = channels_last_modules(model)
    if token_reduction == "cls" and any(r.module in grids for r in requests):
        name = next(r.module for r in requests if r.module in grids)
        raise MisbenchError(f"--token-reduction cls: layer {name!r} is a token grid without a class token "
                            "(Swin); use --token-reduction mean or max")


def _layer_attrs(req, layout: str, n_units: int, settings: ExtractSettings, features: dict) -> dict:
    """attrs of /layers/<name>: kind from the output's layout, and the reduction that made one value per unit."""
    if req.kind in ("logits", "softmax"):
        return {"module": "", "kind": req.kind, "n_units": n_units, "reduction": settings.reduction}
    kind = LAYER_KINDS[layout]
    reduction = settings.reduction if kind != "token" else settings.token_reduction
    attrs = {"module": req.module, "kind": kind, "n_units": n_units, "reduction": reduction}
    if kind == "token":
        attrs["token_reduction"] = settings.token_reduction
    if req.kind == "features":
        dictionary = features[req.name][1]
        attrs.update(kind="features", layer_kind=kind, dictionary_file=dictionary.path,
                     dictionary_sha256=dictionary.sha256, dictionary_format=dictionary.format,
                     activation=dictionary.activation,
                     n_features=dictionary.n_features, width=dictionary.width)
    return attrs


def _refuse_non_finite(layers: dict, index: np.ndarray, source: ImageSource, dtype: str) -> None:
    """NaN/inf activations cannot be ranked (DESIGN §8): stop before they reach the file."""
    for name, values in layers.items():
        bad = non_finite_rows(values.ravel())
        if len(bad):
            row, unit = divmod(int(bad[0]), values.shape[1])
            image = source.path(int(index[row])) or f"dataset index {int(index[row])}"
            hint = " (inf in a float16 file may be an overflow: try --dtype float32)" if dtype == "float16" else ""
            raise MisbenchError(
                f"layer {name} unit {unit} gave a non-finite activation ({values.ravel()[bad[0]]}) for image {image} "
                f"({len(bad)} non-finite values in this batch){hint}: MIS cannot rank NaN/inf; check the model's "
                "weights (a diverged or damaged checkpoint)")


def _run(model, source, requests, settings, pre, writer, total, device, progress, features=None):
    features = features or {}
    model = prepare_model(model, device).eval()
    # each image's content digest, hashed in the workers that read it: score checks the images it reads back
    dataset = TransformedDataset(source, build_transform(pre), (3, pre.crop, pre.crop), writer.next_index, total,
                                 digests=True)
    loader = make_loader(dataset, settings.batch_size, settings.workers, device)
    module_names = [r.module for r in requests if r.module and r.kind != "features"]
    encoders = {name: (module, lambda x, d=dictionary: encode(x, d)) for name, (module, dictionary) in features.items()}
    dtype = storage_dtypes(requests, settings.dtype)
    k = parse_keep(settings.keep)
    topk: dict[str, TopK] = {}
    layer_attrs = {}
    done = writer.next_index
    log.info("extracting images %d to %d on %s", done, total - 1, describe(device, settings.workers, settings.amp))
    if progress:
        progress(done, total)
    with FeatureHooks(model, module_names, settings.reduction, settings.token_reduction,
                      channels_last_modules(model), encoders) as hooks, torch.inference_mode():
        for x, labels, index, ok, digests in loader:
            bad = [source.path(int(i)) or str(int(i)) for i, good in zip(index, ok) if not good]
            if bad and settings.on_bad_image == "fail":
                root = source.root or source.spec
                raise MisbenchError(
                    f"unreadable images in {root}: {', '.join(bad)}. Fix them (same file names) and rerun with --resume, "
                    "or rerun with --on-bad-image skip --resume to leave them out (their paths are recorded "
                    "in the file)."
                )
            with precision(device, settings.amp):
                logits = model(to_device(x, device))
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            logits = logits.float()
            recorded = hooks.collect()
            keep = ok.numpy().astype(bool)
            columns = []
            for req in requests:
                if req.kind == "logits":
                    values = logits
                elif req.kind == "softmax":
                    values = torch.softmax(logits, dim=1)
                else:
                    values = recorded[req.name if req.kind == "features" else req.module].float()
                columns.append(values)
                if req.name not in layer_attrs:
                    layer_attrs[req.name] = _layer_attrs(req, hooks.layouts.get(req.module, "flat"), values.shape[1],
                                                         settings, features)
            # one device-to-host copy per batch, not one per layer (GoogLeNet has 58)
            host = torch.cat([logits, *columns], dim=1).cpu().numpy()[keep]
            host_logits, bounds = host[:, :logits.shape[1]], np.cumsum([logits.shape[1]] + [c.shape[1] for c in columns])
            layers = {req.name: host[:, a:b].astype(dtype[req.name]) for req, a, b in zip(requests, bounds[:-1], bounds[1:])}
            index_np = index.numpy()
            _refuse_non_finite(layers, index_np[keep], source, settings.dtype)
            states = {}
            if k:
                rows = writer.rows + np.arange(int(keep.sum()))
                for name, values in layers.items():
                    if name not in topk:
                        topk[name] = TopK(name, values.shape[1], k, writer.topk_state(name))
                    topk[name].update(values, rows, index_np[keep])
                    states[name] = topk[name]  # ranked when the writer commits, not every batch
                layers = {}
            writer.append(index_np[keep], [source.path(int(i)) for i in index_np[keep]],
                          labels.numpy()[keep], host_logits, layers, layer_attrs, dtype,
                          next_index=int(index_np[-1]) + 1, skipped=bad, topk=states,
                          digests=np.array(digests, dtype=f"S{DIGEST_CHARS}")[keep])
            done = int(index_np[-1]) + 1
            if progress:
                progress(done, total)
    if writer.rows == 0 and distributed.world()[1] == 1:
        raise MisbenchError("no image was extracted: the dataset (after --limit and skipped images) is empty")

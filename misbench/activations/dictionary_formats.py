"""Dictionary files of other libraries, recognised by content and mapped onto misbench's encoder form
f = act((x - b_dec) W_enc^T + b_enc) (docs/formats.md has each layout and where it was read from).

Each format is a registry entry: `detect(obj) -> bool` on what the file holds, `convert(obj, path) -> dict` with
W_enc [K, D], b_enc [K], b_dec [D] or None, activation, threshold [K] or None (per-feature JumpReLU), and
optionally scale [K] (the pre-activations times it). Known layouts whose encode has another form are entries
whose convert refuses them by name.
The file itself is read once, as a torch file (weights_only), a saev checkpoint (one JSON line, then a torch
file) or a safetensors file (SAELens, with cfg.json beside it).
"""

__all__ = ["FORMATS", "register_format", "read_dictionary_file", "convert_dictionary"]

import io
import json
import pickle
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import MisbenchError
from ..registry import register

EXPECTED = ("a misbench dictionary (W_enc [K, D], b_enc [K]), a dictionary_learning ae.pt, a saev checkpoint, "
            "a SAELens sae_weights.safetensors or an Overcomplete SAE state_dict")
FORMATS: dict[str, tuple[Callable, Callable]] = {}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32}


def register_format(name: str, detect: Callable, convert: Callable) -> tuple:
    return register(FORMATS, name, (detect, convert), "dictionary format")


def _read_json(path: Path, what: str, of: Path):
    """A JSON object from `path` (cfg.json, config.json) that `of` needs: a damaged one is a one-line error."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _unreadable(path, exc, f"{of}'s {what}: a JSON object") from None
    if not isinstance(value, dict):
        raise MisbenchError(f"--features: {path} holds a JSON {type(value).__name__}; {of} needs its {what} as a "
                            "JSON object")
    return value


def _safetensors_tensor(data: bytes, start: int, key: str, info) -> torch.Tensor:
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    begin, stop = (int(v) for v in info["data_offsets"])
    shape = [int(n) for n in info["shape"]]
    if not 0 <= begin <= stop <= len(data) - start:
        raise ValueError(f"tensor {key} needs bytes {begin}-{stop} after the header, the file has "
                         f"{len(data) - start}: truncated")
    return torch.frombuffer(bytearray(data[start + begin:start + stop]), dtype=dtype).reshape(shape) \
        if stop > begin else torch.zeros(shape, dtype=dtype)


def _read_safetensors(path: Path) -> dict:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    out = {}
    try:
        header = json.loads(data[8:8 + size])
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise MisbenchError(f"--features: {path}: tensor {key} has dtype {info['dtype']}; expected one of "
                                    f"{', '.join(SAFETENSORS_DTYPES)}")
            out[key] = _safetensors_tensor(data, 8 + size, key, info)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise _unreadable(path, exc, "a complete safetensors file") from None
    cfg = path.with_name("cfg.json")
    out["__cfg__"] = _read_json(cfg, "SAELens config", path) if cfg.is_file() else None
    return out


def _unreadable(path: Path, exc: Exception, expected: str = EXPECTED) -> MisbenchError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return MisbenchError(f"--features: cannot read {path} ({type(exc).__name__}: {first[:200]}); expected {expected}")


def _torch_load(source, path: Path, trust_pickle: bool, head: bytes):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch's zip format nor a pickle: not a torch file
            raise _unreadable(path, err) from None
        if not trust_pickle:
            raise MisbenchError(f"--features: {path} is a pickled Python object, not plain tensors; expected "
                                f"{EXPECTED}. Loading it can run arbitrary code: pass --trust-pickle only if you "
                                "trust its origin") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same actionable message
        raise _unreadable(path, exc) from None
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        obj = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(path, exc) from None
    # a whole SAE module: its weights, and the module for what its state does not hold (class, top_k, thresholds)
    return {**obj.state_dict(), "__module__": obj} if isinstance(obj, torch.nn.Module) else obj


def read_dictionary_file(path, trust_pickle: bool = False):
    """The file's content: a dict of tensors (and for saev `__header__`, for SAELens `__cfg__`)."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: the header's length, then the header (JSON)
        if struct.unpack("<Q", head[:8])[0] + 8 <= path.stat().st_size:
            return _read_safetensors(path)
        if head[:1] != b"{":  # not a saev JSON line either ('{"cfg": {...' has its 9th byte '{' too)
            raise MisbenchError(f"--features: {path} starts like a safetensors file but its header runs past the "
                                f"end of the file ({path.stat().st_size} bytes): truncated; download or save it again")
    if head[:1] == b"{":  # saev: one JSON line, then torch.save's bytes
        with open(path, "rb") as handle:
            line = handle.readline()
            payload = io.BytesIO(handle.read())
        try:
            header = json.loads(line)
        except ValueError as exc:
            raise _unreadable(path, exc, "a saev checkpoint (one JSON line, then torch.save's bytes); a config "
                              "file (cfg.json, config.json) is not a dictionary: give the weights file beside it") from None
        if not isinstance(header, dict):
            raise MisbenchError(f"--features: {path}: its first line is a JSON {type(header).__name__}; expected a "
                                "saev checkpoint (one JSON object line, then torch.save's bytes)")
        obj = _torch_load(payload, path, trust_pickle, payload.getvalue()[:2])
        if not isinstance(obj, dict):
            raise MisbenchError(f"--features: {path}: a JSON header followed by {type(obj).__name__}; expected "
                                "saev's state dict (W_enc, b_enc, W_dec, b_dec)")
        return {**obj, "__header__": header}
    return _torch_load(path, path, trust_pickle, head)


def _is(obj, *keys) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in keys)


# misbench's own files (train-dictionary, or written by hand)
def _native(obj, path):
    activation = obj.get("activation", "relu")
    if obj.get("threshold") is not None and activation != "jumprelu":  # it would be ignored, silently
        raise MisbenchError(f"--features: {path}: a per-feature threshold with activation {activation!r}; only "
                            "activation 'jumprelu' uses it: add activation='jumprelu' or remove threshold")
    layer = obj["training"].get("layer") if isinstance(obj.get("training"), dict) else None  # train-dictionary's record
    return {"W_enc": obj["W_enc"], "b_enc": obj["b_enc"], "b_dec": obj.get("b_dec"), "activation": activation,
            "threshold": obj.get("threshold"), "trained_layer": layer if isinstance(layer, str) else None}


# dictionary_learning: AutoEncoder (bias, encoder.*, decoder.weight) and AutoEncoderTopK / BatchTopKSAE
# (b_dec, k, threshold, encoder.*, decoder.weight); read from dictionary_learning/dictionary.py, trainers/top_k.py
def _dl_standard(obj, path):
    return {"W_enc": obj["encoder.weight"], "b_enc": obj["encoder.bias"], "b_dec": obj["bias"], "activation": "relu",
            "threshold": None}


def _dl_config(path: Path) -> Path | None:
    """training.py writes config.json beside ae.pt, and its checkpoints as checkpoints/ae_STEP.pt below it."""
    for folder in (path.parent, path.parent.parent) if path.parent.name == "checkpoints" else (path.parent,):
        if (folder / "config.json").is_file():
            return folder / "config.json"
    return None


def _dl_topk(obj, path):
    # AutoEncoderTopK.encode keeps each input's top k; BatchTopKSAE.encode applies its learned threshold
    # (a threshold below 0 is unset: ReLU alone). Both save the same keys: the training's config.json says which
    config = None if "activation" in obj or "__module__" in obj else _dl_config(path)
    trainer = _read_json(config, "training config", path).get("trainer") if config else None
    dict_class = trainer.get("dict_class") if isinstance(trainer, dict) else None
    if "__module__" in obj:  # a trusted pickle of the module itself names its class
        dict_class = type(obj["__module__"]).__name__
    if isinstance(trainer, dict):  # a config.json of another run (copied, or another trainer_N): refused, like
        # dictionary_learning's own from_pretrained refuses a k that is not the state's
        state = {"dict_size": obj["encoder.weight"].shape[0], "activation_dim": obj["encoder.weight"].shape[1],
                 "k": int(obj["k"])}
        other = [f"{key} {trainer[key]!r} (the file: {value})" for key, value in state.items()
                 if key in trainer and trainer[key] != value]
        if other:
            raise MisbenchError(f"--features: {path}: {config} describes another dictionary ({', '.join(other)}); "
                                "expected the config.json its training wrote beside it")
    if "activation" in obj:  # the encode given as an entry, as for Overcomplete
        activation = str(obj["activation"])
    elif dict_class == "BatchTopKSAE":
        activation = f"jumprelu:{max(float(obj['threshold']), 0.0)!r}"
    elif dict_class == "AutoEncoderTopK":
        activation = f"topk:{int(obj['k'])}"
    else:
        found = f"{config}, whose trainer.dict_class is {dict_class!r}," if config else "no config.json beside " \
            "it (or above its checkpoints/ folder)"
        raise MisbenchError(f"--features: {path}: a dictionary_learning AutoEncoderTopK or BatchTopKSAE (the two save "
                            f"the same keys, and encode differently) with {found}; expected the training's config.json "
                            "({\"trainer\": {\"dict_class\": \"AutoEncoderTopK\" or \"BatchTopKSAE\"}}) beside ae.pt")
    return {"W_enc": obj["encoder.weight"], "b_enc": obj["encoder.bias"], "b_dec": obj["b_dec"],
            "activation": activation, "threshold": None}


# dictionary_learning's W_enc-style classes (W_enc [D, K] as a Parameter, not an nn.Linear): JumpReluAutoEncoder
# (dictionary.py: W_enc, b_enc, W_dec, b_dec, threshold [K]; encode ReLU(pre * (pre > threshold)) with
# pre = x W_enc + b_enc: its apply_b_dec_to_input is False and not saved) and MatryoshkaBatchTopKSAE
# (trainers/matryoshka_batch_top_k.py: also k, threshold [] and group_sizes; encode at inference
# ReLU((x - b_dec) W_enc + b_enc) where it exceeds the threshold, a threshold below 0 being unset).
def _is_dl_jumprelu(obj) -> bool:
    return (_is(obj, "W_enc", "b_enc", "W_dec", "b_dec", "threshold") and not {"activation", "k", "__cfg__"} & set(obj)
            and isinstance(obj["threshold"], torch.Tensor) and obj["threshold"].dim() == 1)


def _is_dl_matryoshka(obj) -> bool:
    return _is(obj, "W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes")


def _dl_jumprelu(obj, path):
    return {"W_enc": obj["W_enc"].T, "b_enc": obj["b_enc"], "b_dec": None, "activation": "jumprelu",
            "threshold": obj["threshold"]}


def _dl_matryoshka(obj, path):
    return {"W_enc": obj["W_enc"].T, "b_enc": obj["b_enc"], "b_dec": obj["b_dec"],
            "activation": f"jumprelu:{max(float(obj['threshold']), 0.0)!r}", "threshold": None}


# saev: W_enc [D, K], b_enc, W_dec [K, D], b_dec; files without "schema" (the first releases) subtract b_dec before
# encoding and apply ReLU; schema 1 and 2 encode x W_enc + b_enc then Relu, TopK or BatchTopK (per input at
# inference), both keeping the top-k values as they are (no ReLU). Read from saev/nn/modeling.py.
def _saev(obj, path):
    header = obj["__header__"]
    if "schema" not in header:
        return {"W_enc": obj["W_enc"].T, "b_enc": obj["b_enc"], "b_dec": obj["b_dec"], "activation": "relu",
                "threshold": None}
    cfg = header.get("cfg", {})
    act = cfg.get("activation", {}) if isinstance(cfg, dict) else None
    if not isinstance(act, dict):
        raise MisbenchError(f"--features: {path}: saev header cfg.activation is {act!r}; expected "
                            '{"cls": "Relu" | "TopK" | "BatchTopK", "params": {...}}')
    name = act.get("cls") if isinstance(act, dict) else header.get("cls")
    params = act.get("params", {}) if isinstance(act, dict) else cfg
    if name in ("TopK", "BatchTopK"):
        activation = f"topkraw:{int(params.get('top_k', 32))}"
    elif name in ("Relu", "SparseAutoencoderConfig", None):
        activation = "relu"
    else:
        raise MisbenchError(f"--features: {path}: saev activation {name!r}; expected Relu, TopK or BatchTopK")
    return {"W_enc": obj["W_enc"].T, "b_enc": obj["b_enc"], "b_dec": None, "activation": activation,
            "threshold": None}


# SAELens: sae_weights.safetensors (W_enc [D, K], b_enc, W_dec [K, D], b_dec, threshold [K] for jumprelu) with
# cfg.json beside it (architecture standard | jumprelu | topk, apply_b_dec_to_input, k); read from sae_lens/saes/.
def _saelens_pre6(cfg: dict, path) -> dict:
    """A cfg.json written before SAELens 6 (no sae_lens_version, or below 6), read as SAELens 6 reads it
    (loading/pretrained_sae_loaders.py handle_pre_6_0_config): activation_fn_str `topk` with activation_fn_kwargs k
    is the topk architecture; a boolean normalize_activations is 'expected_average_only_in' or 'none'."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if version and str(version).split(".")[0].isdigit() and int(str(version).split(".")[0]) >= 6:
        return cfg
    cfg = {"activation_fn" if k == "activation_fn_str" else k: v for k, v in cfg.items()}
    fn, k = cfg.get("activation_fn", "relu"), (cfg.get("activation_fn_kwargs") or {}).get("k")
    if fn == "topk" and k is not None:
        cfg.update(architecture="topk", k=k)
    elif fn not in ("relu", None):
        raise MisbenchError(f"--features: {path}: a SAELens cfg.json from before 6.0 with activation_fn {fn!r}; "
                            "expected relu or topk (with activation_fn_kwargs k)")
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg


def _saelens(obj, path):
    if obj["__cfg__"] is None:
        raise MisbenchError(f"--features: {path}: a SAELens weights file needs its cfg.json beside it "
                            "(architecture, apply_b_dec_to_input)")
    cfg = _saelens_pre6(obj["__cfg__"], path)
    shape = {"d_in": obj["W_enc"].shape[0], "d_sae": obj["W_enc"].shape[-1]}  # W_enc [D, K]
    other = [f"{key} {cfg[key]!r} (the weights: {value})" for key, value in shape.items()
             if key in cfg and cfg[key] != value]
    if other:  # the cfg.json of another SAE beside these weights: its architecture and k are not theirs
        raise MisbenchError(f"--features: {path}: the cfg.json beside it describes another SAE ({', '.join(other)}); "
                            "expected the cfg.json saved with these weights")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise MisbenchError(f"--features: {path}: cfg.json normalize_activations={cfg['normalize_activations']!r}; "
                            "only 'none' is supported (misbench applies the encoder to raw activations)")
    arch = cfg.get("architecture", "standard")
    b_dec = obj["b_dec"] if cfg.get("apply_b_dec_to_input", True) else None
    threshold = None
    if arch == "standard":
        activation = "relu"
    elif arch == "topk":
        activation = f"topk:{int(cfg['k'] if 'k' in cfg else cfg['activation_fn_kwargs']['k'])}"
        if cfg.get("rescale_acts_by_decoder_norm"):  # TopKSAE.encode scales pre by |W_dec row| (its default in
            # training): kept as a scale applied after b_enc, as SAELens does (folded into W_enc, float32 rounds
            # differently: up to 1.5e-5 apart on unit-scale inputs)
            return {"W_enc": obj["W_enc"].T, "b_enc": obj["b_enc"], "b_dec": b_dec, "activation": activation,
                    "threshold": None, "scale": obj["W_dec"].detach().float().norm(dim=-1)}
    elif arch == "jumprelu":  # SAELens' earlier files store log_threshold; it loads them as exp(log_threshold)
        activation = "jumprelu"
        threshold = obj["threshold"] if "threshold" in obj or "log_threshold" not in obj else \
            torch.exp(obj["log_threshold"].detach().double()).float()
    else:
        hint = ": a training file, save it with save_inference_model (a jumprelu file)" if "batchtopk" in str(arch) \
            else ""
        raise MisbenchError(f"--features: {path}: SAELens architecture {arch!r}{hint}; expected standard, topk or "
                            "jumprelu")
    return {"W_enc": obj["W_enc"].T, "b_enc": obj["b_enc"], "b_dec": b_dec, "activation": activation,
            "threshold": threshold}


# Overcomplete (KempnerInstitute/overcomplete): SAE and its subclasses with the default encoder ("linear":
# MLPEncoder with no hidden block and no norm) save encoder.final_block.0.weight [K, D] and .bias [K] beside their
# dictionary (dictionary._weights [K, D], or the archetypal dictionary's C, W, Relax) and encode
# codes = relu(x W^T + b); then TopKSAE / RATopKSAE keep each input's top_k codes, BatchTopKSAE (at inference) the
# codes >= its running_threshold, JumpSAE / RAJumpSAE the codes >= exp(thresholds) with `thresholds` [K] a key of
# its own. top_k and running_threshold are plain attributes, not state: a state_dict without `thresholds` cannot
# say which encode is its own, so it needs an `activation` entry added (relu, topk:K or jumprelu:T). Read from
# overcomplete/sae/base.py, modules.py (MLPEncoder, TieableEncoder), factory.py, topk_sae.py, batchtopk_sae.py,
# jump_sae.py, rasae.py, qsae.py, mp_sae.py, omp_sae.py (0.3.0).
OVERCOMPLETE_ENCODER = ("encoder.final_block.0.weight", "encoder.final_block.0.bias")
OVERCOMPLETE_OTHERS = ("QSAE (its quantised codes, key Q), MpSAE and OMPSAE (matching pursuit over the dictionary), "
                       "and SAEs with an mlp_*, resnet_*, attention_* or tied encoder")


def _overcomplete_module_activation(module) -> str | None:
    """The encode of a trusted pickled Overcomplete module, from its class and attributes (None: not known)."""
    name = type(module).__name__
    if name == "SAE":
        return "relu"
    if name in ("TopKSAE", "RATopKSAE"):
        return f"topk:{int(module.top_k)}"
    if name == "BatchTopKSAE" and getattr(module, "running_threshold", None) is not None:
        return f"jumprelu:{float(module.running_threshold)!r}"  # its inference encode, after training steps
    return None


def _overcomplete(obj, path):
    encoder = sorted(str(k) for k in obj if str(k).startswith("encoder.") and k not in OVERCOMPLETE_ENCODER)
    if encoder or "Q" in obj:
        raise MisbenchError(f"--features: {path}: an Overcomplete SAE with {encoder[0] if encoder else 'key Q'}; "
                            "misbench reads SAE, TopKSAE, BatchTopKSAE, JumpSAE and the RA variants with the default "
                            f"'linear' encoder, not {OVERCOMPLETE_OTHERS}")
    threshold = None
    if "thresholds" in obj:  # JumpSAE: JumpReLU at exp(thresholds) of the ReLU codes
        activation, threshold = "jumprelu", torch.exp(obj["thresholds"].detach().double()).float()
    elif "activation" in obj:
        activation = str(obj["activation"])
    elif _overcomplete_module_activation(obj.get("__module__")):
        activation = _overcomplete_module_activation(obj["__module__"])
    else:
        raise MisbenchError(f"--features: {path}: an Overcomplete SAE state_dict records neither its class nor top_k "
                            "(SAE, TopKSAE and BatchTopKSAE save the same keys): add the encode as an "
                            "entry, torch.save({**sae.state_dict(), 'activation': A}, FILE) with A = 'relu' (SAE), "
                            "'topk:K' (TopKSAE, RATopKSAE: K = sae.top_k) or 'jumprelu:T' (BatchTopKSAE: "
                            f"T = sae.running_threshold); {OVERCOMPLETE_OTHERS} are not read")
    return {"W_enc": obj["encoder.final_block.0.weight"], "b_enc": obj["encoder.final_block.0.bias"], "b_dec": None,
            "activation": activation, "threshold": threshold}


register_format("misbench", lambda o: _is(o, "W_enc", "b_enc") and "__cfg__" not in o and "__header__" not in o
                and not _is_dl_jumprelu(o) and not _is_dl_matryoshka(o), _native)
register_format("dictionary_learning", lambda o: _is(o, "encoder.weight", "encoder.bias", "bias"), _dl_standard)
register_format("dictionary_learning-topk", lambda o: _is(o, "encoder.weight", "encoder.bias", "b_dec", "k"), _dl_topk)
register_format("dictionary_learning-jumprelu", _is_dl_jumprelu, _dl_jumprelu)
register_format("dictionary_learning-matryoshka", _is_dl_matryoshka, _dl_matryoshka)
register_format("saev", lambda o: isinstance(o, dict) and "__header__" in o and _is(o, "W_enc", "b_enc", "b_dec"),
                _saev)
register_format("overcomplete", lambda o: _is(o, *OVERCOMPLETE_ENCODER), _overcomplete)
register_format("saelens", lambda o: isinstance(o, dict) and "__cfg__" in o and _is(o, "W_enc", "b_enc", "b_dec"),
                _saelens)

# Known layouts that are not one encoder act(x W^T + b), refused by name (read from the same sources as above)
NOT_READ = {"dictionary_learning GatedAutoEncoder (a gate and a magnitude path)": ("gate_bias", "mag_bias", "r_mag"),
            "SAELens gated SAE (a gate and a magnitude path)": ("b_gate", "b_mag", "r_mag")}


def _overcomplete_without_encoder(obj) -> bool:
    # MpSAE, OMPSAE (matching pursuit over the dictionary) and the 'identity' encoder save only the dictionary
    return isinstance(obj, dict) and bool(obj) and any(k in obj for k in ("dictionary._weights", "dictionary.C")) \
        and all(str(k).startswith(("dictionary.", "__")) or k == "activation" for k in obj)


def _not_read(obj, path):
    name = next((n for n, keys in NOT_READ.items() if _is(obj, *keys)), None) or \
        "an Overcomplete SAE without an encoder (MpSAE, OMPSAE or the 'identity' encoder: its codes come from " \
        "matching pursuit or the input itself)"
    raise MisbenchError(f"--features: {path}: {name}; misbench reads encoders of the form act(x W_enc^T + b_enc), "
                        f"expected {EXPECTED}")


register_format("not-read", lambda o: any(_is(o, *keys) for keys in NOT_READ.values())
                or _overcomplete_without_encoder(o), _not_read)


def convert_dictionary(obj, path) -> tuple[str, dict]:
    """(format name, the encoder in misbench's form) of a file's content; float32 tensors, checked finite."""
    path = Path(path)
    for name, (detect, convert) in FORMATS.items():
        if detect(obj):
            try:
                out = convert(obj, path)
            except KeyError as exc:
                raise MisbenchError(f"--features: {path}: a {name} file without its {exc.args[0]!r} entry; expected "
                                    "the layout in docs/formats.md (save it again with the library)") from None
            except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
                first = (str(exc).splitlines() or [""])[0][:200]
                raise MisbenchError(f"--features: {path}: a {name} file with an entry of the wrong type or shape "
                                    f"({type(exc).__name__}: {first}); expected the layout in docs/formats.md") from None
            for key in ("W_enc", "b_enc", "b_dec", "threshold", "scale"):
                value = out.get(key)
                if value is None:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise MisbenchError(f"--features: {path} ({name} format): {key} is {type(value).__name__}; "
                                        "expected a tensor")
                if value.is_meta or value.layout != torch.strided:
                    raise MisbenchError(f"--features: {path} ({name} format): {key} is a "
                                        f"{'meta (data-less)' if value.is_meta else str(value.layout)} tensor; expected "
                                        "a dense tensor holding its values (save the weights themselves)")
                if not value.dtype.is_floating_point or value.is_complex():
                    raise MisbenchError(f"--features: {path}: {key} is {value.dtype}; a dictionary holds real "
                                        "floating-point tensors")
                value = value.detach().float()  # checked after the cast: float64 beyond float32's range is inf
                if not torch.isfinite(value).all():
                    bad = int((~torch.isfinite(value)).sum())
                    raise MisbenchError(f"--features: {path} ({name} format): {key} holds non-finite values (NaN or "
                                        f"inf: {bad}): the dictionary's training diverged or the file is "
                                        "damaged; train or export it again")
                out[key] = value
            return name, out
    keys = sorted(k for k in obj if not str(k).startswith("__")) if isinstance(obj, dict) else type(obj).__name__
    nested = isinstance(obj, dict) and (any(isinstance(v, dict) for v in obj.values()) or
                                        any(str(k).startswith(("module.", "_orig_mod.")) for k in obj))
    hint = " (its weights look nested in a training checkpoint or prefixed by DDP/torch.compile: save the SAE's own " \
        "state_dict())" if nested else ""
    raise MisbenchError(f"--features: {path} holds {np.array(keys, dtype=object).tolist()[:20] if keys else '{}'}; "
                        f"unknown dictionary format{hint}: expected {EXPECTED}")

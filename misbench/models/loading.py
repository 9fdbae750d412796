"""Load any MODEL string (DESIGN §3) into an nn.Module with its provenance."""

__all__ = ["LoadedModel", "load_model", "load_seeded", "torchvision_weights", "hub_checkpoint_path", "load_torch_file", "read_hub_weights",
           "hub_file_sha256", "check_finite",
           "pretrained_torchvision", "effective_kwargs", "model_input_file", "classes_before_loading", "RANDOM"]

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import threading
from pathlib import Path

import torch
from torch import nn
from torch.hub import HASH_REGEX, download_url_to_file

from ..errors import MisbenchError
from ..runtime.fileio import atomic_path, sha256_file
from .asset_table import stage_hint
from .archs import build_arch, check_arch, default_preprocess, load_state, own_archs
from .checkpoint import is_checkpoint, read_checkpoint
from .families import family_of
from .preprocess import IMAGENET_PREPROCESS, Preprocess

log = logging.getLogger(__name__)

RANDOM = "random"  # MODEL `name:random`: a randomly initialised network


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    spec: str
    arch: str
    arch_kwargs: dict
    num_classes: int
    preprocess: Preprocess
    sha256: str = ""
    checkpoint: dict | None = None  # the misbench checkpoint record without state_dict
    categories: list | None = None  # class names from torchvision's weights metadata

    @property
    def masks(self) -> dict:
        return (self.checkpoint or {}).get("masks") or {}


def hub_checkpoint_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def model_input_file(spec: str) -> str:
    """The file MODEL `spec` is read from: the hub-cache file behind a torchvision `name:WEIGHTS`, else `spec`.

    Output paths are checked against it: a command must never write over the weights it reads."""
    arch, sep, weights_name = str(spec).partition(":")
    if not sep or weights_name == RANDOM or arch in own_archs() or Path(str(spec)).exists():
        return str(spec)
    try:
        return str(hub_checkpoint_path(torchvision_weights(arch, weights_name).url))
    except MisbenchError:
        return str(spec)


def torchvision_weights(arch: str, weights_name: str):
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError) as err:
        raise MisbenchError(f"torchvision has no weights for {arch!r}: {err}") from None
    if weights_name == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights_name]
    except KeyError:
        raise MisbenchError(
            f"unknown weights {weights_name!r} for {arch!r}: expected DEFAULT or one of "
            f"{[w.name for w in enum]}"
        ) from None


def _download(url: str, target: Path) -> None:
    log.info("weights %s not in the hub cache; trying to download %s", target.name, url)
    match = HASH_REGEX.search(target.name)
    try:
        with atomic_path(target) as tmp:
            download_url_to_file(url, str(tmp), match.group(1) if match else None, progress=False)
    except Exception as err:  # offline: URLError, socket errors, HTTP errors, hash mismatch
        raise MisbenchError(
            f"weights file {target.name} is not in the torch hub cache and could not be downloaded "
            f"({type(err).__name__}: {err}). Put the file at {target} (download it from {url} "
            f"on a machine with internet); {stage_hint(target.name)}."
        ) from None


def read_hub_weights(url: str) -> dict:
    """The state_dict behind a torchvision weights URL, from the hub cache (downloaded when absent).

    Read with weights_only=True, never as a whole pickle: a hub-cache file is as untrusted as any
    other file, and torchvision's own loader would unpickle it with weights_only=False.
    """
    target = hub_checkpoint_path(url)
    if not target.exists():
        _download(url, target)
    try:  # weights_only: safe to read before the hash check, and a pickle gets its own error
        state = torch.load(target, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise MisbenchError(
            f"{target} holds pickled Python objects, not plain tensors ({str(err).splitlines()[0]}); misbench "
            f"refuses to load it because unpickling can run code. Delete it and download {url} again "
            f"(or stage the official file)."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise MisbenchError(f"cannot read the weights file {target} ({str(err).splitlines()[0]}): delete it "
                            f"and download {url} again") from None
    hub_file_sha256(target, url)
    check_finite(state, target, f"delete it and download {url} again")
    return state


_VERIFIED: dict = {}  # (path, size, mtime) -> sha256 of hub files already checked by this process


def hub_file_sha256(target: Path, url: str = "") -> str:
    """The sha256 of a weights file named as torchvision names them (`name-<first hex digits of its sha256>.pth`),
    checked against its name as torch.hub's check_hash does: a damaged file, or another model's weights under the
    official name, is refused instead of giving NaN or quietly wrong scores."""
    stat = target.stat()
    key = (str(target), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        digest = sha256_file(target)
        match = HASH_REGEX.search(target.name)
        if match and not digest.startswith(match.group(1)):
            fetch = f"download {url} again" if url else "fetch the official file again"
            raise MisbenchError(
                f"{target} is damaged or not the file its name promises: its sha256 starts {digest[:len(match.group(1))]}"
                f", the name says {match.group(1)}; delete it and {fetch} ({stage_hint(target.name)})")
        _VERIFIED[key] = digest
    return _VERIFIED[key]


def check_finite(state, source, fix: str = "use an intact file (or retrain: a diverged run writes NaN)") -> None:
    """Refuse a state_dict (or a module's) with a NaN or inf weight, naming the file and the tensor."""
    items = state.state_dict().items() if isinstance(state, nn.Module) else (state or {}).items()
    for name, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise MisbenchError(f"{source}: {name} holds {bad} non-finite value(s) (NaN or inf), so every activation "
                                f"and score would be NaN; {fix}")


_HUB_PATCH = threading.Lock()


@contextlib.contextmanager
def _plain_tensor_hub():
    """Make torchvision's builders read weights through read_hub_weights (weights_only=True).

    Every torchvision builder fetches its state_dict with WeightsEnum.get_state_dict, which calls the
    load_state_dict_from_url imported into torchvision.models._api; replacing that one name keeps
    each builder's own quirks (GoogLeNet and Inception v3 build with aux heads, load, then drop them;
    DenseNet renames keys) while no file is ever unpickled.
    """
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    from torchvision.models import _api

    with _HUB_PATCH:
        original = _api.load_state_dict_from_url
        _api.load_state_dict_from_url = lambda url, *args, **kwargs: read_hub_weights(url)
        try:
            yield
        finally:
            _api.load_state_dict_from_url = original


def pretrained_torchvision(arch: str, weights, arch_kwargs: dict | None = None) -> nn.Module:
    """torchvision.models.get_model(arch, weights=weights, **arch_kwargs), every file read as plain tensors."""
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    import torchvision

    kwargs = dict(arch_kwargs or {})
    try:
        with _plain_tensor_hub():
            model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    except (ValueError, TypeError) as err:
        raise MisbenchError(f"torchvision's {arch} builder with weights {weights.name} refuses --arch-kwargs "
                            f"{json.dumps(kwargs)}: {err}") from None
    except RuntimeError as err:  # load_state_dict: a cached file of another architecture
        raise MisbenchError(
            f"{hub_checkpoint_path(weights.url)} does not fit torchvision's {arch} ({str(err).splitlines()[0]} ...): "
            f"delete it and download {weights.url} again") from None
    return model.eval()


# attributes of torchvision models that change the forward pass but not the state_dict layout
RECORDED_ATTRS = ("transform_input", "aux_logits")


def effective_kwargs(model: nn.Module, given: dict | None) -> dict:
    """The builder arguments that rebuild `model`: those given plus the recorded attributes it has."""
    kwargs = dict(given or {})
    for attr in RECORDED_ATTRS:
        if hasattr(model, attr):
            kwargs[attr] = bool(getattr(model, attr))
    return kwargs


def _log_transform_input(arch: str, kwargs: dict, source: str) -> None:
    if "transform_input" in kwargs:
        log.info("%s: %s builds with transform_input=%s (%s); override with --arch-kwargs "
                 "'{\"transform_input\": %s}'", source, arch, kwargs["transform_input"],
                 "the ImageNet weights' input scaling" if kwargs["transform_input"] else "inputs used as given",
                 "false" if kwargs["transform_input"] else "true")


def _preprocess_of(weights) -> Preprocess:
    t = weights.transforms()
    return Preprocess(int(t.resize_size[0]), int(t.crop_size[0]), tuple(t.mean), tuple(t.std))


def _no_weights_error(arch: str) -> MisbenchError:
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    import torchvision

    try:
        names = [w.name for w in torchvision.models.get_model_weights(arch)] + ["DEFAULT"]
    except (ValueError, KeyError):
        names = []
    offer = f"{arch}:WEIGHTS for pretrained weights ({', '.join(names)})" if names else "no pretrained weights exist"
    return MisbenchError(f"model {arch!r} names no weights: write {offer}, or {arch}:random for a randomly "
                         f"initialised network")


def classes_before_loading(spec: str, arch: str | None = None, num_classes: int | None = None):
    """(num_classes, categories) of MODEL `spec` where its name says them without building or reading a model
    (a torchvision `name:WEIGHTS` by its weights' metadata, `name:random` and misbench's own architectures by
    --num-classes or 1000); None for a file, or a spec load_model will refuse. Lets DATA be checked against the
    model's classes before a load of a minute or more."""
    name, sep, weights_name = str(spec).partition(":")
    if Path(str(spec)).exists() or arch is not None or "/" in str(spec):
        return None
    try:
        if name in own_archs() and weights_name in ("", RANDOM) or sep and weights_name == RANDOM:
            check_arch(name)
            return num_classes or 1000, None
        if not sep or family_of(name) is not None:
            return None
        categories = list(torchvision_weights(name, weights_name).meta["categories"])
    except MisbenchError:  # load_model says what is wrong with the spec
        return None
    return (len(categories), categories) if num_classes in (None, len(categories)) else None


def _from_torchvision(spec: str, num_classes: int | None, arch_kwargs: dict | None = None) -> LoadedModel:
    arch, sep, weights_name = spec.partition(":")
    given = dict(arch_kwargs or {})
    if arch in own_archs():
        # misbench's own architectures have no pretrained weights: the bare name is unambiguous
        if weights_name not in ("", RANDOM):
            raise MisbenchError(f"{arch} is one of misbench's own architectures and has no pretrained weights: "
                                f"write {arch} or {arch}:random")
        model = build_arch(arch, num_classes or 1000, given)
        return LoadedModel(model, spec, arch, given, num_classes or 1000, default_preprocess(arch))
    check_arch(arch)
    family = family_of(arch)
    if family is not None and weights_name != RANDOM:
        raise MisbenchError(f"{spec}: {family.name} models are built randomly initialised only ({arch}:random; "
                            f"{family.why_random}); "
                            f"for trained weights pass a state_dict file with --arch {arch}")
    if not sep:
        raise _no_weights_error(arch)
    if weights_name == RANDOM:
        model = build_arch(arch, num_classes or 1000, given)
        kwargs = effective_kwargs(model, given)
        _log_transform_input(arch, kwargs, spec)
        return LoadedModel(model, spec, arch, kwargs, num_classes or 1000, default_preprocess(arch))
    weights = torchvision_weights(arch, weights_name)
    categories = list(weights.meta["categories"])
    if num_classes not in (None, len(categories)):
        raise MisbenchError(f"{spec} has {len(categories)} classes, but --num-classes {num_classes} was given")
    model = pretrained_torchvision(arch, weights, given)
    kwargs = effective_kwargs(model, given)
    _log_transform_input(arch, kwargs, spec)
    return LoadedModel(model, spec, arch, kwargs, len(categories), _preprocess_of(weights),
                       sha256=hub_file_sha256(hub_checkpoint_path(weights.url), weights.url), categories=categories)


# files that are no model, by their first bytes: what each is and which command reads it
_NOT_MODELS = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (an activation file of `misbench extract`, or score's --tasks-out)",
     "`misbench score`, `eval --acts` or `report classwise --acts` read activation files"),
    (b"PK\x03\x04", None, None),  # a zip: torch.save's own format, loaded below
    (b"{", "a JSON file (eval.json, mis.json, a calibration or a manifest)",
     "`report classwise --eval` reads eval.json; `score --alpha-from` a calibration"),
    (b"[", "a JSON file", "no command takes it as a MODEL"),
    (b"layer,unit", "a mis.csv of `misbench score`", "`misbench report` and `merge-scores` read it"),
    (b"\x89PNG", "a PNG image", "images go into --data DATA (a folder of images)"),
    (b"\xff\xd8\xff", "a JPEG image", "images go into --data DATA (a folder of images)"),
)


def _not_a_model(path) -> MisbenchError | None:
    """A one-line error for a MODEL file that is recognisably something else (by content, not by name)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return None
    if not head:
        return MisbenchError(f"{path} is empty (0 bytes), not a model: a copy or download that did not finish? "
                             "Write or fetch it again")
    for magic, what, reader in _NOT_MODELS:
        if head.startswith(magic) and what:
            return MisbenchError(f"{path} is {what}, not a model: MODEL is a misbench checkpoint (.pt), a state_dict "
                                 f"file (with --arch) or a torchvision name such as resnet18:DEFAULT; {reader}")
    if len(head) >= 8 and int.from_bytes(head[:8], "little") < 1 << 24 and head[8:9] == b"{":
        return MisbenchError(f"{path} is a safetensors file: misbench reads torch files; convert it with "
                             "safetensors.torch.load_file and torch.save of the state_dict, then pass --arch")
    text = head.lstrip()
    if head and not head.startswith(b"\x80") and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return MisbenchError(f"{path} is a text file ({text[:30].decode(errors='replace')!r}...), not a model: MODEL "
                             "is a misbench checkpoint (.pt), a state_dict file (with --arch) or a torchvision name "
                             "such as resnet18:DEFAULT")
    return None


def load_torch_file(path, trust_pickle: bool = False):
    """torch.load with weights_only=True; whole pickles only when the user trusts the file. Files that are
    recognisably no model (HDF5, JSON, CSV, safetensors, images, text) are named for what they are."""
    other = _not_a_model(path)
    if other is not None:
        raise other
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise MisbenchError(
                f"{path} is a pickled Python object, not plain tensors ({str(err).splitlines()[0]}). "
                "Loading it can run arbitrary code; pass --trust-pickle only if you trust its origin."
            ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise MisbenchError(f"cannot read {path} as a torch file: {err}") from None
    log.warning("loading %s as a trusted pickle", path)
    return torch.load(path, map_location="cpu", weights_only=False)


AUX_PREFIXES = {"googlenet": "aux1.", "inception_v3": "AuxLogits."}


def _inception_kwargs(arch: str, state: dict, given: dict) -> dict:
    kwargs = dict(given)
    kwargs.setdefault("aux_logits", any(k.startswith(AUX_PREFIXES[arch]) for k in state))
    # state dicts descending from the ImageNet weights expect transform_input, as torchvision's
    # builders set it for those weights
    kwargs.setdefault("transform_input", True)
    return kwargs


def _unwrap_state(obj) -> dict | None:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return _unwrap_state(obj[key])
    return None


def load_seeded(spec: str, seed: int, **options) -> LoadedModel:
    """load_model with torch's CPU generator seeded by `seed` while the network is built, so that a randomly
    initialised one (`name:random`, or an own arch's bare name) is the same network for the same seed; torch's
    global generator state is restored afterwards (weights read from files are unaffected)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_model(spec, **options)


def load_model(spec: str, arch: str | None = None, num_classes: int | None = None,
               trust_pickle: bool = False, arch_kwargs: dict | None = None) -> LoadedModel:
    """Resolve MODEL: torchvision `name[:weights]`, misbench checkpoint, state_dict (+arch), or pickle."""
    path = Path(spec)
    if not path.exists():
        if "/" in spec or spec.endswith((".pt", ".pth", ".ckpt")):
            raise MisbenchError(f"model file {spec} does not exist")
        if arch is not None:
            raise MisbenchError("--arch is only for plain state_dict files; MODEL is a torchvision name here")
        return _from_torchvision(spec, num_classes, arch_kwargs)
    sha = sha256_file(path)
    obj = load_torch_file(path, trust_pickle)
    check_finite(obj if isinstance(obj, nn.Module) else _unwrap_state(obj) or {}, spec)
    if isinstance(obj, nn.Module):
        obj.eval()
        name = arch or type(obj).__name__.lower()
        n = num_classes or _infer_classes(obj)
        return LoadedModel(obj, spec, name, {}, n, IMAGENET_PREPROCESS, sha)
    if is_checkpoint(obj):
        model, record, pre = read_checkpoint(obj, spec)
        return LoadedModel(model, spec, record["arch"], dict(record.get("arch_kwargs") or {}), record["num_classes"],
                           pre, sha, record)
    state = _unwrap_state(obj)
    if state is None:
        raise MisbenchError(f"{spec} holds neither a misbench checkpoint nor a state_dict of tensors")
    if arch is None:
        raise MisbenchError(f"{spec} is a plain state_dict: pass --arch NAME (and --num-classes if not 1000)")
    if num_classes is None:
        num_classes = _infer_classes_from_state(state) or 1000
    kwargs = _inception_kwargs(arch, state, arch_kwargs or {}) if arch in AUX_PREFIXES else dict(arch_kwargs or {})
    model = build_arch(arch, num_classes, kwargs)
    load_state(model, state, spec)
    _log_transform_input(arch, kwargs, spec)
    return LoadedModel(model.eval(), spec, arch, kwargs, num_classes, default_preprocess(arch), sha)


def _infer_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 0


def _infer_classes_from_state(state: dict) -> int | None:
    for key in ("fc.weight", "classifier.weight", "classifier.1.weight", "classifier.6.weight", "head.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None

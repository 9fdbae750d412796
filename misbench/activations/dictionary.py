"""Dictionary features (sparse-autoencoder encoders) of a layer, read as units of their own.

At every position x (a spatial location of a conv map, a token of a transformer layer) the K features are
f = act(((x - b_dec) W_enc^T + b_enc) * scale) (scale [K]: SAELens' decoder-norm rescaling, else 1); the
feature layer is then reduced over positions like its layer.
"""

__all__ = ["ACTIVATIONS", "Dictionary", "FeatureSpec", "parse_features", "load_dictionary", "encode", "resolve_features", "width_mismatch",
           "check_activation"]

import dataclasses
import logging
import math
from pathlib import Path

import torch

from ..errors import MisbenchError, close_matches
from ..runtime.fileio import sha256_file
from .dictionary_formats import convert_dictionary, read_dictionary_file
from .hooks import SPECIAL_LAYERS, probe_outputs
from .tokens import as_positions, channels_last_modules, output_layout

log = logging.getLogger(__name__)


def _relu(pre: torch.Tensor, _arg) -> torch.Tensor:
    return torch.relu(pre)


def _topk(pre: torch.Tensor, k) -> torch.Tensor:
    # the k largest pre-activations per position, kept after a ReLU; every other feature is 0
    k = min(int(k), pre.shape[-1])
    values, index = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, index, torch.relu(values))


def _topk_raw(pre: torch.Tensor, k) -> torch.Tensor:
    # the k largest pre-activations as they are (saev's TopK: no ReLU); every other feature is 0
    k = min(int(k), pre.shape[-1])
    values, index = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, index, values)


def _jumprelu(pre: torch.Tensor, theta) -> torch.Tensor:
    # theta: one number (jumprelu:THETA) or the file's per-feature threshold [K] (jumprelu)
    return pre * (pre > theta) * (pre > 0)


def _float_or_none(text: str):
    return float(text) if text else None


# name -> (function, parser of the argument after ':' or None when the activation takes none)
ACTIVATIONS = {"relu": (_relu, None), "topk": (_topk, int), "topkraw": (_topk_raw, int),
               "jumprelu": (_jumprelu, _float_or_none)}


def check_activation(text: str, source: str = "activation") -> str:
    """Validate `relu`, `topk:K` or `jumprelu:THETA`; returns it unchanged."""
    name, _, arg = str(text).partition(":")
    if name not in ACTIVATIONS:
        raise MisbenchError(f"{source}: activation {text!r}: expected relu, topk:K, topkraw:K or jumprelu:THETA")
    _, parse = ACTIVATIONS[name]
    if parse is None and arg:
        raise MisbenchError(f"{source}: activation {text!r}: relu takes no argument")
    if parse is not None:
        try:
            value = parse(arg)
        except ValueError:
            raise MisbenchError(f"{source}: activation {text!r}: expected {name}:<{'int' if parse is int else 'float'}>") from None
        if name in ("topk", "topkraw") and value < 1:
            raise MisbenchError(f"{source}: activation {text!r}: k must be at least 1")
        if name == "jumprelu" and value is not None and not math.isfinite(value):
            raise MisbenchError(f"{source}: activation {text!r}: the threshold must be a finite number (a NaN or "
                                "inf threshold zeroes every feature); train or export the dictionary again")
    return str(text)


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    name: str   # the feature layer's name in the activation file
    layer: str  # the module whose output the dictionary reads
    file: str

    def text(self) -> str:
        return f"{self.name}={self.layer}:{self.file}"


def parse_features(text: str) -> FeatureSpec:
    """`NAME=LAYER:FILE` (the file may itself contain ':')."""
    name, eq, rest = str(text).partition("=")
    layer, colon, file = rest.partition(":")
    if not (eq and colon and name.strip() and layer.strip() and file.strip()):
        raise MisbenchError(f"--features {text!r}: expected NAME=LAYER:FILE, e.g. "
                            "sae3=inception3a.branch1.bn:sae3.pt (a comma separates two of them: a FILE whose path "
                            "holds a comma needs another name or a link)")
    return FeatureSpec(name.strip(), layer.strip(), file.strip())


@dataclasses.dataclass(frozen=True, eq=False)
class Dictionary:
    W_enc: torch.Tensor               # [K, D]
    b_enc: torch.Tensor               # [K]
    b_dec: torch.Tensor | None        # [D]
    activation: str
    sha256: str
    path: str
    threshold: torch.Tensor | None = None  # [K]: a per-feature JumpReLU threshold (activation "jumprelu")
    format: str = "misbench"  # the file's format (dictionary_formats.FORMATS)
    scale: torch.Tensor | None = None  # [K]: pre-activations times this, in the library's order (SAELens TopK)
    trained_layer: str | None = None  # the module whose activations trained it, where the file says (misbench's)

    @property
    def width(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.W_enc.shape[0])


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def load_dictionary(path, trust_pickle: bool = False) -> Dictionary:
    """Read a dictionary file of any registered format (dictionary_formats), recognised by its content, with
    weights_only=True (a pickle only with `trust_pickle`); check its shapes against each other and its weights
    for NaN."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        if not path.exists() and str(path).startswith("~"):
            problem += " (a ~ inside NAME=LAYER:FILE is not expanded: write the full path)"
        raise MisbenchError(f"--features: dictionary file {path} {problem}; give a torch file holding "
                            "W_enc [K, D], b_enc [K] (optional b_dec [D], activation) or another library's weights "
                            "file (ae.pt, sae_weights.safetensors: docs/formats.md)")
    try:
        content = read_dictionary_file(path, trust_pickle)
    except OSError as err:  # permissions, an I/O error (torch.load's own errors are caught there)
        raise MisbenchError(f"--features: cannot read {path} ({err.strerror or err}); check that the file is "
                            "readable and complete") from None
    fmt, obj = convert_dictionary(content, path)
    w, b, b_dec, threshold = obj["W_enc"], obj["b_enc"], obj["b_dec"], obj["threshold"]
    if w.dim() != 2:
        raise MisbenchError(f"--features: {path} ({fmt}): W_enc must be a [K, D] matrix, got {_shape(w)}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise MisbenchError(f"--features: {path}: W_enc is {tuple(w.shape)}; a dictionary needs at least one feature "
                            "and one input unit")
    if tuple(b.shape) != (w.shape[0],):
        raise MisbenchError(f"--features: {path} ({fmt}): b_enc must be [K] = [{w.shape[0]}] to match W_enc "
                            f"{tuple(w.shape)}, got {_shape(b)}")
    if b_dec is not None and tuple(b_dec.shape) != (w.shape[1],):
        raise MisbenchError(f"--features: {path} ({fmt}): b_dec must be [D] = [{w.shape[1]}] to match W_enc "
                            f"{tuple(w.shape)}, got {_shape(b_dec)}")
    for key in ("threshold", "scale"):
        if obj.get(key) is not None and tuple(obj[key].shape) != (w.shape[0],):
            raise MisbenchError(f"--features: {path} ({fmt}): {key} must be [K] = [{w.shape[0]}], got "
                                f"{_shape(obj[key])}")
    activation = check_activation(obj["activation"], f"--features {path}")
    name, _, arg = activation.partition(":")
    if name in ("topk", "topkraw") and int(arg) > w.shape[0]:  # the libraries' torch.topk refuses it too
        raise MisbenchError(f"--features: {path} ({fmt}): activation {activation!r} keeps k = {int(arg)} features per "
                            f"input but the dictionary has K = {w.shape[0]}; expected k <= K")
    if activation == "jumprelu" and threshold is None:
        raise MisbenchError(f"--features: {path}: activation 'jumprelu' without a number needs a per-feature "
                            "threshold [K] in the file; or write jumprelu:THETA")
    return Dictionary(w, b, b_dec, activation, sha256_file(path), str(path), threshold, fmt, obj.get("scale"),
                      obj.get("trained_layer"))


def encode(x: torch.Tensor, dictionary: Dictionary) -> torch.Tensor:
    """[..., D] -> [..., K] features, computed in float32 on x's device."""
    w = dictionary.W_enc.to(x.device)
    x = x.float()
    if dictionary.b_dec is not None:
        x = x - dictionary.b_dec.to(x.device)
    pre = x @ w.T + dictionary.b_enc.to(x.device)
    if dictionary.scale is not None:
        pre = pre * dictionary.scale.to(x.device)
    name, _, arg = dictionary.activation.partition(":")
    fn, parse = ACTIVATIONS[name]
    if name == "jumprelu" and not arg:
        return fn(pre, dictionary.threshold.to(x.device))
    return fn(pre, parse(arg) if parse else None)


def width_mismatch(dictionary: Dictionary, layer: str, width: int) -> str:
    """The words for a dictionary whose input width D is not the layer's units per position."""
    return (f"W_enc is {list(dictionary.W_enc.shape)} ([K, D], D = {dictionary.width}) but layer {layer!r} has "
            f"D = {width} units per position")


def resolve_features(model: torch.nn.Module, specs, taken, probe: torch.Tensor, trust_pickle: bool = False) -> dict:
    """Feature layer name -> (module name, Dictionary), checked against the model before any image is read:
    the module exists, NAME is new, and W_enc's D equals the module's units per position (from one forward
    pass on `probe`)."""
    if not specs:
        return {}
    specs = [s if isinstance(s, FeatureSpec) else parse_features(s) for s in specs]
    modules = dict(model.named_modules())
    taken = set(taken)
    out = {}
    for spec in specs:
        if spec.layer not in modules or not spec.layer:
            raise MisbenchError(f"--features {spec.text()}: unknown layer {spec.layer!r}: expected a module name "
                                f"of the model.{close_matches(spec.layer, [n for n in modules if n])}")
        if spec.name in SPECIAL_LAYERS or spec.name == "all":  # score would read softmax/logits as class units
            raise MisbenchError(f"--features {spec.text()}: {spec.name!r} is a reserved layer name "
                                f"({', '.join((*SPECIAL_LAYERS, 'all'))}); choose another NAME")
        if spec.name in taken or spec.name in modules or spec.name in out:
            raise MisbenchError(f"--features {spec.text()}: the name {spec.name!r} is already a layer or module "
                                "name; choose a new NAME")
        out[spec.name] = (spec.layer, load_dictionary(spec.file, trust_pickle))
    grids = channels_last_modules(model)
    shapes = probe_outputs(model, {m for m, _ in out.values()}, probe)
    for name, (module, dictionary) in out.items():
        if module not in shapes:
            raise MisbenchError(f"--features {name}={module}:{dictionary.path}: layer {module!r} does not run in an "
                                "inference forward pass; choose a module on the inference path")
        output = shapes[module]
        width = as_positions(output, output_layout(output, module in grids)).shape[-1]
        if width != dictionary.width:
            raise MisbenchError(f"--features {name}={module}:{dictionary.path}: "
                                f"{width_mismatch(dictionary, module, width)} (output shape {list(output.shape)}); "
                                "use a dictionary trained on this layer")
        if dictionary.trained_layer not in (None, module):  # same width, another layer: features of nothing
            log.warning("--features %s=%s:%s: the dictionary was trained on layer %r, not %r (its record says so); "
                        "its features of %r mean nothing unless the two layers share a basis", name, module,
                        dictionary.path, dictionary.trained_layer, module, module)
    return out

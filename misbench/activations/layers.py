"""What `extract --layers` can record in a model: every module an inference pass runs, with its unit count."""

__all__ = ["LayerInfo", "list_layers"]

import typing

import torch
from torch import nn

from .hooks import conv_unit_modules
from .tokens import LAYER_KINDS, channels_last_modules, mlp_hidden_modules


class LayerInfo(typing.NamedTuple):
    """One recordable layer; unpacks as (name, kind, n_units, ...)."""
    name: str          # the name `extract --layers` takes
    # conv | linear | token (the module's output: [N,C,H,W], [N,C], [N,T,D] or Swin's [N,H,W,D]) | logits |
    # softmax: the `kind` attr extract writes for the layer (docs/formats.md)
    kind: str
    n_units: int       # values per image after reduction (channels, features, classes; D for token layers)
    module: str        # the module's class, e.g. Conv2d, BatchNorm2d, Linear ("" for logits/softmax)
    in_conv: bool      # part of what the `conv` shortcut expands to
    classes: tuple = ()  # class names of the units (logits/softmax, where the weights name them)
    in_mlp: bool = False  # part of what the `mlp` shortcut expands to (transformer MLP hidden activations)


_LAYOUTS = {4: "conv", 2: "flat", 3: "tokens"}  # by the number of output dimensions


def list_layers(model: nn.Module, probe: torch.Tensor, class_names=()) -> list[LayerInfo]:
    """Every named module that an inference pass on `probe` runs and whose output reduces to units, in
    the order of `model.named_modules()`; then logits and softmax. Modules that run only in training
    (GoogLeNet's aux heads) cannot be recorded and are left out."""
    modules = [(name, m) for name, m in model.named_modules() if name]
    shapes: dict[str, tuple] = {}

    def hook(name):
        def record(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, tuple(out.shape))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules]
    try:
        with torch.inference_mode():
            logits = model.eval()(probe)
    finally:
        for h in handles:
            h.remove()
    conv = set(conv_unit_modules(model))
    grids = channels_last_modules(model)  # Swin's [N, H, W, D] token grids: D units, not H
    mlp = set(mlp_hidden_modules(model))
    rows = []
    for name, module in modules:
        shape = shapes.get(name)
        if shape is None or len(shape) not in _LAYOUTS:
            continue
        grid = len(shape) == 4 and name in grids
        units = shape[-1] if len(shape) == 3 or grid else shape[1]
        kind = LAYER_KINDS["grid" if grid else _LAYOUTS[len(shape)]]
        rows.append(LayerInfo(name, kind, int(units), type(module).__name__, name in conv, (), name in mlp))
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    classes = tuple(class_names or ())
    rows += [LayerInfo(kind, kind, int(logits.shape[1]), "", False, classes) for kind in ("logits", "softmax")]
    return rows

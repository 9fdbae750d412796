"""Which modules to record, and forward hooks that record them reduced to one value per unit."""

__all__ = ["LayerRequest", "resolve_layers", "modules_that_run", "conv_unit_modules", "FeatureHooks", "SPECIAL_LAYERS", "reduce_output"]

import dataclasses

import torch
from torch import nn

from .errors import MisbenchError, close_matches

SPECIAL_LAYERS = ("logits", "softmax", "conv")
REDUCTIONS = ("mean", "max")


@dataclasses.dataclass(frozen=True)
class LayerRequest:
    name: str            # the name in the activation file
    module: str | None   # module path, None for logits/softmax (read from the model output)
    kind: str            # conv | linear | logits | softmax (conv/linear settled by the first batch)


def conv_unit_modules(model: nn.Module) -> list[str]:
    """Every pre-activation conv unit: the BatchNorm after a conv, else the conv itself."""
    modules = list(model.named_modules())
    names = []
    for k, (name, module) in enumerate(modules):
        if not isinstance(module, nn.Conv2d):
            continue
        nxt = modules[k + 1] if k + 1 < len(modules) else None
        same_parent = nxt is not None and nxt[0].rpartition(".")[0] == name.rpartition(".")[0]
        if (same_parent and isinstance(nxt[1], nn.BatchNorm2d)
                and nxt[1].num_features == module.out_channels):
            names.append(nxt[0])
        else:
            names.append(name)
    return names


def modules_that_run(model: nn.Module, names: list[str], probe: torch.Tensor) -> set[str]:
    """The modules among `names` that an inference forward pass on `probe` calls."""
    ran: set[str] = set()
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda *_a, n=n: ran.add(n)) for n in names]
    try:
        with torch.inference_mode():
            model.eval()(probe)
    finally:
        for h in handles:
            h.remove()
    return ran


def resolve_layers(model: nn.Module, layers, probe: torch.Tensor | None = None) -> list[LayerRequest]:
    """Expand `conv` (to the units an inference pass computes, when `probe` is given);
    check every module name before any image is read."""
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    if not layers:
        raise MisbenchError("--layers is empty: give module names, or logits, softmax, conv")
    known = dict(model.named_modules())
    out: list[LayerRequest] = []
    for name in layers:
        if name in ("logits", "softmax"):
            out.append(LayerRequest(name, None, name))
        elif name == "conv":
            convs = conv_unit_modules(model)
            if probe is not None:
                ran = modules_that_run(model, convs, probe)
                convs = [n for n in convs if n in ran]  # e.g. GoogLeNet's aux heads only run in training
            out.extend(LayerRequest(n, n, "conv") for n in convs)
        elif name in known and name:
            out.append(LayerRequest(name, name, "module"))
        else:
            raise MisbenchError(
                f"unknown layer {name!r}: expected a module name of the model, or one of "
                f"{', '.join(SPECIAL_LAYERS)}.{close_matches(name, [n for n in known if n])}"
            )
    seen, unique = set(), []
    for req in out:
        if req.name not in seen:
            seen.add(req.name)
            unique.append(req)
    return unique


def reduce_output(output: torch.Tensor, reduction: str) -> torch.Tensor:
    """[B, C, H, W] -> [B, C] by spatial mean or max; [B, C] passes through."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.dim() == 4:
        return output.mean(dim=(2, 3)) if reduction == "mean" else output.amax(dim=(2, 3))
    if output.dim() == 2:
        return output
    if output.dim() == 3:  # token sequences: average over tokens
        return output.mean(dim=1) if reduction == "mean" else output.amax(dim=1)
    raise MisbenchError(f"cannot reduce an output of shape {tuple(output.shape)} to one value per unit")


class FeatureHooks:
    """Context manager: forward hooks by module name, each storing its reduced output."""

    def __init__(self, model: nn.Module, names: list[str], reduction: str = "mean"):
        if reduction not in REDUCTIONS:
            raise MisbenchError(f"unknown reduction {reduction!r}: expected one of {REDUCTIONS}")
        self.model, self.names, self.reduction = model, list(names), reduction
        self.outputs: dict[str, torch.Tensor] = {}
        self.dims: dict[str, int] = {}
        self._handles = []

    def _hook(self, name):
        def record(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.dims[name] = out.dim()
            self.outputs[name] = reduce_output(out.detach(), self.reduction)
        return record

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for name in self.names:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def collect(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise MisbenchError(
                f"layers {', '.join(missing)} did not run in the forward pass (auxiliary heads only run "
                "in training mode); choose modules on the inference path"
            )
        out, self.outputs = self.outputs, {}
        return out

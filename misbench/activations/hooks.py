"""Which modules to record, and forward hooks that record them reduced to one value per unit."""

__all__ = ["LayerRequest", "resolve_layers", "modules_that_run", "probe_outputs", "conv_unit_modules", "FeatureHooks",
           "SPECIAL_LAYERS", "reduce_output"]

import dataclasses

import torch
from torch import nn

from ..errors import MisbenchError, close_matches
from .tokens import TOKEN_REDUCTIONS, as_positions, mlp_hidden_modules, output_layout, reduce_tokens

SPECIAL_LAYERS = ("logits", "softmax", "conv", "mlp")
REDUCTIONS = ("mean", "max")


@dataclasses.dataclass(frozen=True)
class LayerRequest:
    name: str            # the name in the activation file
    module: str | None   # module path, None for logits/softmax (read from the model output)
    kind: str            # conv | mlp | module | logits | softmax | features (the stored kind is settled by the first batch)


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


def probe_outputs(model: nn.Module, names, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of each module among `names` that an inference forward pass on `probe` calls."""
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def record(name):
        def hook(_m, _i, output):
            outputs[name] = (output[0] if isinstance(output, (tuple, list)) else output).detach()
        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in names]
    try:
        with torch.inference_mode():
            model.eval()(probe)
    finally:
        for h in handles:
            h.remove()
    return outputs


def modules_that_run(model: nn.Module, names: list[str], probe: torch.Tensor) -> set[str]:
    """The modules among `names` that an inference forward pass on `probe` calls."""
    return set(probe_outputs(model, names, probe))


def resolve_layers(model: nn.Module, layers, probe: torch.Tensor | None = None) -> list[LayerRequest]:
    """Expand `conv` (to the units an inference pass computes, when `probe` is given);
    check every module name before any image is read."""
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    if not layers:
        raise MisbenchError("--layers is empty: give module names, or logits, softmax, conv, mlp")
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
        elif name == "mlp":
            hidden = mlp_hidden_modules(model)
            if not hidden:
                raise MisbenchError("--layers mlp: this model has no transformer MLP blocks (torchvision vit_*, "
                                    "swin_*, or timm Mlp); name its modules instead")
            out.extend(LayerRequest(n, n, "mlp") for n in hidden)
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
    """[B, C, H, W] -> [B, C] by spatial mean or max; [B, C] passes through (token layers: tokens.py)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.dim() == 4:
        return output.mean(dim=(2, 3)) if reduction == "mean" else output.amax(dim=(2, 3))
    if output.dim() == 2:
        return output
    raise MisbenchError(f"cannot reduce an output of shape {tuple(output.shape)} to one value per unit")


class FeatureHooks:
    """Context manager: forward hooks by module name, each storing its reduced output.

    Conv maps reduce over space by `reduction`; token outputs ([B, T, D], or the channels-last grids of
    `channels_last` modules) over tokens by `token_reduction`. `features` (layer name -> (module,
    encode)) adds layers computed per position from a module's output, then reduced like that module."""

    def __init__(self, model: nn.Module, names: list[str], reduction: str = "mean", token_reduction: str = "mean",
                 channels_last=(), features: dict | None = None):
        if reduction not in REDUCTIONS:
            raise MisbenchError(f"unknown reduction {reduction!r}: expected one of {REDUCTIONS}")
        if token_reduction not in TOKEN_REDUCTIONS:
            raise MisbenchError(f"--token-reduction {token_reduction!r}: expected one of {', '.join(TOKEN_REDUCTIONS)}")
        self.model, self.names, self.reduction = model, list(names), reduction
        self.token_reduction, self.channels_last = token_reduction, set(channels_last)
        self.features = dict(features or {})
        self.outputs: dict[str, torch.Tensor] = {}
        self.dims: dict[str, int] = {}
        self.layouts: dict[str, str] = {}
        self._handles = []

    def _reduce(self, positions, layout, name):
        if layout == "conv":
            return positions.mean(dim=1) if self.reduction == "mean" else positions.amax(dim=1)
        return reduce_tokens(positions, self.token_reduction, layout, name)

    def _hook(self, name):
        plain = name in self.names
        derived = [(key, fn) for key, (module, fn) in self.features.items() if module == name]

        def record(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            out = out.detach()
            layout = output_layout(out, name in self.channels_last)
            self.dims[name], self.layouts[name] = out.dim(), layout
            if plain:
                self.outputs[name] = (reduce_output(out, self.reduction) if layout in ("conv", "flat")
                                      else reduce_tokens(as_positions(out, layout), self.token_reduction, layout, name))
            for key, fn in derived:
                self.outputs[key] = self._reduce(fn(as_positions(out, layout)), layout, name)
        return record

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for name in dict.fromkeys(self.names + [m for m, _ in self.features.values()]):
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def collect(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.names + list(self.features) if n not in self.outputs]
        if missing:
            raise MisbenchError(
                f"layers {', '.join(missing)} did not run in the forward pass (auxiliary heads only run "
                "in training mode); choose modules on the inference path"
            )
        out, self.outputs = self.outputs, {}
        return out

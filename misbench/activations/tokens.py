"""Token layers: outputs laid out as positions x units, reduced over positions to one value per unit.

A module's output is read as [B, P, D] (P positions, D units) by its layout:
  conv   [B, D, H, W]   a conv feature map (positions = H*W)
  tokens [B, T, D]      a token sequence (ViT); token 0 is the class token where the model has one
  grid   [B, H, W, D]   a channels-last map of tokens (Swin's blocks); no class token
  flat   [B, D]         one position
"""

__all__ = ["TOKEN_REDUCTIONS", "LAYER_KINDS", "output_layout", "as_positions", "reduce_tokens", "mlp_hidden_modules",
           "channels_last_modules"]

import torch
from torch import nn

from ..errors import MisbenchError

TOKEN_REDUCTIONS = ("mean", "max", "cls")
# a layer's kind by its output's layout: the `kind` attr of /layers/NAME (docs/formats.md) and the kind
# column of `misbench layers`; both token layouts are kind `token`
LAYER_KINDS = {"conv": "conv", "flat": "linear", "tokens": "token", "grid": "token"}
_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU, nn.ReLU6, nn.Hardswish, nn.Tanh, nn.Sigmoid)


def output_layout(output: torch.Tensor, channels_last: bool) -> str:
    dims = output.dim()
    if dims == 2:
        return "flat"
    if dims == 3:
        return "tokens"
    if dims == 4:
        return "grid" if channels_last else "conv"
    raise MisbenchError(f"cannot read an output of shape {tuple(output.shape)} as units: expected [N, D], "
                        "[N, D, H, W], [N, tokens, D] or a channels-last [N, H, W, D]")


def as_positions(output: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, P, D] view of an output of the given layout."""
    if layout == "flat":
        return output[:, None, :]
    if layout == "conv":
        return output.flatten(2).transpose(1, 2)
    if layout == "grid":
        return output.flatten(1, 2)
    return output


def reduce_tokens(positions: torch.Tensor, how: str, layout: str = "tokens", layer: str = "") -> torch.Tensor:
    """[B, P, D] -> [B, D]: mean or max over positions, or the class token (position 0 of a token sequence)."""
    if how == "mean":
        return positions.mean(dim=1)
    if how == "max":
        return positions.amax(dim=1)
    if how == "cls":
        if layout != "tokens":
            raise MisbenchError(f"--token-reduction cls: layer {layer!r} has no class token (its output is a "
                                f"{layout} layout); use --token-reduction mean or max")
        return positions[:, 0]
    raise MisbenchError(f"--token-reduction {how!r}: expected one of {', '.join(TOKEN_REDUCTIONS)}")


def _first_activation(module: nn.Module) -> str | None:
    for name, child in module.named_children():
        if isinstance(child, _ACTIVATIONS):
            return name
    act = getattr(module, "act", None)  # timm's Mlp keeps its nonlinearity as .act
    return "act" if isinstance(act, nn.Module) else None


def mlp_hidden_modules(model: nn.Module) -> list[str]:
    """The hidden activation (output of the nonlinearity) of every transformer MLP block, in model order:
    torchvision's MLPBlock/MLP (ViT, Swin) and modules named like timm's Mlp."""
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    from torchvision.ops.misc import MLP

    names = []
    for name, module in model.named_modules():
        if isinstance(module, MLP) or type(module).__name__ in ("Mlp", "GluMlp", "SwiGLU"):
            child = _first_activation(module)
            if child is not None:
                names.append(f"{name}.{child}" if name else child)
    return names


def channels_last_modules(model: nn.Module) -> set[str]:
    """Modules whose 4-D outputs are channels-last token grids rather than conv maps (torchvision Swin:
    everything inside `features` after the patch-embedding conv, and the final `norm`)."""
    # torchvision loads only where a model or transform needs it: `import misbench` stays light
    from torchvision.models.swin_transformer import SwinTransformer

    if not isinstance(model, SwinTransformer):
        return set()
    return {name for name, module in model.named_modules()
            if (name.startswith("features.") or name == "norm") and not isinstance(module, nn.Conv2d)}

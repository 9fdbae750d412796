"""Audit the sparsity of any model: per prunable layer zeros, zero channels, and consistency with the record."""

__all__ = ["audit"]

from torch import nn

from ..models.loading import LoadedModel
from .masks import sparsity_of


def audit(loaded: LoadedModel) -> dict:
    """DESIGN §6 `audit --json` object. `consistent` is None when there is nothing to compare with."""
    layers = []
    for name, module in loaded.model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        w = module.weight.detach()
        zero = w == 0
        other_out = tuple(range(1, w.dim()))
        # input channels of a grouped conv: (group, channel within the group), in_channels in all
        groups = getattr(module, "groups", 1)
        grouped = zero.reshape(groups, w.shape[0] // groups, *w.shape[1:])
        other_in = (1, *range(3, grouped.dim()))
        layers.append({"name": name, "weights": w.numel(), "zeros": int(zero.sum()),
                       "sparsity": float(zero.float().mean()),
                       "zero_out_channels": int(zero.all(dim=other_out).sum()),
                       "zero_in_channels": int(grouped.all(dim=other_in).sum())})
    record = (loaded.checkpoint or {}).get("pruning")
    masks = loaded.masks
    params = dict(loaded.model.named_parameters())
    regrown = {}
    for pname, mask in masks.items():
        p = params.get(pname)
        if p is not None:
            count = int((p.detach()[~mask.bool()] != 0).sum())
            if count:
                regrown[pname] = count
    counted = [l for l in layers if not masks or f"{l['name']}.weight" in masks]  # the masked layers, else all
    total_w, total_z = sum(l["weights"] for l in counted), sum(l["zeros"] for l in counted)
    sparsity = total_z / total_w if total_w else 0.0
    consistent = None
    # a layer with every weight zero gives all inputs the same output: never a sound pruning result
    empty = [l["name"] for l in layers if l["weights"] and l["zeros"] == l["weights"]]
    problems = [f"{len(empty)} layers are 100% sparse (every input gives the same output): "
                + ", ".join(empty[:8]) + (f" (+{len(empty) - 8} more)" if len(empty) > 8 else "")] if empty else []
    if record:
        achieved = float(record.get("achieved_sparsity", record.get("rate", 0.0)))
        if regrown:
            problems.append(f"{sum(regrown.values())} masked weights are non-zero (regrew) in {len(regrown)} tensors")
        if masks:
            mask_sparsity = sparsity_of(masks)
            if abs(mask_sparsity - achieved) > 1e-6:
                problems.append(f"masks prune {mask_sparsity:.6f}, the record says {achieved:.6f}")
        if sparsity + 1e-6 < achieved:
            problems.append(f"zeros make {sparsity:.6f} of the prunable weights, the record says {achieved:.6f}")
    if record or empty:
        consistent = not problems
    return {"layers": layers, "total": {"weights": total_w, "zeros": total_z, "sparsity": sparsity},
            "target": record, "consistent": consistent, "problems": problems, "empty_layers": empty,
            "regrown": regrown, "model": loaded.spec}



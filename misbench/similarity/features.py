"""The maths shared by LPIPS and deep-feature backends, as pure functions."""

__all__ = ["unit_normalise", "layer_embedding", "layer_distance"]

import torch

EPS = 1e-10  # as the lpips package


def unit_normalise(features: torch.Tensor) -> torch.Tensor:
    """Divide each spatial position's channel vector by its L2 norm."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)


def layer_embedding(features: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*H*W] with sqrt(w_c / (H W)) * normalised features.

    The squared L2 distance of two such vectors equals sum_c w_c * mean_hw (f1 - f2)^2,
    LPIPS's per-layer term.
    """
    b, c, h, w = features.shape
    scale = torch.full((c,), 1.0 / (h * w), device=features.device, dtype=features.dtype)
    if weights is not None:
        scale = scale * weights.to(features)
    return (unit_normalise(features) * scale.sqrt().view(1, c, 1, 1)).reshape(b, -1)


def layer_distance(f1: torch.Tensor, f2: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """LPIPS's per-layer term computed directly: weighted channel sum, then spatial mean."""
    diff = (unit_normalise(f1) - unit_normalise(f2)).pow(2)
    if weights is not None:
        diff = diff * weights.to(diff).view(1, -1, 1, 1)
    return diff.sum(dim=1).mean(dim=(1, 2))

"""Sparse-autoencoder kinds as a registry: how each one codes during training, its sparsity penalty, and the
activation its saved file applies at inference (one of dictionary.ACTIVATIONS).

- `topk`: each input keeps its k largest pre-activations (after a ReLU); inference `topk:k`.
- `batchtopk`: a batch keeps its k x batch largest pre-activations, so inputs share a budget of k on
  average (Bussmann et al. 2024); inference `jumprelu:theta` with theta the largest value a batch top-k over the
  whole training set leaves out (L0 = k on the training data).
- `relu`: ReLU codes with an L1 penalty `l1` x sum_j f_j |W_dec[:, j]| (Bricken et al. 2023); inference `relu`.
"""

__all__ = ["Kind", "KINDS", "register_kind", "batch_topk_threshold"]

import dataclasses
from typing import Callable

import torch

from ..registry import register
from .dictionary import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class Kind:
    code: Callable  # (pre [B, K], k) -> codes [B, K] as training uses them
    penalty: Callable  # (codes, W_dec [D, K], l1) -> scalar added to the loss
    activation: Callable  # (pre over the training rows [N, K], k) -> the saved file's activation string
    uses_k: bool


KINDS: dict[str, Kind] = {}


def register_kind(name: str, kind: Kind) -> None:
    register(KINDS, name, kind, "dictionary kind")


def _batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    flat = torch.relu(pre).flatten()
    values, index = flat.topk(min(k * pre.shape[0], flat.numel()))
    return torch.zeros_like(flat).scatter(0, index, values).view_as(pre)


def batch_topk_threshold(pre: torch.Tensor, k: int) -> float:
    """The largest value a batch top-k over all rows of `pre` leaves out (0 when it keeps every positive one):
    `pre > theta` keeps exactly what it keeps, ties aside."""
    flat = torch.relu(pre).flatten()
    keep = k * pre.shape[0]
    if keep >= flat.numel():
        return 0.0
    return float(flat.topk(keep + 1).values[-1])


def _no_penalty(codes, w_dec, l1):
    return codes.new_zeros(())


def _l1_penalty(codes, w_dec, l1):
    return l1 * (codes * w_dec.norm(dim=0)).sum(1).mean()


register_kind("topk", Kind(ACTIVATIONS["topk"][0], _no_penalty, lambda pre, k: f"topk:{k}", True))
register_kind("batchtopk", Kind(_batch_topk, _no_penalty,
                                lambda pre, k: f"jumprelu:{batch_topk_threshold(pre, k)!r}", True))
register_kind("relu", Kind(lambda pre, k: torch.relu(pre), _l1_penalty, lambda pre, k: "relu", False))

"""`misbench train-dictionary`: a small top-k sparse autoencoder on one layer's stored activations.

Recipe (docs/mis.md): rows of /layers/LAYER/activations (one reduced vector per image) are standardised by
one global scale (their mean norm) so the learning rate does not depend on the layer's units; b_dec starts
at the rows' mean, W_dec's columns at unit norm with W_enc = W_dec^T; each of `steps` Adam steps takes a
seeded minibatch and minimises the squared reconstruction error of x_hat = W_dec topk(relu(W_enc (x - b_dec)
+ b_enc)) + b_dec, renormalising W_dec's columns after the step. The written file holds the encoder in the
input's own scale (W_enc divided by the scale, b_dec multiplied by it), so `extract --features` applies it
to raw activations, at every position of the layer.
"""

__all__ = ["DictionarySettings", "train_dictionary"]

import dataclasses
import logging

import numpy as np
import torch

from ..errors import MisbenchError
from ..runtime.fileio import atomic_path, sha256_file
from .store import open_activations

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DictionarySettings:
    n_features: int = 64
    k: int = 4
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self):
        for name in ("n_features", "k", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise MisbenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.k > self.n_features:
            raise MisbenchError(f"--k {self.k} exceeds --n-features {self.n_features}: a top-k SAE keeps k of its "
                                "features per input")


def _topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, index = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, index, torch.relu(values))


def train_dictionary(acts_path, layer: str, out, settings: DictionarySettings) -> dict:
    """Train on the rows of `layer` in a finished activation file; write {W_enc, b_enc, b_dec, W_dec,
    activation, ...} atomically to `out`; return the training record (also stored in the file)."""
    with open_activations(acts_path) as acts:
        if layer not in acts.layer_names:
            raise MisbenchError(f"{acts_path} has no layer {layer!r}; its layers: {', '.join(acts.layer_names)}")
        x = torch.from_numpy(np.asarray(acts.activations(layer), np.float32))
    n, d = x.shape
    if n < 2:
        raise MisbenchError(f"{acts_path}: layer {layer!r} has {n} row(s); a dictionary needs many images")
    gen = torch.Generator().manual_seed(settings.seed)
    scale = float(x.norm(dim=1).mean()) or 1.0
    x = x / scale
    b_dec = torch.nn.Parameter(x.mean(0).clone())
    w_dec = torch.randn(d, settings.n_features, generator=gen)
    w_dec = torch.nn.Parameter(w_dec / w_dec.norm(dim=0, keepdim=True))
    w_enc = torch.nn.Parameter(w_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(settings.n_features))
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=settings.lr, foreach=False)

    def reconstruct(batch):
        f = _topk_relu((batch - b_dec) @ w_enc.T + b_enc, settings.k)
        return f @ w_dec.T + b_dec

    losses = []
    for step in range(settings.steps):
        batch = x[torch.randint(0, n, (min(settings.batch_size, n),), generator=gen)]
        loss = ((reconstruct(batch) - batch) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec /= w_dec.norm(dim=0, keepdim=True).clamp_min(1e-8)
        losses.append(loss.item())
    with torch.no_grad():
        residual = ((reconstruct(x) - x) ** 2).sum()
        fve = float(1 - residual / ((x - x.mean(0)) ** 2).sum())
        alive = int((_topk_relu((x - b_dec) @ w_enc.T + b_enc, settings.k) > 0).any(0).sum())
    record = {"layer": layer, "acts_sha256": sha256_file(acts_path), "n_rows": int(n), "width": int(d),
              **dataclasses.asdict(settings), "scale": scale, "final_loss": losses[-1],
              "fraction_variance_explained": fve, "alive_features": alive}
    log.info("dictionary on %s: %d features (top-%d), %d steps, variance explained %.3f, %d features alive",
             layer, settings.n_features, settings.k, settings.steps, fve, alive)
    obj = {"W_enc": (w_enc.detach() / scale).contiguous(), "b_enc": b_enc.detach().clone(),
           "b_dec": (b_dec.detach() * scale).contiguous(), "W_dec": (w_dec.detach() * scale).contiguous(),
           "activation": f"topk:{settings.k}", "training": record}
    with atomic_path(out) as tmp:
        torch.save(obj, tmp)
    return record

"""`misbench train-dictionary`: a sparse autoencoder (kinds in dictionary_kinds) on one layer's activations.

Recipe (docs/mis.md): the training vectors (one reduced vector per image from an activation file, or
per-position vectors sampled during extraction, see positions.py) are standardised by one global scale (their
mean norm) so the learning rate does not depend on the layer's units; b_dec starts at their mean, W_dec's
columns at unit norm with W_enc = W_dec^T; each of `steps` Adam steps takes a seeded minibatch and minimises the
squared reconstruction error of x_hat = W_dec code((x - b_dec) W_enc^T + b_enc) + b_dec plus the kind's
penalty, renormalising W_dec's columns after the step. The written file holds the encoder in the input's own
scale (W_enc divided by the scale, b_dec multiplied by it), so `extract --features` applies it to raw
activations, at every position of the layer. FVU, L0 and the dead share are measured on the training vectors
with the file's own inference activation. `untrained_out` also writes the control: the same kind and width
with its initial weights.
"""

__all__ = ["DictionarySettings", "train_dictionary", "train_on_vectors", "train_on_positions", "position_vectors",
           "dictionary_stats"]

import dataclasses
import logging

import numpy as np
import torch

from ..datasets.sources import data_folders
from ..errors import MisbenchError
from ..models.loading import model_input_file
from ..runtime.fileio import atomic_path, sha256_file
from ..runtime.outputs import writing
from ..runtime.schema import setting, validate
from .dictionary import Dictionary, encode
from .dictionary_kinds import KINDS
from .positions import sample_positions
from .store import open_activations

log = logging.getLogger(__name__)

STATS_ROWS = 4096  # rows encoded at once when measuring FVU, L0 and dead features


@dataclasses.dataclass(frozen=True)
class DictionarySettings:
    """`train-dictionary`'s options, a study's [dictionary] keys (less seed, kind and expansion, which the study
    gives as its seed and the grid's lists) and the API's keywords (misbench/runtime/schema.py)."""

    n_features: int = setting(64, low=1, help="Dictionary size K.")
    k: int = setting(4, low=1, help="Active features per input (topk; batchtopk: on average).")
    steps: int = setting(300, low=1, help="Adam steps, one seeded minibatch each.")
    lr: float = setting(1e-3, help="Adam learning rate.")  # positive and finite: checked below
    batch_size: int = setting(256, low=1, help="Rows per minibatch.")
    seed: int = setting(0, config=False, help="Seed of the initial weights and the minibatches (and, with "
                        "--positions, of a --model NAME:random).")
    kind: str = setting("topk", choices=lambda: KINDS, config=False,
                        help="topk, batchtopk (k per input on average) or relu (ReLU with an L1 penalty --l1).")
    # width as a multiple of the layer's units (replaces n_features when given)
    expansion: float | None = setting(None, config=False,
                                      help="Width as a multiple of the layer's units (replaces --n-features), e.g. 4.")
    l1: float = setting(1e-3, help="L1 penalty of --kind relu.")  # relu's sparsity penalty

    def __post_init__(self):
        validate(self)
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise MisbenchError(f"--lr must be a positive finite number, got {self.lr}")
        if self.expansion is not None and not (np.isfinite(self.expansion) and self.expansion > 0):
            raise MisbenchError(f"--expansion {self.expansion!r}: expected a positive multiple of the layer's units")
        if not (np.isfinite(self.l1) and self.l1 >= 0):
            raise MisbenchError(f"--l1 {self.l1!r}: expected a finite penalty >= 0")
        if self.expansion is None and KINDS[self.kind].uses_k and self.k > self.n_features:
            raise MisbenchError(f"--k {self.k} exceeds --n-features {self.n_features}: a top-k SAE keeps k of its "
                                "features per input")

    def width(self, units: int) -> int:
        """Features for a layer of `units` units per position."""
        n = round(self.expansion * units) if self.expansion is not None else self.n_features
        if n < 1:
            raise MisbenchError(f"--expansion {self.expansion:g} x {units} units gives {self.expansion * units:.3g} "
                                f"features (less than one): use --expansion {1 / units:.3g} or more for this layer")
        if KINDS[self.kind].uses_k and self.k > n:
            raise MisbenchError(f"--k {self.k} exceeds the dictionary's {n} features ({self.expansion} x {units} "
                                "units): a top-k SAE keeps k of its features per input")
        return n


def dictionary_stats(x: torch.Tensor, dic: Dictionary, w_dec: torch.Tensor) -> dict:
    """FVU, mean L0 and the share of features never active, of `dic` (inference activation) on rows `x`."""
    residual, total, l0 = 0.0, 0.0, 0.0
    alive = torch.zeros(dic.n_features, dtype=torch.bool)
    mean = x.mean(0)
    with torch.no_grad():
        for start in range(0, len(x), STATS_ROWS):
            batch = x[start:start + STATS_ROWS]
            f = encode(batch, dic)
            recon = f @ w_dec.T + (dic.b_dec if dic.b_dec is not None else 0)
            residual += float(((recon - batch) ** 2).sum())
            total += float(((batch - mean) ** 2).sum())
            active = f > 0
            l0 += float(active.sum())
            alive |= active.any(0)
    fvu = residual / total if total > 0 else float("nan")
    return {"fvu": fvu, "fraction_variance_explained": 1 - fvu, "l0": l0 / len(x),
            "dead_share": float(1 - alive.float().mean()), "alive_features": int(alive.sum())}


def _saved(w_enc, b_enc, b_dec, w_dec, scale: float, activation: str, record: dict) -> tuple[dict, Dictionary]:
    obj = {"W_enc": (w_enc.detach() / scale).contiguous(), "b_enc": b_enc.detach().clone(),
           "b_dec": (b_dec.detach() * scale).contiguous(), "W_dec": (w_dec.detach() * scale).contiguous(),
           "activation": activation, "training": record}
    return obj, Dictionary(obj["W_enc"], obj["b_enc"], obj["b_dec"], activation, "", "")


def _write(obj: dict, out) -> None:
    with atomic_path(out) as tmp:
        torch.save(obj, tmp)


def train_on_vectors(x: torch.Tensor, out, settings: DictionarySettings, source: dict, untrained_out=None) -> dict:
    """Train on the rows of `x` [N, D]; write {W_enc, b_enc, b_dec, W_dec, activation, training} atomically to
    `out` (and the untrained control to `untrained_out`); return the training record (also in the file).
    `source` describes the training data (stored in the record)."""
    x = x.float()
    n, d = x.shape
    if n < 2:
        raise MisbenchError(f"{source.get('acts', 'training data')}: {n} training vector(s); a dictionary needs many")
    if not torch.isfinite(x).all():
        raise MisbenchError(f"{source.get('acts', 'training data')}: the training vectors hold NaN or inf; "
                            "re-extract from a model whose activations are finite")
    kind = KINDS[settings.kind]
    width = settings.width(d)
    gen = torch.Generator().manual_seed(settings.seed)
    scale = float(x.norm(dim=1).mean()) or 1.0
    xs = x / scale
    b_dec = torch.nn.Parameter(xs.mean(0).clone())
    w_dec = torch.randn(d, width, generator=gen)
    w_dec = torch.nn.Parameter(w_dec / w_dec.norm(dim=0, keepdim=True))
    w_enc = torch.nn.Parameter(w_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(width))
    initial = [p.detach().clone() for p in (w_enc, b_enc, b_dec, w_dec)]
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=settings.lr, foreach=False)
    k = settings.k if kind.uses_k else None
    base = {**source, "n_vectors": int(n), "width": int(d), **dataclasses.asdict(settings), "k": k,
            "n_features": width, "expansion": width / d, "scale": scale}

    def finish(params, steps, losses, path, control):
        we, be, bd, wd = params
        with torch.no_grad():
            pre = torch.cat([(xs[s:s + STATS_ROWS] - bd) @ we.T + be for s in range(0, n, STATS_ROWS)])
        activation = kind.activation(pre, settings.k)
        del pre
        record = {**base, "steps": steps, "control": control, "final_loss": losses[-1] if losses else None}
        obj, dic = _saved(we, be, bd, wd, scale, activation, record)
        record.update(dictionary_stats(x, dic, obj["W_dec"]), activation=activation)
        _write(obj, path)
        log.info("dictionary (%s, %d features%s) on %s, %d steps: FVU %.3f, L0 %.2f, dead %.1f%%", settings.kind, width,
                 f", k {k}" if k else "", source.get("layer", "?"), steps, record["fvu"], record["l0"],
                 100 * record["dead_share"])
        return record

    if untrained_out is not None:
        finish(initial, 0, [], untrained_out, "untrained")
    losses = []
    for _ in range(settings.steps):
        batch = xs[torch.randint(0, n, (min(settings.batch_size, n),), generator=gen)]
        codes = kind.code((batch - b_dec) @ w_enc.T + b_enc, settings.k)
        loss = ((codes @ w_dec.T + b_dec - batch) ** 2).sum(1).mean() + kind.penalty(codes, w_dec, settings.l1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec /= w_dec.norm(dim=0, keepdim=True).clamp_min(1e-8)
        losses.append(loss.item())
    params = (w_enc, b_enc, b_dec, w_dec)
    if not (np.isfinite(losses).all() and all(bool(torch.isfinite(p).all()) for p in params)):
        first = next((i for i, v in enumerate(losses) if not np.isfinite(v)), len(losses) - 1)
        raise MisbenchError(f"dictionary training on {source.get('layer', 'the layer')} diverged (non-finite loss "
                            f"or weights from step {first + 1} on); nothing written to {out}: lower --lr (now "
                            f"{settings.lr:g})")
    return finish([p.detach() for p in (w_enc, b_enc, b_dec, w_dec)], settings.steps, losses, out, None)


def train_dictionary(acts_path, layer: str, out, settings: DictionarySettings, untrained_out=None) -> dict:
    """Train on the rows of `layer` (one vector per image) in a finished activation file."""
    with writing({"--out": out, "--untrained-out": untrained_out}, {"ACTS": acts_path}, "misbench train-dictionary"):
        return _train_from_file(acts_path, layer, out, settings, untrained_out)


def _train_from_file(acts_path, layer: str, out, settings: DictionarySettings, untrained_out) -> dict:
    with open_activations(acts_path) as acts:
        if layer not in acts.layer_names:
            raise MisbenchError(f"{acts_path} has no layer {layer!r}; its layers: {', '.join(acts.layer_names)}")
        x = torch.from_numpy(np.asarray(acts.activations(layer), np.float32))
    if len(x) < 2:
        raise MisbenchError(f"{acts_path}: layer {layer!r} has {len(x)} row(s); a dictionary needs many images")
    source = {"layer": layer, "acts": str(acts_path), "acts_sha256": sha256_file(acts_path), "vectors": "images",
              "n_rows": int(len(x))}
    return train_on_vectors(x, out, settings, source, untrained_out)


def train_on_positions(loaded, data, layer: str, out, settings: DictionarySettings, positions: int,
                       untrained_out=None, limit: int | None = None, batch_size: int = 64, workers=None,
                       device: str = "auto") -> dict:
    """Train on per-position vectors of module `layer` (conv positions, tokens), a uniform reservoir sample of
    at most `positions` of them drawn while `data` streams through `loaded` (positions.py)."""
    with writing({"--out": out, "--untrained-out": untrained_out}, {"MODEL": model_input_file(loaded.spec)},
                 "misbench train-dictionary", data_folders({"--data": data})):
        x, source = position_vectors(loaded, data, layer, positions, settings.seed, limit, batch_size, workers,
                                     device)
        return train_on_vectors(x, out, settings, source, untrained_out)


def position_vectors(loaded, data, layer: str, positions: int, seed: int, limit: int | None = None,
                     batch_size: int = 64, workers=None, device: str = "auto") -> tuple[torch.Tensor, dict]:
    """The reservoir sample of `layer`'s per-position vectors that train_on_positions trains on, and the record of
    its source (train_on_vectors' `source`): one sample serves every dictionary of the layer with that seed."""
    x, sampled = sample_positions(loaded, data, layer, positions, seed, limit, batch_size, workers, device)
    return x, {"layer": layer, "model": str(loaded.spec), "data": str(data), "vectors": "positions",
               "reservoir": positions, **sampled}

"""Masks for unstructured, structured (output channel) and connection (input channel) pruning.

A mask is a bool tensor per parameter, True = kept. `rate` is the fraction removed:
of all prunable weights together (global scope) or of each layer (local scope); for
structured pruning round(rate * C) output channels of each conv (torch.nn.utils.prune's count);
for connection pruning int(rate * C_g) input channels of each group of C_g (the seed's count),
ranked within the group. Neither ever removes a layer's (or a group's) last channel: a conv with
no connection left gives every input the same output.
"""

__all__ = ["PruneSettings", "PruningMethod", "METHODS", "register_method", "CRITERIA", "SCHEDULES", "prunable_layers", "default_exclude", "compute_masks",
           "apply_masks", "sparsity_of", "keep_fraction", "following_batchnorm", "population_of"]

import dataclasses
from typing import Callable

import torch
from torch import nn

from ..errors import MisbenchError, close_matches
from ..registry import register
from ..runtime.fileio import option_label
from ..runtime.schema import setting, validate

SCHEDULES = ("oneshot", "iterative")
GOOGLENET_EXCLUDE = ("conv1", "conv2", "conv3", "aux1", "aux2")


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    method: str = setting(choices=lambda: METHODS, help="What is removed (docs/cli.md).")
    rate: float = setting(help="Fraction of prunable weights removed, in (0, 1).")
    # default: global for unstructured, local otherwise
    scope: str | None = setting(None, choices=("global", "local"),
                                help="Default: global for unstructured, local for structured/connection.")
    criterion: str = setting("l1", choices=lambda: CRITERIA, help="How weights are ranked.")
    schedule: str = setting("oneshot", choices=SCHEDULES, help="Prune once, or in --steps steps.")
    steps: int = setting(1, low=1, cli_default=None, help="Pruning steps of the iterative schedule (default 4).")
    exclude: tuple[str, ...] | None = setting(  # None: the architecture's default
        None, help="Module names left unpruned, repeatable or comma-separated (GoogLeNet default: "
                   "conv1,conv2,conv3,aux1,aux2; '' for none).")
    seed: int = setting(0, low=0, help="Seed of random criteria (and of training).")

    def __post_init__(self):
        validate(self)
        if not 0 < self.rate < 1:
            raise MisbenchError(f"{option_label('rate')} must be a fraction in (0, 1), got {self.rate}")
        if self.scope is not None and self.scope not in METHODS[self.method].scopes:
            raise MisbenchError(f"{option_label('method')} {self.method} {METHODS[self.method].why_scope}: "
                                f"{option_label('scope')} must be {' or '.join(METHODS[self.method].scopes)}")
        if self.steps < 1 or (self.schedule == "oneshot" and self.steps != 1):
            raise MisbenchError(f"{option_label('steps')} must be 1 for oneshot and >= 1 for iterative")

    @property
    def resolved_scope(self) -> str:
        return self.scope or METHODS[self.method].scopes[0]

    def record(self, exclude, achieved: float, masks: dict | None = None) -> dict:
        out = {"method": self.method, "scope": self.resolved_scope, "criterion": self.criterion, "rate": self.rate,
               "schedule": self.schedule, "steps": self.steps, "exclude": list(exclude),
               "achieved_sparsity": achieved, "seed": self.seed}
        if masks is not None:
            out["population"] = population_of(masks, self.method)
        return out


def population_of(masks: dict, method: str) -> dict:
    """What `rate` is a fraction of: the weight tensors ranked (docs/pruning.md compares the seed's)."""
    weights = {k: m for k, m in masks.items() if k.endswith(".weight") and m.dim() >= 2}
    kinds = " and ".join(kind.__name__ for kind in METHODS[method].kinds)
    return {"description": f"{kinds} weights of the prunable modules; biases, BatchNorm and --exclude left out",
            "tensors": len(weights), "weights": int(sum(m.numel() for m in weights.values()))}


def _l1(w, dims):
    return w.abs().sum(dim=dims) if dims else w.abs()


def _l2(w, dims):
    return w.pow(2).sum(dim=dims).sqrt() if dims else w.abs()


def _random(w, dims, generator=None):
    shape = [s for d, s in enumerate(w.shape) if d not in (dims or ())]
    return torch.rand(shape, generator=generator, dtype=torch.float64)


CRITERIA = {"l1": _l1, "l2": _l2, "random": _random}


@dataclasses.dataclass(frozen=True)
class PruningMethod:
    """A pruning method: `masks(model, layers, settings, keep, previous, score, generator)` returns the masks
    that keep `keep` of the prunable weights of `layers` (modules of `kinds`); `score(w, dims)` is the criterion.
    `scopes`: the scopes it supports, the default first (`why_scope` says why the others are not)."""

    masks: Callable[..., dict]
    kinds: tuple
    scopes: tuple
    why_scope: str = ""


METHODS: dict[str, PruningMethod] = {}


def register_method(name: str, kinds: tuple, scopes: tuple = ("local",), why_scope: str = ""):
    """Decorator: register a masks function as `--method name` (docs/contributing.md)."""
    def decorate(masks):
        register(METHODS, name, PruningMethod(masks, kinds, scopes, why_scope), "pruning method")
        return masks
    return decorate


def default_exclude(arch: str, model: nn.Module) -> tuple:
    """The seed's exclusions for GoogLeNet (stem convs and aux heads, those the model has)."""
    names = {n for n, _ in model.named_modules()}
    return tuple(e for e in GOOGLENET_EXCLUDE if e in names) if arch == "googlenet" else ()


def _excluded(name: str, exclude) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


def prunable_layers(model: nn.Module, method: str = "unstructured", exclude=()) -> dict[str, nn.Module]:
    """Module name -> Conv2d/Linear whose weight may be pruned by `method`."""
    names = {n for n, _ in model.named_modules() if n}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise MisbenchError(f"--exclude names modules that do not exist: {', '.join(unknown)}."
                            f"{close_matches(unknown[0], names)}")
    kinds = METHODS[method].kinds
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and not _excluded(n, exclude)}


def following_batchnorm(model: nn.Module) -> dict[str, str]:
    """conv name -> name of the BatchNorm applied right after it (same parent, matching width)."""
    modules = list(model.named_modules())
    out = {}
    for k, (name, module) in enumerate(modules[:-1]):
        nxt_name, nxt = modules[k + 1]
        if (isinstance(module, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d)
                and nxt_name.rpartition(".")[0] == name.rpartition(".")[0] and nxt.num_features == module.out_channels):
            out[name] = nxt_name
    return out


def keep_fraction(rate: float, step: int, steps: int) -> float:
    """Step s of S keeps (1 - R)^(s / S) of the prunable weights."""
    return (1 - rate) ** (step / steps)


def _ranked_prune(scores: torch.Tensor, n_prune: int, already: torch.Tensor, generator) -> torch.Tensor:
    """Bool mask over `scores` (flattened) with the n_prune lowest pruned; `already` pruned first.

    Ties are broken by a seeded random key, so equal-norm weights are not pruned by position.
    """
    scores = scores.double().flatten().clone()
    scores[already.flatten()] = -float("inf")
    tiebreak = torch.rand(scores.shape, generator=generator, dtype=torch.float64)
    order = torch.argsort(tiebreak, stable=True)
    order = order[torch.argsort(scores[order], stable=True)]  # by score, then by the random key
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[order[:n_prune]] = False
    return keep


def compute_masks(model: nn.Module, settings: PruneSettings, keep: float, exclude, previous: dict | None = None,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Masks that keep `keep` of the prunable weights (per scope); `previous` pruned entries stay pruned."""
    layers = prunable_layers(model, settings.method, exclude)
    if not layers:
        raise MisbenchError(f"no prunable layers left for --method {settings.method} after --exclude {list(exclude)}")
    crit = CRITERIA[settings.criterion]
    if settings.criterion == "random":
        def score(w, dims):
            return crit(w, dims, generator=generator)
    else:
        score = crit
    return METHODS[settings.method].masks(model, layers, settings, keep, previous or {}, score, generator)


@register_method("unstructured", (nn.Conv2d, nn.Linear), ("global", "local"))
def _unstructured(model, layers, settings, keep, previous, score, generator):
    masks: dict[str, torch.Tensor] = {}
    weights = {n: m.weight.detach() for n, m in layers.items()}
    already = {n: ~previous.get(f"{n}.weight", torch.ones_like(w, dtype=torch.bool)) for n, w in weights.items()}
    if settings.resolved_scope == "global":
        scores = torch.cat([score(w, None).flatten().double() for w in weights.values()])
        total = scores.numel()
        keep_mask = _ranked_prune(scores, round((1 - keep) * total), torch.cat([a.flatten() for a in already.values()]),
                                  generator)
        start = 0
        for n, w in weights.items():
            masks[f"{n}.weight"] = keep_mask[start:start + w.numel()].view_as(w)
            start += w.numel()
    else:
        for n, w in weights.items():
            m = _ranked_prune(score(w, None), round((1 - keep) * w.numel()), already[n], generator)
            masks[f"{n}.weight"] = m.view_as(w)
    return masks


def _channel_fraction(keep: float) -> float:
    # 1 - keep in floating point is a hair off the rate (1 - 0.8 = 0.19999999999999996); counts
    # must not depend on that
    return round(1 - keep, 12)


def _previous(previous, n, w):
    prev = previous.get(f"{n}.weight")
    return prev if prev is not None else torch.ones_like(w, dtype=torch.bool)


@register_method("structured", (nn.Conv2d,), ("local",), "prunes output channels of each conv")
def _structured(model, layers, settings, keep, previous, score, generator):
    masks: dict[str, torch.Tensor] = {}
    bns = following_batchnorm(model)
    fraction = _channel_fraction(keep)
    for n, conv in layers.items():
        w = conv.weight.detach()
        prev = _previous(previous, n, w)
        other = tuple(range(1, w.dim()))
        count = min(round(fraction * w.shape[0]), w.shape[0] - 1)
        channels = _ranked_prune(score(w, other), count, (~prev).all(dim=other), generator)
        masks[f"{n}.weight"] = channels.view(-1, *[1] * (w.dim() - 1)).expand_as(w).clone()
        if conv.bias is not None:
            masks[f"{n}.bias"] = channels.clone()
        if n in bns:
            masks[f"{bns[n]}.weight"] = channels.clone()
            masks[f"{bns[n]}.bias"] = channels.clone()
    return masks


@register_method("connection", (nn.Conv2d,), ("local",), "prunes input channels of each conv")
def _connection(model, layers, settings, keep, previous, score, generator):
    fraction = _channel_fraction(keep)
    return {f"{n}.weight": _connection_mask(conv.weight.detach(), conv.groups, fraction, score,
                                            _previous(previous, n, conv.weight), generator)
            for n, conv in layers.items()}


def _connection_mask(w, groups: int, fraction: float, score, prev, generator) -> torch.Tensor:
    """Input-channel mask of a (grouped) conv weight [out, in/groups, ...]: within each group, the
    int(fraction * in/groups) lowest-ranked input channels, never the group's last one (so a depthwise
    conv, one input per group, keeps all of its connections)."""
    out, per_group = w.shape[0], w.shape[1]
    grouped = w.reshape(groups, out // groups, per_group, *w.shape[2:])
    other = (1, *range(3, grouped.dim()))
    scores = score(grouped, other)  # [groups, per_group]
    already = (~prev.reshape(grouped.shape)).all(dim=other)
    count = min(int(fraction * per_group), per_group - 1)
    keep = torch.ones(groups, per_group, dtype=torch.bool)
    if count > 0 or already.any():
        for g in range(groups):
            keep[g] = _ranked_prune(scores[g], max(count, int(already[g].sum())), already[g], generator)
    view = keep.view(groups, 1, per_group, *[1] * (w.dim() - 2)).expand_as(grouped)
    return view.reshape(w.shape).clone()


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


def sparsity_of(masks: dict, weights_only: bool = True) -> float:
    """Fraction of masked-out entries among the masked weight tensors (biases and BN excluded)."""
    items = [m for k, m in masks.items() if not weights_only or k.endswith(".weight") and m.dim() >= 2]
    total = sum(m.numel() for m in items)
    return float(sum((~m).sum().item() for m in items) / total) if total else 0.0

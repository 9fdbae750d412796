"""A study's `[dictionary]` section as a grid (issue 24 item 2): layers x kinds x widths x k, each dictionary
with its untrained control and, with `controls`, its features permuted across images."""

__all__ = ["DictionaryPlan", "dictionary_grid", "dictionary_layers", "permuted_name"]

import dataclasses

from ..activations.dictionary_training import DictionarySettings
from ..activations.store import PERMUTED_SUFFIX


@dataclasses.dataclass(frozen=True)
class DictionaryPlan:
    layer: str  # the module whose units the dictionary reads
    name: str  # its features' layer name in the activation file
    file: str  # the dictionary's file name in DIR/dictionary/
    label: str  # its series in the report (kind, width, k)
    settings: DictionarySettings
    untrained: str | None  # the untrained control's features layer name (file: untrained_<file>)

    @property
    def untrained_file(self) -> str:
        return f"untrained_{self.file}"


def dictionary_layers(d: dict) -> list[str]:
    """The layers a [dictionary] section trains on: `layer` and `layers`, in order, once each."""
    return list(dict.fromkeys(([d["layer"]] if d["layer"] else []) + list(d["layers"])))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def dictionary_grid(d: dict, seed: int) -> list[DictionaryPlan]:
    """Every dictionary of the section, in layer order. One layer with one kind, width and k keeps the
    section's `name` and dictionary.pt (the single-dictionary study); a grid names each
    `<layer>_<kind>_x<width>_k<k>` (relu: no k)."""
    layers = dictionary_layers(d)
    kinds, widths = list(d["kinds"]), list(d["expansions"]) or [None]
    single = len(layers) == 1 and len(kinds) == 1 and len(widths) == 1 and len(d["ks"]) <= 1
    plans = []
    for layer in layers:
        for kind in kinds:
            for width in widths:
                for k in (list(d["ks"]) or [d["k"]]) if kind != "relu" else [d["k"]]:
                    settings = DictionarySettings(n_features=d["n_features"], k=k, steps=d["steps"], lr=d["lr"],
                                                  batch_size=d["batch_size"], seed=seed, kind=kind, expansion=width,
                                                  l1=d["l1"])
                    label = f"{kind}" + (f" x{width:g}" if width is not None else f" {d['n_features']}") + \
                        (f" k{k}" if kind != "relu" else "")
                    if single:
                        name, file = d["name"], "dictionary.pt"
                    else:
                        name = f"{_safe(layer)}_{kind}_" + (f"x{width:g}" if width is not None
                                                            else f"n{d['n_features']}") + \
                            (f"_k{k}" if kind != "relu" else "")
                        name, file = name.replace(".", "p"), f"{name.replace('.', 'p')}.pt"
                    plan = DictionaryPlan(layer, name, file, label, settings,
                                          f"{name}_untrained" if d["controls"] else None)
                    if plan not in plans:
                        plans.append(plan)
    return plans


def permuted_name(name: str) -> str:
    return name + PERMUTED_SUFFIX

"""A study's `[dictionary]` section as a grid (issue 24 item 2): layers x kinds x widths x k, each dictionary
with its untrained control and, with `controls`, its features permuted across images."""

__all__ = ["DictionaryPlan", "dictionary_grid", "dictionary_layers", "dictionary_settings", "permuted_name",
           "grid_problems", "feature_problems"]

import dataclasses

import torch

from ..activations.dictionary import load_dictionary, parse_features, width_mismatch
from ..activations.dictionary_kinds import KINDS
from ..activations.dictionary_training import DictionarySettings
from ..activations.hooks import probe_outputs
from ..activations.store import PERMUTED_SUFFIX
from ..activations.tokens import as_positions, channels_last_modules, output_layout
from ..errors import MisbenchError, close_matches
from .network import study_network


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


def dictionary_settings(d: dict) -> dict:
    """The section as the steps record it: `positions` and `metrics` only when set, so that a study from before
    those fields keeps its finished dictionary steps."""
    return {k: v for k, v in d.items() if not (k in ("positions", "metrics") and v is None)}


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


def _layer_units(config, layers: list[str], key: str) -> tuple[dict, list[str]]:
    """Units per position of each of `layers` in the study's network (its architecture, randomly initialised: no
    weight file is read), from one forward pass; and a line for each layer that is no module or does not run,
    starting `config KEY:`."""
    m = config["model"]
    try:
        loaded = study_network(m, skeleton=True)
    except MisbenchError:  # a missing model file: the dry run names it among the missing inputs
        return {}, []
    model = loaded.model
    modules = [name for name, _ in model.named_modules() if name]
    problems = [f"config {key}: {layer!r} is not a module of {m['spec'] or m['arch']}."
                f"{close_matches(layer, modules)} `misbench layers MODEL` lists them"
                for layer in layers if layer not in modules]
    known = [layer for layer in layers if layer in modules]
    crop = loaded.preprocess.crop
    shapes = probe_outputs(model, known, torch.zeros(1, 3, crop, crop))
    grids = channels_last_modules(model)
    units = {}
    for layer in known:
        if layer not in shapes:
            problems.append(f"config {key}: {layer!r} does not run in an inference forward pass of "
                            f"{m['spec'] or m['arch']}; choose a module on the inference path")
            continue
        output = shapes[layer]
        units[layer] = int(as_positions(output, output_layout(output, layer in grids)).shape[-1])
    return units, problems


def grid_problems(config) -> list[str]:
    """One line per dictionary of the grid that cannot be trained on the study's network: a layer that is no
    module of it, an expansion that gives less than one feature, a k above a top-k dictionary's width. Each
    names the [dictionary] field and its fix (study --dry-run lists them before any step runs)."""
    d = config["dictionary"]
    layers = dictionary_layers(d)
    if not layers:
        return []
    key = "layer" if d["layer"] and not d["layers"] else "layers"
    units, problems = _layer_units(config, layers, f"[dictionary] {key}")
    for plan in dictionary_grid(d, 0):
        s, n = plan.settings, units.get(plan.layer)
        if n is None:
            continue
        if s.expansion is not None and round(s.expansion * n) < 1:
            problems.append(f"config [dictionary] expansions: {s.expansion:g} x {plan.layer}'s {n} units gives "
                            f"{s.expansion * n:.3g} features (less than one): use expansions of at least "
                            f"{1 / n:.3g} for this layer")
            continue
        width = round(s.expansion * n) if s.expansion is not None else s.n_features
        if KINDS[s.kind].uses_k and s.k > width:
            key = "ks" if d["ks"] else "k"
            size = f"{s.expansion:g} x {n} units of {plan.layer}" if s.expansion is not None else "n_features"
            problems.append(f"config [dictionary] {key}: k {s.k} exceeds the {width} features of {plan.label} on "
                            f"{plan.layer} ({size}): a top-k dictionary keeps k of its features per input; "
                            f"lower {key} or raise {'expansions' if s.expansion is not None else 'n_features'}")
    return list(dict.fromkeys(problems))  # an expansion's line once, whatever the kinds and k


def feature_problems(config) -> list[str]:
    """One line per [extract] features dictionary file the study cannot use: missing, unreadable, of no known
    format, or of another width than its layer's units in the study's network (study --dry-run, before any step
    runs; the step itself would find it only after the training before it)."""
    problems, read = [], []
    for text in config["extract"]["features"]:
        spec = parse_features(text)
        try:
            read.append((spec, load_dictionary(spec.file)))
        except MisbenchError as err:
            problems.append(f"config [extract] features {spec.text()}: {err}")
    units, bad = _layer_units(config, list(dict.fromkeys(spec.layer for spec, _ in read)), "[extract] features")
    for spec, dictionary in read:
        n = units.get(spec.layer)
        if n is not None and n != dictionary.width:
            problems.append(f"config [extract] features {spec.text()}: {width_mismatch(dictionary, spec.layer, n)}; "
                            "use a dictionary trained on this layer")
    return bad + problems

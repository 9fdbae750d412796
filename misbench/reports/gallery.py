"""Pictures of units: the explanations and queries of their tasks, with the decision."""

__all__ = ["choose_units", "unit_gallery", "unit_galleries"]

from pathlib import Path

import h5py
import numpy as np

from ..errors import MisbenchError
from ..images import RowImages
from ..store import open_activations
from .figures import plt


def choose_units(scores: list[dict], extra: list[str] = ()) -> list[tuple[str, int, str]]:
    """(layer, unit, why): highest, median and lowest MIS confidence, plus `layer:index` requests."""
    ok = sorted((r for r in scores if r["status"] == "ok"), key=lambda r: r["mis_confidence"])
    chosen = []
    if ok:
        for why, r in (("highest", ok[-1]), ("median", ok[len(ok) // 2]), ("lowest", ok[0])):
            chosen.append((r["layer"], r["unit"], f"{why} MIS confidence"))
    for spec in extra:
        layer, _, index = spec.rpartition(":")
        if not layer or not index.isdigit():
            raise MisbenchError(f"--unit {spec!r}: expected LAYER:INDEX, e.g. softmax:3")
        chosen.append((layer, int(index), "requested"))
    return list(dict.fromkeys(chosen))


def unit_gallery(tasks_h5, acts_path, layer: str, unit: int, out_png, n_tasks: int = 2, size: int = 64) -> dict:
    with h5py.File(tasks_h5, "r") as t:
        if layer not in t:
            raise MisbenchError(f"{tasks_h5} has no tasks for layer {layer!r}")
        units = list(t[layer]["unit"][...])
        if unit not in units:
            raise MisbenchError(f"{tasks_h5} has no tasks for {layer}:{unit} (scored units: {units[:5]}...)")
        k = units.index(unit)
        g = {key: t[layer][key][k] for key in ("pos_expl", "neg_expl", "pos_query", "neg_query", "delta")}
    if (g["pos_query"] < 0).all():
        raise MisbenchError(f"{layer}:{unit} is a constant unit: it has no tasks to show")
    n_tasks = min(n_tasks, len(g["delta"]))
    n_expl = g["pos_expl"].shape[1]
    with open_activations(acts_path) as acts:
        rows = np.concatenate([np.concatenate([g["pos_expl"][i], [g["pos_query"][i], g["neg_query"][i]], g["neg_expl"][i]])
                               for i in range(n_tasks)])
        images = RowImages(acts, rows, size)
        pictures = [images[j][0].permute(1, 2, 0).numpy() for j in range(len(rows))]
    cols = 2 * n_expl + 2
    fig, axes = plt.subplots(n_tasks, cols, figsize=(cols * 0.75, n_tasks * 1.05 + 0.4), squeeze=False)
    labels = ["E+"] * n_expl + ["q+", "q-"] + ["E-"] * n_expl
    for i in range(n_tasks):
        for j in range(cols):
            ax = axes[i, j]
            ax.imshow(pictures[i * cols + j])
            ax.set_xticks([]), ax.set_yticks([])
            colour = {"E+": "tab:orange", "E-": "tab:blue"}.get(labels[j], "black")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2 if labels[j].startswith("q") else 1)
            if i == 0:
                ax.set_title(labels[j], fontsize=7)
        delta = float(g["delta"][i])
        axes[i, 0].set_ylabel(f"task {i}\n{'correct' if delta > 0 else 'wrong'}\nδ={delta:.3g}", fontsize=6)
    fig.suptitle(f"{layer}:{unit} - explanations E+/E-, queries q+/q-", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return {"layer": layer, "unit": unit, "deltas": [float(d) for d in g["delta"][:n_tasks]]}


def unit_galleries(out_dir, scores: list[dict], tasks_h5, acts_path, extra=(), prefix: str = "") -> list[tuple[str, str]]:
    """Pictures of the chosen units under out_dir/units/: [(relative path, caption)]."""
    (Path(out_dir) / "units").mkdir(parents=True, exist_ok=True)
    made = []
    for layer, unit, why in choose_units(scores, extra):
        name = f"units/{prefix}{layer.replace('/', '_')}_{unit}.png"
        unit_gallery(tasks_h5, acts_path, layer, unit, Path(out_dir) / name)
        made.append((name, f"{layer}:{unit} ({why})"))
    return made

"""Pictures of units: the explanations and queries of their tasks, with the decision."""

__all__ = ["choose_units", "unit_gallery", "unit_galleries", "ConstantUnit"]

import logging
from pathlib import Path

import matplotlib
import numpy as np

from ..activations.store import open_activations
from ..datasets.images import RowImages
from ..errors import MisbenchError
from ..scoring.results import TASK_ARRAYS, read_tasks
from .figures import DPI, MIN_FONT_PT, subplots

log = logging.getLogger(__name__)


class ConstantUnit(MisbenchError):
    """A chosen unit never varies: it has no tasks, so there is nothing to picture."""


def _unit_values(acts, layer: str, unit: int, rows: np.ndarray) -> np.ndarray:
    """The unit's activation on each row: from the full column, or from the kept top/bottom-k values."""
    group = acts.layer(layer)
    if "activations" in group:
        return np.asarray(group["activations"][:, unit], float)[rows]
    kept = dict(zip(np.concatenate([group["top_index"][unit], group["bottom_index"][unit]]).tolist(),
                    np.concatenate([group["top_value"][unit], group["bottom_value"][unit]]).tolist()))
    return np.array([kept.get(int(r), np.nan) for r in rows], float)


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
    tasks = read_tasks(tasks_h5, [layer])[layer]
    units = [int(u) for u in tasks["unit"]]
    if unit not in units:
        more = ", ..." if len(units) > 5 else ""
        raise MisbenchError(f"{tasks_h5} has no tasks for {layer}:{unit} (scored units of {layer}: "
                            f"{', '.join(map(str, units[:5]))}{more})")
    g = {key: tasks[key][units.index(unit)] for key in TASK_ARRAYS}
    if (g["pos_query"] < 0).all():
        raise ConstantUnit(f"{layer}:{unit} is a constant unit: it has no tasks to show")
    n_tasks = min(n_tasks, len(g["delta"]))
    n_expl = g["pos_expl"].shape[1]
    with open_activations(acts_path) as acts:
        rows = np.concatenate([np.concatenate([g["pos_expl"][i], [g["pos_query"][i], g["neg_query"][i]], g["neg_expl"][i]])
                               for i in range(n_tasks)])
        images = RowImages(acts, rows, size)
        pictures = [images[j][0].permute(1, 2, 0).numpy() for j in range(len(rows))]
        values = _unit_values(acts, layer, unit, rows)
    per_task = values.reshape(n_tasks, 2 * n_expl + 2)
    # per task two rows at the report's text size (>= 11 px at 100 %), about 900 px wide: the positive
    # explanations then q+, the negative explanations then q-
    cols = n_expl + 1
    fig, axes = subplots(2 * n_tasks, cols, figsize=(cols * 0.8 + 1.0, 2 * n_tasks * 1.05 + 0.5), squeeze=False)
    for i in range(n_tasks):
        first = i * (2 * n_expl + 2)
        shown = [(list(range(n_expl)) + [n_expl], "E+", "q+"),
                 (list(range(n_expl + 2, 2 * n_expl + 2)) + [n_expl + 1], "E-", "q-")]
        for half, (positions, expl, query) in enumerate(shown):
            row = 2 * i + half
            for j, pos in enumerate(positions):
                ax = axes[row, j]
                ax.imshow(pictures[first + pos])
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_xlabel(f"{values[first + pos]:.3g}", fontsize=MIN_FONT_PT, labelpad=1)
                label = query if j == n_expl else expl
                for spine in ax.spines.values():
                    spine.set_edgecolor({"E+": "tab:orange", "E-": "tab:blue"}.get(label, "black"))
                    spine.set_linewidth(3 if label.startswith("q") else 1.5)
                if row == 0 or (half == 1 and i == 0):
                    ax.set_title(label, fontsize=MIN_FONT_PT)
        delta = float(g["delta"][i])
        axes[2 * i, 0].set_ylabel(f"task {i}\n{'correct' if delta > 0 else 'wrong'}", fontsize=MIN_FONT_PT)
        axes[2 * i + 1, 0].set_ylabel(f"δ={delta:.3g}", fontsize=MIN_FONT_PT)
    fig.suptitle(f"{layer}:{unit}: explanations E+ (orange) and E- (blue), queries q+ and q-; activation under each",
                 fontsize=MIN_FONT_PT + 1)
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(Path(out_png).with_suffix(".svg"))
    return {"layer": layer, "unit": unit, "deltas": [float(d) for d in g["delta"][:n_tasks]],
            "pos_expl": per_task[:, :n_expl].tolist(), "queries": per_task[:, n_expl:n_expl + 2].tolist(),
            "neg_expl": per_task[:, n_expl + 2:].tolist()}


def unit_galleries(out_dir, scores: list[dict], tasks_h5, acts_path, extra=(), prefix: str = "") -> list[dict]:
    """Pictures of the chosen units under out_dir/units/: one dict per unit with `path` (relative), `caption`,
    `why` and the gallery's values, or `skipped` (the reason) for a constant unit, which has no tasks: it is
    reported, not fatal, so that one requested constant unit does not stop the whole report."""
    (Path(out_dir) / "units").mkdir(parents=True, exist_ok=True)
    made = []
    for layer, unit, why in choose_units(scores, extra):
        name = f"units/{prefix}{layer.replace('/', '_')}_{unit}.png"
        caption = f"{layer}:{unit} ({why})"
        try:
            info = unit_gallery(tasks_h5, acts_path, layer, unit, Path(out_dir) / name)
        except ConstantUnit as err:
            log.warning("%s; left out of the report's unit pictures", err)
            made.append({"caption": caption, "why": why, "layer": layer, "unit": unit, "skipped": str(err)})
            continue
        made.append({**info, "path": name, "caption": caption, "why": why})
    return made

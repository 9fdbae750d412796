"""A page for every unit, browsable by layer (as OpenAI Microscope and lucent show units), and the same from Python.

`unit_images` returns a unit's top or bottom images with their activations from an activation file alone;
`plot_unit` draws them (and, with a tasks file, some of the unit's tasks) on a matplotlib Figure;
`unit_pages` writes, per run, `units/<run>/index.html` (its layers), `units/<run>/<layer>/index.html` (every
unit as a tile, sorted by MIS confidence: MIS, interval, status, a strip of its top images) and
`units/<run>/<layer>/<unit>.html` (top and bottom images with activations, a few tasks, MIS, confidence, both
intervals, status). Thumbnails are small JPEGs under `units/img/`, one per image (named by the image's content
digest), shared by every unit, layer and run that shows the image, and lazy-loaded.
"""

__all__ = ["unit_images", "ranked_rows", "plot_unit", "unit_pages", "page_href", "page_weight", "write_thumbnails",
           "THUMB_SIZE", "THUMB_QUALITY", "INDEX_BYTES_PER_UNIT", "UNIT_PAGE_BYTES"]

import hashlib
import html
import logging
import re
from pathlib import Path

import numpy as np

from ..activations.store import ActivationFile, open_activations
from ..datasets.images import RowImages
from ..errors import MisbenchError
from ..runtime.fileio import write_text
from ..scoring.results import TASK_ARRAYS, read_tasks
from .figures import MIN_FONT_PT, subplots
from .html import STYLE, page

log = logging.getLogger(__name__)

THUMB_SIZE = 56       # px: a strip of 5 fits a tile; 9 fit a phone's width
THUMB_QUALITY = 70    # JPEG quality: ~1-2 KB per natural image at THUMB_SIZE (docs/reports.md, page-weight budget)
STRIP = 4             # top images on a layer index tile
# page-weight budget (docs/reports.md; benchmarks/unit_pages.py measures it on GoogLeNet's 8,280 units): every
# layer index with all the thumbnails it shows, per unit listed (8,280 x 6,000 B < 50 MB), and one unit page
# with all its images
INDEX_BYTES_PER_UNIT = 6_000
UNIT_PAGE_BYTES = 150_000
SIDES = ("top", "bottom")


def _safe(name: str) -> str:
    return name.replace("/", "_")


def page_href(run: str, layer: str, unit: int | None = None) -> str:
    """A unit page (or with unit None the layer index) relative to the report folder."""
    base = f"units/{_safe(run)}/{_safe(layer)}"
    return f"{base}/index.html" if unit is None else f"{base}/{unit}.html"


def ranked_rows(values: np.ndarray, k: int, side: str) -> np.ndarray:
    """The k rows with the highest (`top`) or lowest (`bottom`) values per column of values [N, U] -> [U, k],
    in rank order (equal values in row order; NaNs never ranked)."""
    v = np.asarray(values)
    v = np.where(np.isfinite(v), v, -np.inf if side == "top" else np.inf)
    key = -v if side == "top" else v
    k = min(k, v.shape[0])
    part = np.argpartition(key, k - 1, axis=0)[:k] if k < v.shape[0] else np.arange(v.shape[0])[:, None].repeat(v.shape[1], 1)
    order = np.lexsort((part, np.take_along_axis(key, part, 0)), axis=0)
    return np.take_along_axis(part, order, 0).T


def _check_side(side, k):
    if side not in SIDES:
        raise MisbenchError(f"side={side!r}: expected one of {', '.join(SIDES)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MisbenchError(f"k={k!r}: expected a whole number of images >= 1")


def _unit_column(acts: ActivationFile, layer: str, unit) -> tuple:
    """(kind, data): the unit's full column, or its kept top/bottom rows and values."""
    group = acts.layer(layer)  # names the file and its layers when `layer` is not there
    n_units = group["activations"].shape[1] if "activations" in group else group["top_index"].shape[0]
    if isinstance(unit, bool) or not isinstance(unit, (int, np.integer)) or not 0 <= unit < n_units:
        raise MisbenchError(f"unit={unit!r}: layer {layer!r} of {acts.path} has units 0..{n_units - 1}")
    if "activations" in group:
        return "full", np.asarray(group["activations"][:, int(unit)], np.float64)
    return "kept", {s: (group[f"{s}_index"][int(unit)], group[f"{s}_value"][int(unit)]) for s in SIDES}


def unit_images(acts, layer: str, unit: int, k: int = 9, side: str = "top", size: int = 64) -> dict:
    """A unit's `k` most (side="top") or least ("bottom") activating images, from an activation file alone
    (no tasks file): {"rows", "paths", "activations" [k], "images" uint8 [k, size, size, 3]} in rank order.
    `acts`: an acts.h5 path or an open activation file; `size`: the images' side in pixels (the model's view)."""
    _check_side(side, k)
    if not isinstance(acts, ActivationFile):
        with open_activations(acts) as opened:
            return unit_images(opened, layer, unit, k, side, size)
    kind, data = _unit_column(acts, layer, unit)
    if kind == "full":
        rows = ranked_rows(data[:, None], k, side)[0]
        values = data[rows]
    else:
        rows, values = (np.asarray(a)[:k] for a in data[side])
    images = RowImages(acts, rows, size)
    pictures = np.stack([(images[j][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                         for j in range(len(rows))]) if len(rows) else np.zeros((0, size, size, 3), np.uint8)
    paths = acts.paths
    return {"layer": layer, "unit": int(unit), "side": side, "rows": np.asarray(rows, np.int64),
            "paths": [paths[int(r)] for r in rows], "activations": np.asarray(values, np.float64), "images": pictures}


def _tasks_of(tasks_h5, layer: str, unit: int) -> dict | None:
    """The unit's tasks (row indices and deltas), None for a unit without tasks (constant)."""
    tasks = read_tasks(tasks_h5, [layer])[layer]
    units = [int(u) for u in tasks["unit"]]
    if unit not in units:
        raise MisbenchError(f"{tasks_h5} has no tasks for {layer}:{unit}: that unit was not scored")
    g = {key: tasks[key][units.index(unit)] for key in TASK_ARRAYS}
    return None if (g["pos_query"] < 0).all() else g


def plot_unit(acts, layer: str, unit: int, k: int = 9, tasks=None, n_tasks: int = 2, size: int = 64):
    """A matplotlib Figure (no pyplot) of a unit: its top and bottom `k` images with their activations and,
    with `tasks` (the score run's tasks.h5), its first `n_tasks` tasks (E+, q+, q-, E-, the decision δ)."""
    with (open_activations(acts) if not isinstance(acts, ActivationFile) else _Borrowed(acts)) as a:
        sides = [unit_images(a, layer, unit, k, side, size) for side in SIDES]
        task_rows = []
        g = _tasks_of(tasks, layer, unit) if tasks is not None else None
        if g is not None:
            for t in range(min(n_tasks, len(g["delta"]))):
                rows = np.concatenate([g["pos_expl"][t], [g["pos_query"][t], g["neg_query"][t]], g["neg_expl"][t]])
                task_rows.append((f"task {t}: δ={float(g['delta'][t]):.3g}", rows))
        if task_rows:
            images = RowImages(a, np.concatenate([r for _, r in task_rows]), size)
            pics = [(images[j][0].permute(1, 2, 0).numpy()) for j in range(len(images))]
            values = _row_values(a, layer, unit, np.concatenate([r for _, r in task_rows]))
    cols = max(k, *(len(r) for _, r in task_rows)) if task_rows else k
    fig, axes = subplots(2 + len(task_rows), cols, figsize=(cols * 0.85, (2 + len(task_rows)) * 1.15 + 0.4),
                         squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_frame_on(False)
    for i, s in enumerate(sides):
        axes[i, 0].set_ylabel(s["side"], fontsize=MIN_FONT_PT + 1)
        for j in range(len(s["rows"])):
            axes[i, j].imshow(s["images"][j])
            axes[i, j].set_xlabel(f"{s['activations'][j]:.3g}", fontsize=MIN_FONT_PT, labelpad=1)
    pos = 0
    for i, (label, rows) in enumerate(task_rows, start=2):
        axes[i, 0].set_ylabel(label.replace(": ", "\n"), fontsize=MIN_FONT_PT)
        for j in range(len(rows)):
            axes[i, j].imshow(pics[pos + j])
            axes[i, j].set_xlabel(f"{values[pos + j]:.3g}", fontsize=MIN_FONT_PT, labelpad=1)
        pos += len(rows)
    fig.suptitle(f"{layer}:{unit}: top and bottom {k} images (activation under each)"
                 + (", then tasks: E+, q+, q-, E-" if task_rows else ""), fontsize=MIN_FONT_PT + 1)
    fig.tight_layout()
    return fig


class _Borrowed:
    """An open activation file used as a context without closing it."""

    def __init__(self, acts):
        self.acts = acts

    def __enter__(self):
        return self.acts

    def __exit__(self, *exc):
        return False


def _row_values(acts: ActivationFile, layer: str, unit: int, rows) -> np.ndarray:
    kind, data = _unit_column(acts, layer, unit)
    if kind == "full":
        return data[np.asarray(rows, np.int64)]
    kept = {}
    for side in SIDES:
        kept.update(zip(np.asarray(data[side][0]).tolist(), np.asarray(data[side][1]).tolist()))
    return np.array([kept.get(int(r), np.nan) for r in rows], float)


# ---------------------------------------------------------------------------------------------- the pages

def _image_keys(acts: ActivationFile, rows: np.ndarray) -> list[str]:
    """One file name per image: its content digest where extraction recorded it, else the data's identity and
    the image's dataset index (the same image gets the same thumbnail in every run)."""
    if acts.digests is not None:
        return [d.decode()[:20] for d in acts.digests[rows]]
    ident = hashlib.sha256(f"{acts.attrs.get('data')}|{acts.attrs.get('data_root', '')}".encode()).hexdigest()[:8]
    return [f"{ident}-{i}" for i in acts.index[rows].tolist()]


def write_thumbnails(img_dir: Path, keys: list[str], pictures) -> int:
    """JPEG thumbnails `img_dir/<key>.jpg` for the keys not there yet; `pictures(positions)` -> uint8 images.
    Returns how many were made."""
    from PIL import Image  # Pillow comes with torchvision; loaded only when thumbnails are made

    img_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i, key in enumerate(keys) if not (img_dir / f"{key}.jpg").exists()]
    for start in range(0, len(todo), 256):
        block = todo[start:start + 256]
        for i, pic in zip(block, pictures(block)):
            tmp = img_dir / f".{keys[i]}.jpg.tmp"
            Image.fromarray(pic).save(tmp, "JPEG", quality=THUMB_QUALITY, optimize=True)
            tmp.replace(img_dir / f"{keys[i]}.jpg")
    return len(todo)


def _fmt(value, digits: int = 3) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if not np.isfinite(value) else f"{value:.{digits}g}"


def _interval(row, lo: str, hi: str) -> str:
    return f"[{_fmt(row.get(lo))}, {_fmt(row.get(hi))}]"


def _img(src: str, alt: str, value=None, label: str = "") -> str:
    cap = f"<figcaption>{label}{_fmt(value)}</figcaption>" if value is not None else ""
    return (f"<figure><img src='{src}' loading='lazy' width='72' height='72' alt='{html.escape(alt)}'>{cap}</figure>")


def page_weight(html_path) -> int:
    """Bytes a browser loads for a page: the HTML and every local file it references (src/href of images and
    style sheets), each once."""
    html_path = Path(html_path)
    text = html_path.read_text()
    refs = set(re.findall(r"(?:src|rel='stylesheet' href)='([^']+)'", text))
    return len(text.encode()) + sum((html_path.parent / r).stat().st_size for r in refs)


def _unit_page(run: str, layer: str, row: dict, sides: dict, tasks: list, img: str, nav: str) -> str:
    unit = row["unit"]
    who = f"{run} {layer}:{unit}"
    facts = [("status", row.get("status", "-")), ("MIS", f"{_fmt(row.get('mis'))} {_interval(row, 'mis_ci_low', 'mis_ci_high')}"),
             ("MIS confidence", f"{_fmt(row.get('mis_confidence'))} {_interval(row, 'conf_ci_low', 'conf_ci_high')}"),
             ("tasks", row.get("n_tasks", "-"))]
    body = [f"<p class='note'>{nav}</p><h1>Unit {html.escape(layer)}:{unit} of {html.escape(run)}</h1>",
            "<table class='facts'><caption>Scores (95 % intervals: Clopper-Pearson for MIS, bootstrap over tasks "
            "for the confidence)</caption>"
            + "".join(f"<tr><th scope='row'>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts) + "</table>"]
    for side, (keys, values) in sides.items():
        body.append(f"<h2>{side.capitalize()} {len(keys)} images (activation under each)</h2><div class='grid "
                    f"{'pos' if side == 'top' else 'neg'}'>"
                    + "".join(_img(f"{img}/{k}.jpg", f"{who} {side} image {i + 1}", v)
                              for i, (k, v) in enumerate(zip(keys, values))) + "</div>")
    if tasks:
        body.append("<h2>Tasks</h2><p class='note'>Each task: the 9 positive explanations E+ (orange), the queries "
                    "q+ and q-, the 9 negative explanations E- (blue); the similarity decides correctly when δ > 0.</p>")
    for t, (delta, groups) in enumerate(tasks):
        body.append(f"<h3>Task {t}: δ = {_fmt(delta)}, {'correct' if delta > 0 else 'wrong' if delta < 0 else 'tie'}</h3>")
        for label, css, keys, values in groups:
            names = label.split() if len(label.split()) == len(keys) else [label] * len(keys)
            body.append(f"<div class='grid {css}'>" + "".join(
                _img(f"{img}/{k}.jpg", f"{who} task {t} {name}", v, f"{name} " if css == "" else "")
                for k, v, name in zip(keys, values, names)) + "</div>")
    return page(f"{who}: MIS {_fmt(row.get('mis'))}", "".join(body), css_href="../../units.css", script=False)


def _tile(run: str, layer: str, row: dict, keys: list, img: str) -> str:
    unit = row["unit"]
    strip = "".join(f"<img src='{img}/{k}.jpg' loading='lazy' width='48' height='48' alt='{html.escape(run)} "
                    f"{html.escape(layer)}:{unit} top image {i + 1}'>" for i, k in enumerate(keys[:STRIP]))
    return (f"<div class='tile'><a href='{unit}.html'><strong>unit {unit}</strong></a> {html.escape(row.get('status', ''))}"
            f"<br>MIS {_fmt(row.get('mis'))}, confidence {_fmt(row.get('mis_confidence'))} "
            f"{_interval(row, 'conf_ci_low', 'conf_ci_high')}<div class='strip'>{strip}</div></div>")


def _sort_key(row):
    conf = row.get("mis_confidence")
    conf = float(conf) if conf not in (None, "") else np.nan
    return (not np.isfinite(conf), -conf if np.isfinite(conf) else 0.0, row["unit"])


def unit_pages(out_dir, run: str, scores: list[dict], acts_path, tasks_h5=None, layers=None, k: int = 9,
               n_tasks: int = 2, thumbs=None) -> dict:
    """Write the unit pages of one run under out_dir/units/ (see the module's docstring).

    scores: mis.csv rows (read_scores); layers: which of its layers (default all); thumbs: a callable
    (acts, rows) -> uint8 images [n, THUMB_SIZE, THUMB_SIZE, 3] (default: the images behind the rows, read
    back at THUMB_SIZE). Returns {"index": href, "layers": {layer: href}, "units": {(layer, unit): href},
    "n_thumbnails": made}."""
    out_dir = Path(out_dir)
    have = list(dict.fromkeys(r["layer"] for r in scores))
    layers = list(layers) if layers else have
    unknown = [name for name in layers if name not in have]
    if unknown:
        raise MisbenchError(f"unit pages of {run}: layers {', '.join(unknown)} were not scored (scored: {', '.join(have)})")
    units_dir = out_dir / "units"
    img_dir = units_dir / "img"
    units_dir.mkdir(parents=True, exist_ok=True)
    write_text(units_dir / "units.css", STYLE)
    made, links = 0, {}
    tasks = read_tasks(tasks_h5) if tasks_h5 is not None else {}
    with open_activations(acts_path) as acts:
        if thumbs is None:
            def thumbs(a, rows):
                images = RowImages(a, rows, THUMB_SIZE)
                return [(images[j][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for j in range(len(rows))]
        for layer in layers:
            rows = sorted((r for r in scores if r["layer"] == layer), key=_sort_key)
            group = acts.layer(layer)
            ranked = {}
            if "activations" in group:
                values = group["activations"][...]
                for side in SIDES:
                    idx = ranked_rows(values, k, side)
                    ranked[side] = (idx, np.take_along_axis(values, idx.T, 0).T)

                def value_of(u, rws):
                    return values[rws, u]
            else:
                for side in SIDES:
                    ranked[side] = (group[f"{side}_index"][:, :k], np.asarray(group[f"{side}_value"][:, :k], np.float64))

                def value_of(u, rws, layer=layer):
                    return _row_values(acts, layer, u, rws)
            task_data = {}
            if layer in tasks:
                g = tasks[layer]
                for i, u in enumerate(int(u) for u in g["unit"]):
                    if (g["pos_query"][i] >= 0).any():
                        task_data[u] = {key: g[key][i][:n_tasks] for key in TASK_ARRAYS}
            # every row any page of this layer shows, each thumbnail made once
            need = [ranked[s][0][[r["unit"] for r in rows]].ravel() for s in SIDES]
            for tk in task_data.values():
                need += [tk["pos_expl"].ravel(), tk["neg_expl"].ravel(), tk["pos_query"], tk["neg_query"]]
            need = np.unique(np.concatenate(need).astype(np.int64))
            keys = dict(zip(need.tolist(), _image_keys(acts, need)))
            key_list = [keys[r] for r in need.tolist()]
            made += write_thumbnails(img_dir, key_list, lambda pos: thumbs(acts, need[pos]))
            layer_dir = units_dir / _safe(run) / _safe(layer)
            img = "../../img"
            nav = (f"<a href='../../../report.html'>report</a> / <a href='../index.html'>{html.escape(run)}</a> / "
                   f"<a href='index.html'>{html.escape(layer)}</a>")
            for r in rows:
                u = r["unit"]
                sides = {s: ([keys[int(x)] for x in ranked[s][0][u]], ranked[s][1][u]) for s in SIDES}
                shown = []  # not `tasks`: that holds the tasks file's layers
                if u in task_data:
                    tk = task_data[u]
                    for t in range(len(tk["delta"])):
                        groups = []
                        for label, css, rws in (("E+", "pos", tk["pos_expl"][t]),
                                                ("q+ q-", "", [tk["pos_query"][t], tk["neg_query"][t]]),
                                                ("E-", "neg", tk["neg_expl"][t])):
                            rws = np.asarray(rws, np.int64)
                            groups.append((label, css, [keys[int(x)] for x in rws], value_of(u, rws)))
                        shown.append((float(tk["delta"][t]), groups))
                write_text(layer_dir / f"{u}.html", _unit_page(run, layer, r, sides, shown, img, nav))
                links[(layer, u)] = page_href(run, layer, u)
            tiles = "".join(_tile(run, layer, r, [keys[int(x)] for x in ranked["top"][0][r["unit"]]], img) for r in rows)
            head = (f"<p class='note'><a href='../../../report.html'>report</a> / <a href='../index.html'>"
                    f"{html.escape(run)}</a></p><h1>Layer {html.escape(layer)} of {html.escape(run)}: {len(rows)} units</h1>"
                    "<p class='note'>Sorted by MIS confidence (highest first; constant units last), with its 95 % "
                    f"bootstrap interval; the strip shows each unit's top {STRIP} images.</p>")
            write_text(layer_dir / "index.html", page(f"{run} {layer}: units", head + f"<div class='tiles'>{tiles}</div>",
                                                      css_href="../../units.css", script=False))
    run_dir = units_dir / _safe(run)
    items = "".join(f"<li><a href='{_safe(layer)}/index.html'>{html.escape(layer)}</a> "
                    f"({sum(1 for r in scores if r['layer'] == layer)} units)</li>" for layer in layers)
    write_text(run_dir / "index.html", page(f"{run}: units by layer", f"<p class='note'><a href='../../report.html'>"
                                            f"report</a></p><h1>Units of {html.escape(run)} by layer</h1><ul>{items}</ul>",
                                            css_href="../units.css", script=False))
    log.info("unit pages of %s: %d layers, %d units, %d new thumbnails", run, len(layers), len(links), made)
    return {"index": f"units/{_safe(run)}/index.html", "layers": {name: page_href(run, name) for name in layers},
            "units": links, "n_thumbnails": made}

"""Figures in the style of the seed paper; each function returns the saved Figure for inspection."""

__all__ = ["subplots", "classwise_figure", "sweep_figure", "curves_figure", "layers_figure", "compare_figure", "depth_figure", "class_scatter_figure",
           "layer_runs_figure", "unit_distribution_figure", "paired_figure", "classwise_runs_figure", "METHOD_COLOURS",
           "MIN_FONT_PT", "DPI"]

from pathlib import Path

import matplotlib
import matplotlib.text
import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from .stats import moving_average

# the seed's Fig. 4 colours: unstructured red, structured blue, connection green
METHOD_COLOURS = {"unstructured": "tab:red", "structured": "tab:blue", "connection": "tab:green", "none": "tab:gray"}
SCHEDULE_STYLES = {"oneshot": "-", "iterative": "--"}


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, **kwargs):
    """pyplot.subplots without pyplot: the Figure draws with Agg on savefig, so no backend is selected and
    a notebook or GUI session that imports misbench keeps its own."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


# the pages show figures at their natural size: text of MIN_FONT_PT points at DPI is >= 11 px at 100 % zoom
DPI = 100
MIN_FONT_PT = 8


def readable(fig):
    """Raise every text of the figure (titles, labels, tick labels, legends) to at least MIN_FONT_PT."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            size = axis.get_ticklabels()[0].get_fontsize() if axis.get_ticklabels() else MIN_FONT_PT
            ax.tick_params(axis="x" if axis is ax.xaxis else "y", labelsize=max(MIN_FONT_PT, size))
    for text in fig.findobj(matplotlib.text.Text):
        if text.get_fontsize() < MIN_FONT_PT:
            text.set_fontsize(MIN_FONT_PT)
    return fig


def _save(fig, path):
    """PNG for the page and an SVG twin beside it (vector copies for papers; text stays editable text)."""
    readable(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(Path(path).with_suffix(".svg"))
    return fig


def classwise_figure(rows: list[dict], path, title: str = ""):
    """Fig. 6: class accuracy (blue) and MIS confidence (red) per unit, with moving averages."""
    units = np.array([r["class"] for r in rows])
    acc = np.array([r["accuracy"] if r["accuracy"] is not None else np.nan for r in rows], float)
    conf = np.array([r["mis_confidence"] for r in rows], float)
    window = max(3, len(rows) // 20)
    fig, ax = subplots(figsize=(9, 4))
    ax.plot(units, acc, ".", color="tab:blue", alpha=0.35, label="class accuracy")
    ax.plot(units, conf, ".", color="tab:red", alpha=0.35, label="MIS confidence")
    ax.plot(units, moving_average(acc, window), "-", color="tab:blue", lw=2, label=f"accuracy, moving average ({window})")
    ax.plot(units, moving_average(conf, window), "-", color="tab:red", lw=2, label=f"MIS confidence, moving average ({window})")
    ax.set_xlabel("unit (class index)")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "Class accuracy and MIS confidence per softmax unit")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


METHOD_MARKERS = {"unstructured": "o", "structured": "s", "connection": "^", "none": "D"}


def sweep_figure(runs: list[dict], metric: str, path, ylabel: str, band: tuple | None = None):
    """Figs. 1/3/4/5: a metric against pruning rate per method and schedule; not-retrained runs in black.

    Every line starts at rate 0 from the unpruned run of its kind (retrained control, or the
    unretrained base), as in the seed's figures.
    """
    fig, ax = subplots(figsize=(6, 4))
    groups, anchors = {}, {}
    for r in runs:
        if r.get(metric) is None or not np.isfinite(r[metric]):
            continue
        if r["method"] == "random":  # a reference level, not a point on the pruning axis
            ax.axhline(r[metric], color="grey", linestyle="--", linewidth=1, label="random weights")
            continue
        retrained = r.get("epochs") is None or r["epochs"] > 0
        if r["method"] == "none":
            anchors.setdefault(retrained, r)
        groups.setdefault((r["method"], r.get("schedule") or "oneshot", retrained), []).append(r)
    pruned_kinds = {retrained for (method, _, retrained) in groups if method != "none"}
    offsets = np.linspace(-0.012, 0.012, max(len(groups), 1))  # side by side, so unit bands stay readable
    for k, ((method, schedule, retrained), members) in enumerate(sorted(groups.items())):
        if method == "none" and retrained in pruned_kinds:
            continue  # drawn as the first point of the pruned lines
        members = sorted(members, key=lambda r: r["rate"])
        if method != "none" and retrained in anchors:
            members = [anchors[retrained]] + members
        x = [r["rate"] for r in members]
        y = [r[metric] for r in members]
        colour = METHOD_COLOURS.get(method, "tab:purple") if retrained else "black"
        label = ("unpruned" if method == "none" else f"{method}, {schedule}") + ("" if retrained else ", not retrained")
        ax.plot(x, y, SCHEDULE_STYLES.get(schedule, "-") if retrained else ":", marker=METHOD_MARKERS.get(method, "o"),
                color=colour, label=label)
        if band and all(r.get(band[0]) is not None for r in members):
            lo, hi = np.array([r[band[0]] for r in members]), np.array([r[band[1]] for r in members])
            ax.errorbar(np.array(x) + offsets[k], y, yerr=[np.array(y) - lo, hi - np.array(y)], fmt="none",
                        ecolor=colour, elinewidth=1, capsize=2, alpha=0.5)
    ax.set_xlabel("pruning rate")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.02, 1.0)
    ax.legend(fontsize=MIN_FONT_PT)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def curves_figure(curves: list[dict], path):
    """Figs. 2/3: validation top-1 over retraining epochs, one line per checkpoint."""
    fig, ax = subplots(figsize=(6, 4))
    for curve in curves:
        ax.plot(curve["x"], curve["val_top1"], marker=".", label=curve["name"])
    ax.set_xlabel("retraining epoch (cumulative over pruning steps)")
    ax.set_ylabel("validation top-1")
    ax.legend(fontsize=MIN_FONT_PT)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def layers_figure(table: list[dict], path, title: str = ""):
    fig, ax = subplots(figsize=(max(6, len(table) * 0.25), 4))
    x = np.arange(len(table))
    ax.bar(x, [r["mis_confidence"] if r["mis_confidence"] is not None else np.nan for r in table], color="tab:red")
    ax.set_xticks(x, [r["layer"] for r in table], rotation=90, fontsize=MIN_FONT_PT)
    ax.set_ylabel("mean MIS confidence")
    ax.set_ylim(0, 1)
    ax.set_title(title or "Mean MIS confidence per layer")
    return _save(fig, path)


def compare_figure(samples: dict, path, xlabel: str = "MIS confidence"):
    """Overlaid histograms of each population's per-unit scores, their means dashed."""
    fig, ax = subplots(figsize=(6, 3.6))
    bins = np.linspace(0, 1, 26)
    for k, (label, values) in enumerate(samples.items()):
        values = np.asarray(values, float)
        colour = f"C{k}"
        ax.hist(values, bins=bins, alpha=0.45, color=colour, label=f"{label} (n={len(values)})", density=True)
        if len(values):
            ax.axvline(values.mean(), color=colour, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def depth_figure(comparisons: list[dict], layers: list[str], path):
    """Difference of mean MIS (features - neurons) against depth, one line per dictionary label, with the
    bootstrap intervals as error bars; 0 (no difference) dashed."""
    fig, ax = subplots(figsize=(max(5.0, 0.7 * len(layers) + 2), 3.6))
    for k, label in enumerate(dict.fromkeys(c["label"] for c in comparisons)):
        mine = [c for c in comparisons if c["label"] == label and c["diff_mis"] is not None]
        x = np.array([c["depth"] for c in mine], float) + 0.08 * k
        y = np.array([c["diff_mis"] for c in mine], float)
        err = np.array([[c["diff_mis"] - (c["diff_ci_low"] if c["diff_ci_low"] is not None else c["diff_mis"]),
                         (c["diff_ci_high"] if c["diff_ci_high"] is not None else c["diff_mis"]) - c["diff_mis"]]
                        for c in mine], float).T.reshape(2, -1)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=f"C{k}", label=label)
    ax.axhline(0, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MIS: features - neurons")
    ax.set_xlabel("layer (input to output)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def class_scatter_figure(rows: list[dict], corr: dict, path, title: str = ""):
    """Class-unit MIS confidence against class-wise accuracy, one point per class, with the least-squares line;
    the legend carries the report's own correlation (r, p, n) so that figure and tables agree."""
    acc = np.array([r["accuracy"] if r["accuracy"] is not None else np.nan for r in rows], float)
    conf = np.array([r["mis_confidence"] for r in rows], float)
    keep = np.isfinite(acc) & np.isfinite(conf)
    fig, ax = subplots(figsize=(5.5, 4.5))
    ax.plot(acc[keep], conf[keep], "o", color="tab:red", alpha=0.6, label=f"class units (n={int(keep.sum())})")
    if corr.get("pearson_r") is not None:
        fit = stats.linregress(acc[keep], conf[keep])
        x = np.linspace(acc[keep].min(), acc[keep].max(), 2)
        ax.plot(x, fit.intercept + fit.slope * x, "-", color="black",
                label=f"least squares: r={corr['pearson_r']:.3f}, p={'-' if corr['pearson_p'] is None else format(corr['pearson_p'], '.3g')}, n={corr['n']}")
    else:
        ax.plot([], [], " ", label=f"r undefined (n={corr.get('n', 0)}, or constant values)")
    ax.set_xlabel("class-wise accuracy")
    ax.set_ylabel("MIS confidence of the class unit")
    ax.set_title(title or "Class-unit MIS against class-wise accuracy", fontsize=9)
    ax.legend(fontsize=MIN_FONT_PT, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def layer_runs_figure(layer_rows: list[dict], path):
    """Mean MIS confidence per layer (x) for every run (one line each), from sweep_layers.csv's rows."""
    layers = list(dict.fromkeys(r["layer"] for r in layer_rows))
    runs = list(dict.fromkeys(r["name"] for r in layer_rows))
    fig, ax = subplots(figsize=(max(6, len(layers) * 0.35), 4.5))
    x = np.arange(len(layers))
    for name in runs:
        by_layer = {r["layer"]: r for r in layer_rows if r["name"] == name}
        y = [by_layer[l]["mis_confidence"] if l in by_layer and by_layer[l]["mis_confidence"] is not None
             else np.nan for l in layers]
        method = next(iter(by_layer.values()))["method"]
        ax.plot(x, y, marker="o", ms=3, color=METHOD_COLOURS.get(method, "tab:purple") if len(runs) > 1 else "tab:red",
                alpha=0.8, label=name)
    ax.set_xticks(x, layers, rotation=90, fontsize=MIN_FONT_PT)
    ax.set_ylabel("mean MIS confidence\n(non-constant units)")
    ax.margins(y=0.08)  # the axis spans the values, not 0-1: differences between runs stay visible
    ax.legend(fontsize=MIN_FONT_PT, ncol=2 if len(runs) > 6 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def unit_distribution_figure(runs: list[dict], path):
    """Box plots of the per-unit MIS confidence of every scored run (non-constant units, all layers)."""
    names, values = [], []
    for run in runs:
        v = [s["mis_confidence"] for s in run.get("unit_scores") or [] if s["status"] == "ok"]
        if v:
            names.append(run["name"]), values.append(v)
    fig, ax = subplots(figsize=(max(6, len(names) * 0.45), 4.5))
    ax.boxplot(values, showmeans=True)
    ax.set_xticks(np.arange(1, len(names) + 1), names, rotation=90, fontsize=MIN_FONT_PT)
    ax.set_ylabel("unit MIS confidence")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def paired_figure(paired_rows: list[dict], baseline: str, path):
    """Mean paired difference (run - baseline) of unit MIS confidence per run, with its bootstrap interval."""
    rows = [r for r in paired_rows if r.get("diff_mis_confidence") is not None]
    labels = [f"{r['name']} ({r['layer']})" for r in rows]
    y = np.arange(len(rows))
    fig, ax = subplots(figsize=(6, max(2.5, len(rows) * 0.25 + 1)))
    for k, r in enumerate(rows):
        colour = METHOD_COLOURS.get(r["method"], "tab:purple")
        ax.errorbar(r["diff_mis_confidence"], k, xerr=[[r["diff_mis_confidence"] - r["diff_conf_ci_low"]],
                                                       [r["diff_conf_ci_high"] - r["diff_mis_confidence"]]],
                    fmt="o", color=colour, capsize=3)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(y, labels, fontsize=MIN_FONT_PT)
    ax.set_xlabel(f"paired difference of MIS confidence\nvs {baseline} (95% interval)")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def classwise_runs_figure(by_run: dict, path, layer: str = "softmax"):
    """Class-unit MIS confidence against class-wise accuracy for every run as small multiples (shared axes),
    each panel with its least-squares line, the report's own r, p, n and the class units' mean top-pool purity
    (by_run: name -> (classwise.csv rows, correlation))."""
    n = len(by_run)
    cols = min(4, n)
    rows_n = -(-n // cols)
    fig, axes = subplots(rows_n, cols, figsize=(2.9 * cols + 0.4, 2.6 * rows_n + 0.5), squeeze=False,
                         sharex=True, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (name, (rows, corr)) in zip(axes.flat, by_run.items()):
        acc = np.array([np.nan if r["accuracy"] in (None, "") else float(r["accuracy"]) for r in rows])
        conf = np.array([np.nan if r["mis_confidence"] in (None, "") else float(r["mis_confidence"]) for r in rows])
        keep = np.isfinite(acc) & np.isfinite(conf)
        ax.plot(acc[keep], conf[keep], "o", ms=4, color="tab:red", alpha=0.6)
        if corr.get("pearson_r") is not None:
            fit = stats.linregress(acc[keep], conf[keep])
            x = np.linspace(acc[keep].min(), acc[keep].max(), 2)
            ax.plot(x, fit.intercept + fit.slope * x, "-", color="black", lw=1)
            p = "-" if corr["pearson_p"] is None else f"{corr['pearson_p']:.2g}"  # no p with 3 points (Fisher's z)
            label = f"r={corr['pearson_r']:.3f}, p={p}, n={corr['n']}"
        else:
            label = f"r undefined, n={corr.get('n', 0)}"
        purity = [float(r["purity"]) for r in rows if r.get("purity") not in (None, "")]
        pools = f"\nmean purity of top pools {np.mean(purity):.2f}" if purity else ""  # classwise.csv's
        ax.set_title(f"{name}\n{label}{pools}", fontsize=MIN_FONT_PT + 1)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("class-wise accuracy")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{layer} unit\nMIS confidence")
    return _save(fig, path)

"""Each report kind as one function that writes its folder and returns its main file (`misbench report KIND`,
misbench.api.report and the study's report step all call these), and the HTML sections of the pages."""

__all__ = ["REPORTS", "REPORT_FILES", "register_report", "checkpoint_labels", "classwise", "sweep", "layers", "curves", "compare", "dictionaries", "sweep_sections", "classwise_sections",
           "compare_sections", "dictionary_sections", "unit_sections", "units_section", "run_unit_pages",
           "classwise_runs_section", "settings_header"]

import contextlib
import html
import logging
import os
import shutil
from pathlib import Path

from ..errors import MisbenchError
from ..registry import register
from ..runtime.fileio import option_label, temp_dir_beside, write_json
from ..scoring.results import read_meta
from ..version import __version__
from .classwise import classwise_report
from .compare import compare_report
from .figures import classwise_runs_figure, layers_figure
from .findings import classwise_finding, compare_finding, findings
from .gallery import choose_units, unit_galleries
from .html import Figure, Section, table_html, write_html
from .sweep import runs_table, sweep_report, training_curves, write_curves
from .units import unit_pages
from .dictionaries import dictionary_report
from .stats import format_correlation
from .tables import LAYER_COLUMNS, layer_summary, read_csv_rows, read_scores, score_settings, write_csv

log = logging.getLogger(__name__)

REPORTS: dict = {}  # kind -> the function that writes it (`misbench report KIND`, misbench.report)
REPORT_FILES: dict[str, tuple] = {}  # kind -> the files whose presence in DIR means a report is there


def register_report(kind: str, files: tuple):
    """Decorator: `build(out=..., **inputs) -> main file` is the report `kind`; `files` are what it writes into
    its folder that `overwrite` must allow replacing. The CLI's `report KIND` subcommand gives it its flags."""
    def decorate(build):
        register(REPORTS, kind, build, "report")
        REPORT_FILES[kind] = tuple(files)
        return build
    return decorate

SUMMARY_COLUMNS = ("name", "method", "schedule", "rate", "top1", "n_units", "n_constant", "mis", "mis_confidence",
                   "conf_ci_low", "conf_ci_high", "class_mis_confidence")
PAIRED_SHOWN = ("name", "layer", "n_pairs", "diff_mis_confidence", "diff_conf_ci_low", "diff_conf_ci_high",
                "p_confidence", "diff_mis", "diff_mis_ci_low", "diff_mis_ci_high", "p_mis")
CORRELATIONS = (("correlation_rate_mis_confidence", "pruning rate vs MIS confidence (feature layers)"),
                ("correlation_rate_mis", "pruning rate vs MIS (feature layers)"),
                ("correlation_rate_class_mis_confidence", "pruning rate vs class-unit MIS confidence"),
                ("correlation_rate_top1", "pruning rate vs top-1"),
                ("correlation_accuracy_mis_confidence", "class-wise accuracy vs MIS confidence"),
                ("correlation_accuracy_mis", "class-wise accuracy vs MIS"))


def _correlation_facts(summary: dict) -> list:
    return [(label, format_correlation(summary[key])) for key, label in CORRELATIONS if key in summary]


def settings_header(scores_csv, n_runs: int | None = None) -> list:
    """(label, value) rows of the settings a score was made with (its mis.json), for the page header."""
    rows = [("misbench version (this report)", __version__)]
    meta = read_meta(scores_csv) if scores_csv else None
    if meta is None:
        return rows + [("score settings", "unknown: no mis.json beside the scores")]
    sidecar = Path(scores_csv).with_suffix(".json")
    s = meta.get("settings", {})
    selection = s.get("selection", "")
    if selection == "quantile":
        selection = f"quantile {s.get('quantile')}"
    source = meta.get("alpha_source") or s.get("alpha_source") or "unrecorded"
    rows += [("settings from", str(sidecar)),
             ("model", meta.get("model") or "-"), ("checkpoint sha256", meta.get("checkpoint_sha256") or "-"),
             ("data", meta.get("data") or "-"), ("images (N)", meta.get("n_rows", "-")),
             ("unit selection", selection or "-"), ("tasks per unit", s.get("tasks", "-")),
             ("explanations per task", s.get("explanations", "-")),
             ("similarity backend", s.get("similarity", "-")), ("backend fingerprint", s.get("backend_fingerprint", "-")),
             ("image size, view", f"{s.get('image_size', '-')}, {s.get('view', '-')}"),
             ("alpha", meta.get("alpha", s.get("alpha", "-"))), ("alpha source", source),
             ("scored with misbench", meta.get("misbench_version", "-"))]
    if n_runs is not None:
        rows.append(("runs", n_runs))
    return rows


def sweep_sections(summary: dict, out_dir, run_links: dict | None = None) -> list[Section]:
    """The summary table with the paired differences beside it, MIS and accuracy against rate, the per-layer
    figure, the unit distributions, the paired table. `run_links`: run name -> its unit pages."""
    out_dir = Path(out_dir)
    figures = set(summary["figures"])
    links = {"name": run_links} if run_links else {}

    def fig(name, caption, css=""):
        return [Figure(name, caption, css)] if name in figures else []

    sections = [Section("Summary of the runs", css_id="summary", tables=["sweep.csv"], columns=SUMMARY_COLUMNS,
                        text="mis and mis_confidence: layer-balanced means over feature layers (each layer's mean over "
                             "its non-constant units); class_mis_confidence: the same over the class units; "
                             "conf_ci: bootstrap interval of the layer-balanced mean.", links=links,
                        facts=_correlation_facts(summary),
                        figures=fig("paired.png", f"paired difference from {summary.get('paired_baseline')} "
                                                  "with its 95% interval (paired.csv)"))]
    sections.append(Section("MIS and accuracy against pruning rate", css_id="sweep", figures=[
        *fig("sweep_mis_confidence.png", "MIS confidence against pruning rate (bars: 5-95% of units)"),
        *fig("sweep_mis.png", "MIS against pruning rate"),
        *fig("sweep_class_mis_confidence.png", "class-unit MIS confidence against pruning rate"),
        *fig("sweep_accuracy.png", "validation top-1 against pruning rate"),
        *fig("curves.png", "validation top-1 over retraining epochs")]))
    if "layers.png" in figures:
        sections.append(Section("MIS per layer across runs", css_id="layers", figures=fig(
            "layers.png", "mean MIS confidence per layer, one line per run; the axis spans the values "
                          "(values in sweep_layers.csv)")))
        sections.append(Section("Distribution of unit MIS per run", css_id="distribution", figures=fig(
            "unit_distribution.png", "unit MIS confidence of the non-constant units of each run (box: quartiles, "
                                     "triangle: mean)")))
    if summary.get("paired_baseline"):
        sections.append(Section(f"Paired differences against {summary['paired_baseline']}", css_id="paired",
                                text="Per-unit differences (run - baseline) over units counted in both runs; "
                                     "the layer-balanced mean difference, its bootstrap interval (units resampled "
                                     "within layers) and the sign-flip permutation p of the same mean "
                                     "(p_confidence, p_mis). paired.csv also holds the Wilcoxon signed-rank p of "
                                     "the pooled differences (wilcoxon_p_*), a test of another estimand.",
                                tables=["paired.csv"] if (out_dir / "paired.csv").exists() else [],
                                columns=PAIRED_SHOWN, links=links))
    return sections


def classwise_runs_section(by_run: dict, out_dir, layer: str) -> list[Section]:
    """All runs' class-unit MIS against class-wise accuracy in one figure (small multiples); each run's
    table and figures folded below it."""
    if not by_run:
        return []
    out_dir = Path(out_dir)
    panels = {name: (read_csv_rows(out_dir / "classwise" / name / "classwise.csv"),
                     s["correlation_accuracy_mis_confidence"]) for name, s in by_run.items()}
    classwise_runs_figure(panels, out_dir / "classwise_runs.png", layer)
    facts = [(name, format_correlation(s["correlation_accuracy_mis_confidence"]) + _purity_text(panels[name][0]))
             for name, s in by_run.items()]
    sections = [Section("Class units against class-wise accuracy", css_id="classwise",
                        text=f"One panel per run: each point a class ({layer} unit); line: least squares; title: "
                             "Pearson r, p, n (the numbers of each run's classwise/<run>/summary.json) and the mean "
                             "purity of the class units' top pools (the share of a pool's images of the unit's own "
                             "class; classwise.csv's purity and pool).",
                        facts=facts, figures=[Figure("classwise_runs.png", "class-unit MIS confidence against "
                                                                           "class-wise accuracy, every run", "scatter")])]
    for name, s in by_run.items():
        for sec in classwise_sections(s, f"classwise/{name}", name):
            sec.folded = True
            sections.append(sec)
    return sections


def _purity_text(rows: list[dict]) -> str:
    """'; mean purity P of top pools of N images (classes of A-B images)' from classwise.csv rows ('' without)."""
    known = [r for r in rows if r.get("purity") not in (None, "")]
    if not known:
        return ""
    pools = sorted({int(float(r["pool"])) for r in known})
    sizes = [int(float(r["class_images"])) for r in known]
    pool = f"{pools[0]}" if len(pools) == 1 else f"{pools[0]}-{pools[-1]}"
    size = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
    return (f"; mean purity {sum(float(r['purity']) for r in known) / len(known):.3g} of top pools of {pool} images "
            f"(classes of {size} images)")


CLASSWISE_SHOWN = ("class", "name", "n", "accuracy", "mis", "mis_confidence", "purity", "pool", "class_images")


def classwise_sections(summary: dict, rel_dir: str = ".", name: str = "") -> list[Section]:
    rel = Path(rel_dir)
    of = f" ({name})" if name else ""
    return [Section(f"Class units against class-wise accuracy{of}", css_id=f"classwise-{name}" if name else "classwise",
                    text=f"Layer {summary['layer']} ({summary['class_units']}), {summary['n_classes']} classes, "
                         f"top-1 {'-' if summary['top1'] is None else format(summary['top1'], '.4g')}"
                         + ("" if summary.get("mean_purity") is None else
                            f", mean purity of the class units' top pools {summary['mean_purity']:.3g} (purity: the "
                            "share of a unit's top pool that is its own class; pool: the pool's images)") + ".",
                    facts=_correlation_facts(summary), tables=[(rel / "classwise.csv").as_posix()],
                    columns=CLASSWISE_SHOWN,
                    figures=[Figure((rel / "classwise_scatter.png").as_posix(),
                                    "one point per class; line: least squares; legend: r, p, n", "scatter"),
                             Figure((rel / "classwise.png").as_posix(), "per unit, with moving averages")])]


def _values_text(values) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def unit_sections(galleries: list[dict], run: str = "") -> list[Section]:
    """Best, median and worst (and requested) units: their explanation and query images and activations."""
    sections = []
    for g in galleries:
        title = f"Unit {g['caption']}" + (f" of {run}" if run else "")
        if "skipped" in g:
            sections.append(Section(title, text=f"not pictured: {g['skipped']}"))
            continue
        facts = []
        for k, delta in enumerate(g["deltas"]):
            facts += [(f"task {k}: decision δ", f"{delta:+.3g} ({'correct' if delta > 0 else 'wrong'})"),
                      (f"task {k}: E+ activations", _values_text(g["pos_expl"][k])),
                      (f"task {k}: queries q+, q-", _values_text(g["queries"][k])),
                      (f"task {k}: E- activations", _values_text(g["neg_expl"][k]))]
        who = f"{run or 'scores'} {g['layer']}:{g['unit']}"  # the alt text names run and unit
        sections.append(Section(title, facts=facts, figures=[Figure(g["path"], f"{who}: explanations E+/E-, queries "
                                                                    "q+/q-; activation under each image")]))
    return sections


def compare_sections(summary: dict, rel_dir: str = ".") -> list[Section]:
    """The populations' layer-balanced means and the rank-sum tests as text, compare.csv, the distributions
    (written under `rel_dir` of the report folder)."""
    rel = Path(rel_dir)
    facts = []
    for pop in summary["populations"]:
        m = pop["feature_mean"]
        value = ("undefined (no non-constant feature units)" if m["mis_confidence"] is None else
                 f"{m['mis_confidence']:.3f} [{m['mis_confidence_ci'][0]:.3f}, {m['mis_confidence_ci'][1]:.3f}], "
                 f"{m['n_units']} units")
        facts.append((f"{pop['label']}: layer-balanced MIS confidence", value))
        facts.append((f"{pop['label']}: scores (layers)", f"{pop['scores']} ({', '.join(pop['layers'])})"))
    for c in summary["comparisons"]:
        for key, what in (("rank_sum_mis_confidence", "MIS confidence"), ("rank_sum_mis", "MIS")):
            r = c[key]
            facts.append((f"{c['a']} vs {c['b']}: rank-sum test of unit {what}",
                          f"undefined (n={r['n_a']}, {r['n_b']})" if r["p"] is None else
                          f"U={r['u']:.4g}, p={r['p']:.3g}, P({c['a']} > {c['b']})={r['prob_a_greater']:.3f}, "
                          f"n={r['n_a']}, {r['n_b']}"))
    return [Section("Unit populations compared", css_id="compare",
                    text="Per-layer means over non-constant units with bootstrap intervals; layer-balanced means; "
                         "Mann-Whitney rank-sum test of the per-unit scores (the first population against each other).",
                    facts=facts, tables=[(rel / "compare.csv").as_posix()],
                    figures=[Figure((rel / "compare.png").as_posix(),
                                    "per-unit MIS confidence of each population (dashed: means)")])]


DICTIONARY_TABLE = ("layer", "label", "population", "n_units", "n_scored", "mis", "ms", "fvu", "l0", "dead_share",
                    "density", "share_sparse", "diff_mis", "diff_ci_low", "diff_ci_high", "rank_sum_p")


def dictionary_sections(summary: dict, rel_dir: str = ".") -> list[Section]:
    """`report dictionaries`' table (per layer: the neurons, then each dictionary) and the difference against
    depth, as written under `rel_dir` of the report folder."""
    rel = Path(rel_dir)
    return [Section("Dictionary features against neurons", css_id="dictionaries",
                    text="Per layer (input to output), the layer's neurons and each dictionary's features on the same "
                         "images: mean MIS and MS over scored units (status ok; constant and sparse units left out "
                         "and counted), the dictionary's FVU, L0 and dead share on its training vectors, mean "
                         "density and the share of sparse units; diff_mis = features - neurons with a bootstrap "
                         "95 % interval (units resampled within each population) and the two-sided rank-sum p. "
                         "Controls: 'untrained' is the same kind and width with its initial weights, 'permuted' the "
                         "trained features with each unit's activations permuted across images (chance: MIS 0.5).",
                    tables=[(rel / "dictionaries.csv").as_posix()], columns=DICTIONARY_TABLE,
                    figures=[Figure((rel / "dictionaries.png").as_posix(),
                                    "MIS of each dictionary's features minus the layer's neurons against depth, "
                                    "with bootstrap 95 % intervals (dashed: no difference)")])]


@contextlib.contextmanager
def _built_beside(out):
    """Build a report in a fresh folder beside `out` and swap it in whole when the build succeeds: a failed
    build leaves the old report as it was, never a mix of old and new files. A folder that holds no report
    (no report.html), or that holds the working directory (`--out .`: moved away, it would take the process's
    working directory with it), keeps its other files: the new ones are moved into it."""
    out = Path(out).resolve()  # `.` or `..` names no folder to build beside
    with temp_dir_beside(out, ".build") as tmp:
        yield tmp
        here = Path.cwd().resolve()
        if out.is_dir() and (any(out.iterdir()) and not (out / "report.html").exists()
                             or here == out or out in here.parents):
            for entry in tmp.iterdir():
                target = out / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
            return
        with temp_dir_beside(out, ".old") as trash:  # the old report goes there, removed with it
            if out.exists():
                os.replace(out, trash / "old")
            os.replace(tmp, out)


def _rehome(path: Path, tmp: Path, out) -> Path:
    return Path(out).resolve() / Path(path).resolve().relative_to(Path(tmp).resolve())


def _runs_layers_table(every_run: dict, layer_rows) -> str:
    """Every run's layers: one row per run (linking to its layers), one column per layer whose cell, the layer's
    mean MIS confidence (sweep_layers.csv), links to that run's index of the layer's units."""
    conf = {(r["name"], r["layer"]): r.get("mis_confidence", "") for r in layer_rows}
    layers = list(dict.fromkeys(layer for pages in every_run.values() for layer in pages["layers"]))
    rows = [{"run": name, **{layer: (conf.get((name, layer)) or "-") for layer in pages["layers"]}}
            for name, pages in every_run.items()]
    links = {"run": {name: pages["index"] for name, pages in every_run.items()},
             **{layer: (lambda row, layer=layer: every_run[row["run"]]["layers"].get(layer)) for layer in layers}}
    return table_html(rows, ["run", *layers], "Mean MIS confidence per layer of every run: a cell links to the "
                                              "layer's units, a run to its layers (click a column to sort)", links)


def units_section(pages: dict, run: str, chosen: list, scores: list[dict], every_run: dict | None = None,
                  layer_rows=()) -> Section:
    """Links to the unit pages: with `every_run` (run name -> its unit pages, as unit_pages returns them) a table
    of every run's layers (see _runs_layers_table; `layer_rows`: sweep_layers.csv), else the layers of `run`;
    then a table of `run`'s chosen units (highest, median, lowest confidence and the requested ones) whose unit
    cells link to the units' pages."""
    by_key = {(r["layer"], r["unit"]): r for r in scores}
    rows = []
    for layer, unit, why in chosen:
        r = by_key.get((layer, unit), {})
        rows.append({"layer": layer, "unit": f"{layer}:{unit}", "why": why, "status": r.get("status", "-"),
                     "mis": r.get("mis", ""), "mis_confidence": r.get("mis_confidence", ""),
                     "conf_ci_low": r.get("conf_ci_low", ""), "conf_ci_high": r.get("conf_ci_high", "")})
    constant = [f"{layer}:{unit}" for layer, unit, _ in chosen if by_key.get((layer, unit), {}).get("status") == "constant"]
    note = (f" {', '.join(constant)}: constant unit{'s' if len(constant) > 1 else ''}, no tasks to show (the page "
            "shows its images)." if constant else "")
    links = {"unit": {f"{layer}:{unit}": href for (layer, unit), href in pages["units"].items()},
             "layer": dict(pages["layers"])}
    if every_run:
        listing = _runs_layers_table(every_run, layer_rows)
    else:
        layer_list = "".join(f"<li><a href='{html.escape(href)}'>{html.escape(layer)}</a></li>"
                             for layer, href in pages["layers"].items())
        listing = (f"<p><a href='{html.escape(pages['index'])}'>All layers of {html.escape(run)}</a>: "
                   f"<ul class='inline'>{layer_list}</ul></p>")
    cols = ["layer", "unit", "why", "status", "mis", "mis_confidence", "conf_ci_low", "conf_ci_high"]
    every = every_run and len(every_run) > 1
    return Section("Units of every run" if every else f"Units of {run}", css_id="units",
                   text="Every scored unit has a page (top and bottom images with activations, tasks, MIS, confidence, "
                        "intervals, status); each layer an index of its units sorted by MIS confidence." + note,
                   html=listing + (table_html([{k: ("" if v is None else str(v)) for k, v in r.items()} for r in rows],
                                              cols, f"Chosen units of {run} (click a column to sort)", links)
                                   if rows else ""))


def _check_chosen(scores: list[dict], chosen: list, run: str) -> None:
    """One error naming a chosen unit that was not scored."""
    known = {(r["layer"], r["unit"]) for r in scores}
    for layer, unit, _ in chosen:
        if (layer, unit) not in known:
            have = list(dict.fromkeys(r["layer"] for r in scores))
            scored = [str(r["unit"]) for r in scores if r["layer"] == layer]
            detail = (f"scored units of {layer}: {', '.join(scored[:5])}{', ...' if len(scored) > 5 else ''}" if scored
                      else f"scored layers: {', '.join(have)}")
            raise MisbenchError(f"unit {layer}:{unit} was not scored in {run or 'these scores'} ({detail}): "
                                "give a scored unit as LAYER:INDEX")


def _beside(scores_csv) -> tuple[Path, Path] | None:
    """(tasks.h5, acts.h5) beside a mis.csv (as a study writes them), else None."""
    d = Path(scores_csv).parent
    return (d / "tasks.h5", d / "acts.h5") if (d / "tasks.h5").exists() and (d / "acts.h5").exists() else None


def run_unit_pages(out_dir, rows: list[dict], base_dir) -> dict:
    """Unit pages of every run whose mis.csv has tasks.h5 and acts.h5 beside it: run name -> its pages (rows that
    name the same mis.csv are one run: they share its pages). Thumbnails are shared by all runs (units/img/)."""
    made, by_file = {}, {}
    for row in rows:
        if not row.get("scores"):
            continue
        scores = (Path(base_dir) / row["scores"]).resolve()
        found = _beside(scores)
        if found is None:
            continue
        if scores not in by_file:
            by_file[scores] = unit_pages(out_dir, row["name"], read_scores(scores), found[1], found[0])
        made[row["name"]] = by_file[scores]
    return made


def _unit_pages_sections(out_dir, scores, tasks, acts, run, units):
    chosen = choose_units(scores, units)
    _check_chosen(scores, chosen, run)
    pages = unit_pages(out_dir, run or "scores", scores, acts, tasks)
    return [units_section(pages, run or "scores", chosen, scores)], pages


@register_report("classwise", files=("classwise.csv", "summary.json", "report.html"))
def classwise(scores, out, acts=None, eval_json=None, layer: str | None = None, tasks=None, units=(),
              seed: int = 0) -> Path:
    """Softmax-unit MIS against class-wise accuracy: classwise.csv, summary.json, figures, unit pages when
    tasks and acts are given, report.html."""
    if units and not (tasks and acts):
        raise MisbenchError(f"{option_label('units')} {', '.join(units)}: unit pictures are drawn from the tasks "
                            f"and images of a score run: give {option_label('tasks')} (its tasks.h5) and "
                            f"{option_label('acts')} too, or leave out {option_label('units')}")
    with _built_beside(out) as tmp:
        summary = classwise_report(scores, tmp, acts=acts, eval_json=eval_json, layer=layer, seed=seed)
        sections = classwise_sections(summary)
        if tasks and acts:
            sections += _unit_pages_sections(tmp, read_scores(scores), tasks, acts, "", units)[0]
            sections += unit_sections(unit_galleries(tmp, read_scores(scores), tasks, acts, units))
        found = [classwise_finding({f"layer {summary['layer']}": summary}, None)]
        write_html(tmp, "misbench class-wise report", sections, settings_header(scores),
                   [summary.get("alpha_warning"), summary.get("pool_warning")], [f for f in found if f])
    return Path(out).resolve() / "report.html"


@register_report("sweep", files=("sweep.csv", "summary.json", "report.html"))
def sweep(runs, out, seed: int = 0, baseline: str | None = None, classwise_layer: str = "softmax", units=(),
          title: str = "misbench sweep report", compare_scores: list | None = None, n_boot: int = 1000,
          dictionary_scores=None, dictionary_pairs=()) -> Path:
    """MIS and accuracy against pruning rate: sweep.csv, sweep_layers.csv, paired.csv (against the unpruned
    `baseline` run: default control, else base), summary.json, figures, the class-wise report of every run
    with an eval.json and class units (under classwise/<run>/), unit pages of every run with tasks.h5 and
    acts.h5 beside its mis.csv (units/<run>/, thumbnails shared), report.html.
    `runs`: runs.csv, a study folder, or the runs in memory (a pandas DataFrame or a list of dicts with
    runs.csv's columns; relative paths are taken from the working directory).
    `compare_scores`: population specs as `report compare --scores` takes them, compared under compare/ (the
    study's dictionary: a layer's neurons against its features). `dictionary_scores` and `dictionary_pairs`:
    `report dictionaries`' inputs, written under dictionaries/ with its section (a study's dictionary grid)."""
    rows, base_dir, runs_label = runs_table(runs)
    with _built_beside(out) as tmp:
        summary = sweep_report(runs, tmp, seed, baseline=baseline)
        by_run = {}
        for row in rows:
            if not (row.get("scores") and row.get("eval")):
                continue
            scores, eval_json = base_dir / row["scores"], base_dir / row["eval"]
            if not eval_json.exists() or classwise_layer not in {r["layer"] for r in read_scores(scores)}:
                continue
            name = row["name"]
            by_run[name] = classwise_report(scores, tmp / "classwise" / name, eval_json=eval_json,
                                            layer=classwise_layer, seed=seed)
        write_json(tmp / "classwise_summary.json", by_run)
        header_scores = summary.get("header_scores")
        run, chosen, scores = "", [], []
        if header_scores:
            run = next((r["name"] for r in rows if r.get("scores") and
                        (base_dir / r["scores"]).resolve() == Path(header_scores).resolve()), "")
            scores = read_scores(header_scores)
            chosen = choose_units(scores, units)
            _check_chosen(scores, chosen, run)  # before any page is written
            if units and _beside(header_scores) is None:
                log.warning("units %s not pictured: %s needs tasks.h5 and acts.h5 beside it", ", ".join(units),
                            header_scores)
        every_run = run_unit_pages(tmp, rows, base_dir)
        unit_secs = []
        if every_run:
            layer_rows = read_csv_rows(tmp / "sweep_layers.csv") if (tmp / "sweep_layers.csv").exists() else []
            pages = every_run.get(run) or {"index": "", "layers": {}, "units": {}}
            unit_secs = [units_section(pages, run, chosen if run in every_run else [], scores, every_run, layer_rows)]
        sections = sweep_sections(summary, tmp, {name: p["index"] for name, p in every_run.items()} or None)
        sections += classwise_runs_section(by_run, tmp, classwise_layer) + unit_secs
        warnings = [summary.get("alpha_warning"), summary.get("sparse_warning")]
        pooled = [name for name, s in by_run.items() if s.get("pool_warning")]
        if pooled:  # one line: which runs, then the first one's numbers (folded)
            warnings.append(f"class units' top pools larger than their classes in {len(pooled)} of {len(by_run)} runs "
                            f"({', '.join(pooled)}): in {pooled[0]}, {by_run[pooled[0]]['pool_warning']}")
        compared = None
        if compare_scores:
            compared = compare_report(list(compare_scores), tmp / "compare", seed=seed, n_boot=n_boot)
            sections += compare_sections(compared, "compare")
            warnings += [compared.get("alpha_warning"), compared.get("sparse_warning")]
        if dictionary_pairs:
            found = dictionary_report(dictionary_scores, list(dictionary_pairs), tmp / "dictionaries", seed=seed,
                                      n_boot=n_boot)
            sections += dictionary_sections(found, "dictionaries")
        paired_rows = read_csv_rows(tmp / "paired.csv") if (tmp / "paired.csv").exists() else []
        write_html(tmp, title, sections, settings_header(header_scores, summary["n_runs"]), warnings,
                   findings(summary, paired_rows, by_run, compared))
    return Path(out).resolve() / "report.html"


@register_report("compare", files=("compare.csv", "compare.json", "report.html"))
def compare(scores, out, seed: int = 0, n_boot: int = 1000) -> Path:
    """Two (or more) unit populations side by side (`[LABEL=]mis.csv[:LAYER+LAYER]` each; the first against
    each other): compare.csv, compare.json, compare.png, report.html."""
    with _built_beside(out) as tmp:
        summary = compare_report(list(scores), tmp, seed=seed, n_boot=n_boot)
        found = compare_finding(summary)
        write_html(tmp, "misbench comparison report", compare_sections(summary),
                   settings_header(summary["populations"][0]["scores"]), [summary.get("alpha_warning"), summary.get("sparse_warning")],
                   [found] if found else [])
    return Path(out).resolve() / "report.html"


@register_report("dictionaries", files=("dictionaries.csv", "dictionaries.json", "dictionaries.png", "report.html"))
def dictionaries(scores, pairs, out, seed: int = 0, n_boot: int = 1000) -> Path:
    """Neurons against dictionary features per layer (`[LABEL:]LAYER=FEATURES` pairs in depth order, all in one
    mis.csv): dictionaries.csv (MIS, MS, FVU, L0, dead share, density, share sparse; the difference's bootstrap
    interval and rank-sum p), dictionaries.json, dictionaries.png (the difference against depth), report.html."""
    with _built_beside(out) as tmp:
        found = dictionary_report(scores, list(pairs), tmp, seed=seed, n_boot=n_boot)
        write_html(tmp, "misbench dictionary features against neurons", dictionary_sections(found),
                   settings_header(scores))
    return Path(out).resolve() / "report.html"


@register_report("layers", files=("layers.csv", "layers.png"))
def layers(scores, out) -> Path:
    """Mean MIS per layer (as the MIS authors publish them): layers.csv and layers.png."""
    table = layer_summary(read_scores(scores), **score_settings(scores))
    Path(out).mkdir(parents=True, exist_ok=True)
    write_csv(Path(out) / "layers.csv", table, LAYER_COLUMNS)
    layers_figure(table, Path(out) / "layers.png")
    return Path(out) / "layers.csv"


def checkpoint_labels(paths) -> list[str]:
    """One distinct name per checkpoint: its file stem, or, where stems collide (a study names every
    checkpoint model.pt), its folder (runs/a/model.pt -> a), with more folders until the names differ."""
    paths = [Path(p) for p in paths]
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise MisbenchError(f"checkpoint {paths[i]} is given twice: give each checkpoint once")

    def label(i, depth):
        folders = resolved[i].parent.parts[1:]
        if depth == 0:
            return paths[i].stem
        return "/".join(folders[-depth:]) if depth <= len(folders) else str(resolved[i])  # the last: unique

    depth = [0] * len(paths)
    while True:
        labels = [label(i, d) for i, d in enumerate(depth)]
        clash = [i for i, name in enumerate(labels) if labels.count(name) > 1]
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


@register_report("curves", files=("curves.csv", "curves.png"))
def curves(checkpoints, out) -> Path:
    """Validation accuracy per retraining epoch from checkpoint histories: curves.csv and curves.png."""
    found = training_curves([{"name": name, "checkpoint": c}
                             for name, c in zip(checkpoint_labels(checkpoints), checkpoints)])
    Path(out).mkdir(parents=True, exist_ok=True)
    write_curves(found, out)
    return Path(out) / "curves.csv"

"""misbench report classwise|sweep|compare|layers|curves, misbench import-scores."""

import json
from pathlib import Path

import click

from misbench import api
from misbench.runtime.fileio import read_csv_rows

from .common import handle_errors, list_option, refuses_overwrite


def _fmt_corr(name, c):
    # the reports' statistics load scipy: imported when a report is printed, not by `misbench --help`
    from misbench.reports.stats import format_correlation

    return f"{name}: {format_correlation(c)}"


@click.group()
def report():
    """Tables, statistics, figures and report.html."""


def _summary(out, name: str = "summary.json") -> dict:
    return json.loads((Path(out) / name).read_text())


@report.command()
@click.option("--scores", required=True, type=click.Path(exists=True, dir_okay=False), help="mis.csv")
@click.option("--acts", type=click.Path(exists=True, dir_okay=False), default=None, help="Activation file (its logits).")
@click.option("--eval", "eval_json", type=click.Path(exists=True, dir_okay=False), default=None, help="eval.json")
@click.option("--layer", default=None, help="Layer of class units in mis.csv (default softmax).")
@click.option("--tasks", type=click.Path(exists=True, dir_okay=False), default=None, help="tasks.h5, for unit pictures.")
@list_option("--unit", "--units", "units", help="LAYER:INDEX to picture (repeatable or comma-separated).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The report's folder.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap intervals and of unit picks.")
@handle_errors
@refuses_overwrite(passes=True)
def classwise(scores, acts, eval_json, layer, tasks, units, out, seed, overwrite):
    """Softmax-unit MIS against class-wise accuracy: classwise.csv, summary.json, figure, report.html."""
    path = api.report("classwise", out, scores=scores, acts=acts, eval_json=eval_json, layer=layer, tasks=tasks,
                      units=units, seed=seed, overwrite=overwrite)
    summary = _summary(out)
    click.echo(_fmt_corr("accuracy vs MIS confidence", summary["correlation_accuracy_mis_confidence"]))
    click.echo(_fmt_corr("accuracy vs MIS", summary["correlation_accuracy_mis"]))
    if summary["alpha_warning"]:
        click.echo(f"warning: {summary['alpha_warning']}")
    click.echo(f"wrote {path}")


@report.command()
@click.option("--scores", required=True, type=click.Path(dir_okay=False),
              help="One mis.csv holding the layers' neurons and their dictionaries' feature layers.")
@list_option("--pair", "pairs", required=True, metavar="[LABEL:]LAYER=FEATURES",
             help="A layer and one of its dictionaries' feature layers (repeatable; in depth order).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The report's folder.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap intervals and of unit picks.")
@click.option("--n-boot", default=1000, show_default=True, help="Bootstrap resamples of the intervals.")
@handle_errors
@refuses_overwrite(passes=True)
def dictionaries(scores, pairs, out, seed, n_boot, overwrite):
    """Neurons against dictionary features, layer by layer: dictionaries.csv, dictionaries.json, and the
    difference against depth (dictionaries.png)."""
    path = api.report("dictionaries", out, scores=scores, pairs=pairs, seed=seed, n_boot=n_boot, overwrite=overwrite)
    for c in _summary(out, "dictionaries.json")["comparisons"]:
        if c["diff_mis"] is not None:
            ci = "" if c["diff_ci_low"] is None else f" [{c['diff_ci_low']:+.3f}, {c['diff_ci_high']:+.3f}]"
            p = "" if c["rank_sum_p"] is None else f", rank-sum p {c['rank_sum_p']:.3g}"
            click.echo(f"{c['layer']} {c['label']} ({c['population']}): MIS features - neurons {c['diff_mis']:+.3f}{ci}{p}")
    click.echo(f"wrote {path}")


@report.command()
@list_option("--scores", "scores", required=True, metavar="[LABEL=]MIS.CSV[:LAYER+LAYER]",
             help="A unit population (repeatable or comma-separated; the first is compared with each other); "
             "optionally only some layers.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The report's folder.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap intervals and of unit picks.")
@click.option("--n-boot", default=1000, show_default=True, help="Bootstrap resamples of the intervals.")
@handle_errors
@refuses_overwrite(passes=True)
def compare(scores, out, seed, n_boot, overwrite):
    """Two unit populations side by side: per-layer means with intervals, layer-balanced means, a rank-sum
    test, distributions: compare.csv, compare.json, compare.png, report.html."""
    path = api.report("compare", out, scores=scores, seed=seed, n_boot=n_boot, overwrite=overwrite)
    summary = _summary(out, "compare.json")
    for pop in summary["populations"]:
        m = pop["feature_mean"]
        if m["mis_confidence"] is not None:
            click.echo(f"{pop['label']}: layer-balanced MIS confidence {m['mis_confidence']:.3f} "
                       f"[{m['mis_confidence_ci'][0]:.3f}, {m['mis_confidence_ci'][1]:.3f}], n_units={m['n_units']}")
    for c in summary["comparisons"]:
        r = c["rank_sum_mis_confidence"]
        if r["p"] is not None:
            click.echo(f"{c['a']} vs {c['b']}: rank-sum p={r['p']:.3g}, P({c['a']} > {c['b']})={r['prob_a_greater']:.3f}")
    if summary.get("alpha_warning"):
        click.echo(f"warning: {summary['alpha_warning']}")
    click.echo(f"wrote {path}")


@report.command()
@click.option("--runs", required=True, type=click.Path(exists=True), help="runs.csv, or a study folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The report's folder.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap intervals and of unit picks.")
@click.option("--baseline", default=None,
              help="The unpruned run that pruned runs are paired with (default: the run named control, else base).")
@click.option("--classwise-layer", default="softmax", show_default=True,
              help="Layer of class units for each run's class-wise report (runs with an eval column).")
@list_option("--unit", "--units", "units", help="LAYER:INDEX to picture (repeatable or comma-separated).")
@handle_errors
@refuses_overwrite(passes=True)
def sweep(runs, out, seed, baseline, classwise_layer, units, overwrite):
    """MIS and accuracy against pruning rate: sweep.csv, sweep_layers.csv, paired.csv, summary.json, figures,
    class-wise reports, report.html (the same build as a study's report)."""
    path = api.report("sweep", out, runs=runs, seed=seed, baseline=baseline, classwise_layer=classwise_layer,
                      units=units, overwrite=overwrite)
    summary = _summary(out)
    click.echo(_fmt_corr("rate vs MIS confidence (feature layers)", summary["correlation_rate_mis_confidence"]))
    click.echo(_fmt_corr("rate vs MIS (feature layers)", summary["correlation_rate_mis"]))
    click.echo(_fmt_corr("rate vs MIS confidence (class units)", summary["correlation_rate_class_mis_confidence"]))
    if summary["duplicate_rows"]:
        click.echo(f"counted once: rows {', '.join(summary['duplicate_rows'])} repeat another row's run")
    if summary["paired_baseline"]:
        click.echo(f"paired differences against {summary['paired_baseline']}: {Path(out) / 'paired.csv'}")
    if summary["alpha_warning"]:
        click.echo(f"warning: {summary['alpha_warning']}")
    click.echo(f"wrote {path}")


@report.command()
@click.option("--scores", required=True, type=click.Path(exists=True, dir_okay=False), help="mis.csv")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The report's folder.")
@handle_errors
@refuses_overwrite(passes=True)
def layers(scores, out, overwrite):
    """Mean MIS per layer (as the MIS authors publish them): layers.csv and layers.png."""
    for row in read_csv_rows(api.report("layers", out, scores=scores, overwrite=overwrite)):
        conf = "-" if row["mis_confidence"] == "" else f"{float(row['mis_confidence']):.4f}"
        click.echo(f"{row['layer']:<44} {row['n_units']:>6} {conf:>8}")


@report.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The report's folder.")
@handle_errors
@refuses_overwrite(passes=True)
def curves(checkpoints, out, overwrite):
    """Validation accuracy per retraining epoch from checkpoint histories (curves.png, curves.csv)."""
    found = {row["name"] for row in read_csv_rows(api.report("curves", out, checkpoints=checkpoints, overwrite=overwrite))}
    click.echo(f"wrote {Path(out) / 'curves.png'} ({len(found)} curves)")


@click.command("import-scores")
@click.argument("pickle_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="mis.csv")
@list_option("--drop-type", "drop_types", help="Leave out layer types (e.g. BatchNorm2d; repeatable or comma-separated).")
@click.option("--constant", multiple=True,
              help="LAYER:I,J,... units of one layer to mark constant (e.g. pruned filters); repeat for more layers.")
@click.option("--constant-above", type=float, default=None,
              help="Mark units with mis_confidence >= this constant (pruned filters score ~1.0; e.g. 0.999).")
@handle_errors
@refuses_overwrite(passes=True)
def import_scores(pickle_file, out, drop_types, constant, constant_above, overwrite):
    """Convert a published per-unit MIS pickle to mis.csv (restricted unpickler: data only)."""
    summary = api.import_scores(pickle_file, out, drop_types=drop_types, constant=constant,
                                constant_above=constant_above, overwrite=overwrite)
    click.echo(f"{summary['n_units']} units ({summary['n_ok']} scored): mean MIS {summary['mean_mis']:.4f}, "
               f"mean MIS confidence {summary['mean_mis_confidence']:.4f}")
    click.echo(f"wrote {out}")


COMMANDS = [report, import_scores]

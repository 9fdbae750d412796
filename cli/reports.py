"""misbench report classwise|sweep|layers|curves, misbench import-scores."""

from pathlib import Path

import click

from .common import handle_errors, refuses_overwrite


def _fmt_corr(name, c):
    if c["pearson_r"] is None:
        return f"{name}: n={c['n']} (too few points)"
    return (f"{name}: pearson r={c['pearson_r']:.3f} (p={c['pearson_p']:.3g}), "
            f"spearman rho={c['spearman_rho']:.3f} (p={c['spearman_p']:.3g}), n={c['n']}")


@click.group()
def report():
    """Tables, statistics, figures and report.html."""


@report.command()
@click.option("--scores", required=True, type=click.Path(exists=True, dir_okay=False), help="mis.csv")
@click.option("--acts", type=click.Path(exists=True, dir_okay=False), default=None, help="Activation file (its logits).")
@click.option("--eval", "eval_json", type=click.Path(exists=True, dir_okay=False), default=None, help="eval.json")
@click.option("--layer", default=None, help="Layer of class units in mis.csv (default softmax).")
@click.option("--tasks", type=click.Path(exists=True, dir_okay=False), default=None, help="tasks.h5, for unit pictures.")
@click.option("--unit", "units", multiple=True, help="LAYER:INDEX to picture (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@handle_errors
@refuses_overwrite(("out", ("classwise.csv", "summary.json", "report.html")))
def classwise(scores, acts, eval_json, layer, tasks, units, out, seed):
    """Softmax-unit MIS against class-wise accuracy: classwise.csv, summary.json, figure, report.html."""
    from misbench.reports.build import build_classwise

    path, summary = build_classwise(scores, out, acts=acts, eval_json=eval_json, layer=layer, seed=seed, tasks=tasks,
                                    units=units)
    click.echo(_fmt_corr("accuracy vs MIS confidence", summary["correlation_accuracy_mis_confidence"]))
    click.echo(_fmt_corr("accuracy vs MIS", summary["correlation_accuracy_mis"]))
    if summary["alpha_warning"]:
        click.echo(f"warning: {summary['alpha_warning']}")
    click.echo(f"wrote {path}")


@report.command()
@click.option("--runs", required=True, type=click.Path(exists=True), help="runs.csv, or a study folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--baseline", default=None,
              help="The unpruned run that pruned runs are paired with (default: the run named control, else base).")
@click.option("--classwise-layer", default="softmax", show_default=True,
              help="Layer of class units for each run's class-wise report (runs with an eval column).")
@click.option("--unit", "units", multiple=True, help="LAYER:INDEX to picture (repeatable).")
@handle_errors
@refuses_overwrite(("out", ("sweep.csv", "summary.json", "report.html")))
def sweep(runs, out, seed, baseline, classwise_layer, units):
    """MIS and accuracy against pruning rate: sweep.csv, sweep_layers.csv, paired.csv, summary.json, figures,
    class-wise reports, report.html (the same build as a study's report)."""
    from misbench.reports.build import build_sweep

    path, summary = build_sweep(runs, out, seed, baseline=baseline, classwise_layer=classwise_layer, units=units)
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
@click.option("--out", required=True, type=click.Path(file_okay=False))
@handle_errors
@refuses_overwrite(("out", ("layers.csv", "layers.png")))
def layers(scores, out):
    """Mean MIS per layer (as the MIS authors publish them): layers.csv and layers.png."""
    from misbench.reports.figures import layers_figure
    from misbench.reports.tables import LAYER_COLUMNS, layer_summary, read_scores, score_settings, write_csv

    table = layer_summary(read_scores(scores), **score_settings(scores))
    Path(out).mkdir(parents=True, exist_ok=True)
    write_csv(Path(out) / "layers.csv", table, LAYER_COLUMNS)
    layers_figure(table, Path(out) / "layers.png")
    for row in table:
        conf = "-" if row["mis_confidence"] is None else f"{row['mis_confidence']:.4f}"
        click.echo(f"{row['layer']:<44} {row['n_units']:>6} {conf:>8}")


@report.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@handle_errors
@refuses_overwrite(("out", ("curves.csv", "curves.png")))
def curves(checkpoints, out):
    """Validation accuracy per retraining epoch from checkpoint histories (curves.png, curves.csv)."""
    from misbench.reports.sweep import training_curves, write_curves

    found = training_curves([{"name": Path(c).stem, "checkpoint": c} for c in checkpoints])
    Path(out).mkdir(parents=True, exist_ok=True)
    write_curves(found, out)
    click.echo(f"wrote {Path(out) / 'curves.png'} ({len(found)} curves)")


@click.command("import-scores")
@click.argument("pickle_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="mis.csv")
@click.option("--drop-type", "drop_types", multiple=True, help="Leave out a layer type (e.g. BatchNorm2d).")
@click.option("--constant", multiple=True, help="LAYER:I,J,... units to mark constant (e.g. pruned filters).")
@click.option("--constant-above", type=float, default=None,
              help="Mark units with mis_confidence >= this constant (pruned filters score ~1.0; e.g. 0.999).")
@handle_errors
@refuses_overwrite("out")
def import_scores(pickle_file, out, drop_types, constant, constant_above):
    """Convert a published per-unit MIS pickle to mis.csv (restricted unpickler: data only)."""
    from misbench.reports.importer import import_scores as run_import

    summary = run_import(pickle_file, out, drop_types, constant, constant_above)
    click.echo(f"{summary['n_units']} units ({summary['n_ok']} scored): mean MIS {summary['mean_mis']:.4f}, "
               f"mean MIS confidence {summary['mean_mis_confidence']:.4f}")
    click.echo(f"wrote {out}")


COMMANDS = [report, import_scores]

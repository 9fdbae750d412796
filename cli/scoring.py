"""misbench score / calibrate."""

import json

import click

from misbench import api
from misbench.errors import MisbenchError
from misbench.runtime.distributed import is_main
from misbench.scoring.calibrate import calibrate_responses, derive_alpha, tasks_deltas
from misbench.scoring.settings import ScoreSettings

from .common import AliasOption, StagedProgress, handle_errors, list_option, refuses_overwrite, settings_options


@click.command()
@click.argument("acts", type=click.Path(exists=False, dir_okay=False))
@list_option("--layer", "--layers", "layers", required=True,
             help="Layer names (repeatable or comma-separated), or 'all'.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="mis.csv (mis.json is written beside it).")
@click.option("--alpha-from", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The JSON of `misbench calibrate --out`: its alpha, recorded as calibrated:<responses sha256>.")
@click.option("--tasks-out", type=click.Path(dir_okay=False), default=None, help="Write the tasks to this HDF5 file.")
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="Embedding cache directory.")
@click.option("--shard", default=None, help="I/N: score every N-th unit starting at I.")
@settings_options(ScoreSettings)
@handle_errors
@refuses_overwrite(passes=True)  # the library tells a killed run's tasks.h5 / mis.json (replaced) from another run's
def score(acts, layers, out, alpha_from, tasks_out, cache, shard, overwrite, **options):
    """Score every unit of LAYERs in ACTS with the Mechanistic Interpretability Score."""
    bars = StagedProgress({"embed": "img", "score": "unit"})
    try:
        scores = api.score(acts, layers, out, tasks_out=tasks_out, cache=cache, shard=shard, overwrite=overwrite,
                           progress=bars if is_main() else None, alpha_from=alpha_from, **options)
    finally:
        bars.close()
    if scores is None:  # another rank's process under torchrun: rank 0 reports
        return
    meta = scores.attrs
    with_ms = "ms" in options["metrics"]
    click.echo(f"{'layer':<40} {'units':>6} {'const':>6} {'sparse':>6} {'MIS':>7} {'conf':>7}" + (f" {'MS':>7}" if with_ms else ""))
    for name, s in meta["layers"].items():
        mis = f"{s['mis']:.3f}" if s["mis"] is not None else "-"
        conf = f"{s['mis_confidence']:.3f}" if s["mis_confidence"] is not None else "-"
        ms = (f" {s['ms']:>7.3f}" if s.get("ms") is not None else f" {'-':>7}") if with_ms else ""
        click.echo(f"{name:<40} {s['n_units']:>6} {s['n_constant']:>6} {s.get('n_sparse', 0):>6} {mis:>7} {conf:>7}{ms}")
    click.echo(closing_line(meta, options['selection']))
    if meta["model_mean"]["mis"] is not None and not meta["alpha_source"].startswith("calibrated:"):
        click.echo(f"note: alpha is {meta['alpha_source']}, not calibrated: mis_confidence depends on it "
                   "(misbench calibrate; docs/mis.md)")
    click.echo(f"wrote {out}")


def closing_line(meta: dict, selection: str) -> str:
    """The layer-balanced means of mis.json (the mean over layers of each layer's mean, as reports and the README
    use them), feature and class layers apart, with the units left out."""
    parts = []
    for key, label in (("feature_mean", "layer-balanced feature mean"), ("class_mean", "layer-balanced class mean")):
        m = meta[key]
        if m["mis"] is not None:
            parts.append(f"{label}: MIS {m['mis']:.3f} confidence {m['mis_confidence']:.3f} "
                         f"({m['n_layers']} layers, {m['n_units']} units)")
    left = meta["model_mean"]
    n_sparse = left.get("n_sparse", 0)
    excluded = f"left out: {left.get('n_constant', 0)} constant" + (
        f"; {n_sparse} sparse counted (--keep-sparse)" if left.get("sparse_included") else f", {n_sparse} sparse")
    return ("; ".join(parts) or "no scored units") + (f"; {excluded} (n_rows {meta['n_rows']}, selection {selection}, "
                                                      f"alpha {meta['alpha']} {meta['alpha_source']})")


COMMANDS = [score]


@click.command()
@click.argument("responses", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--derive", "derive_from", type=click.Path(exists=True, dir_okay=False), default=None,
              help="No human data: derive alpha from a reference tasks.h5 by the documented median rule.")
@click.option("--tasks-file", "--tasks", "tasks_h5", cls=AliasOption, aliases=("--tasks",),
              type=click.Path(exists=True, dir_okay=False), default=None,
              help="tasks.h5 (score --tasks-out) to look deltas up by layer,unit,task.")
@click.option("--level", default=0.95, show_default=True, help="Confidence level of the interval.")
@click.option("--model", default=None, help="IMI trial tables: the model whose trials to use.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the fit as JSON (with the responses' sha256) for `score --alpha-from`.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
@refuses_overwrite(passes=True)  # checked in the body: with --derive, --out is refused whatever exists
def calibrate(responses, derive_from, tasks_h5, level, model, out, as_json, overwrite):
    """Fit alpha of mis_confidence to human 2-AFC RESPONSES (CSV: delta or layer,unit,task; correct; or the IMI
    study's trial table), or derive one with --derive TASKS.h5 (not a calibration)."""
    if derive_from:
        rule = derive_alpha(tasks_deltas(derive_from))
        if out:  # a derived alpha is no calibration: score records it as user, never as calibrated
            raise MisbenchError(f"--out {out}: --derive writes no calibration file; pass --alpha {rule['alpha']:.4g} "
                                "to score instead (recorded as user), or leave out --out")
        click.echo(json.dumps(rule, indent=2) if as_json else
                   f"alpha {rule['alpha']:.4g} (median |delta| {rule['median_abs_delta']:.4g} -> confidence "
                   f"{rule['confidence']}, n {rule['n']}); use with --alpha, recorded as user")
        return
    if not responses:
        raise MisbenchError("calibrate needs RESPONSES (human 2-AFC answers) or --derive TASKS.h5")
    fit = calibrate_responses(responses, tasks_h5, model, level, out, overwrite)
    if as_json:
        click.echo(json.dumps(fit, indent=2))
        return
    if fit["alpha"] is None:  # anti-correlated or separated responses: no alpha fits
        click.echo(f"warning: {fit['warning']}")
        return
    high = "unbounded" if fit["ci_high"] is None else f"{fit['ci_high']:.4g}"
    click.echo(f"alpha {fit['alpha']:.4g}  ({fit['level']:.0%} CI {fit['ci_low']:.4g} - {high})")
    click.echo(f"log-likelihood {fit['log_likelihood']:.2f} (chance {fit['log_likelihood_chance']:.2f}), "
               f"n {fit['n']}, human accuracy {fit['accuracy']:.3f}")


COMMANDS.append(calibrate)


@click.command("merge-scores")
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Merged mis.csv (mis.json beside it).")
@click.option("--tasks-out", type=click.Path(dir_okay=False), default=None, help="Also merge the parts' tasks files.")
@handle_errors
@refuses_overwrite(passes=True)
def merge_scores(parts, out, tasks_out, overwrite):
    """Merge the mis.csv files of `score --shard I/N` runs into the result of one unsharded run."""
    meta = api.merge_scores(parts, out, tasks_out=tasks_out, overwrite=overwrite).attrs
    click.echo(f"merged {len(parts)} shards, {sum(s['n_units'] for s in meta['layers'].values())} scored units -> {out}")


COMMANDS.append(merge_scores)

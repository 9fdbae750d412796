"""misbench study / demo."""

import time
from pathlib import Path

import click

from misbench import api
from misbench.studies.run import demo_config_path, study_summary

from .common import StagedProgress, _clock, handle_errors


class StepClock:
    """`[step i/n] running NAME, elapsed H:MM:SS, about H:MM:SS left` before each step. The estimate is the mean
    time of the steps run so far times the steps still to come (cached ones take no time, so it errs long)."""

    def __init__(self, clock=time.monotonic, echo=None):
        self.clock, self.echo = clock, echo or (lambda line: click.echo(line, err=True))
        self.start = clock()
        self.current, self.durations = None, []

    def __call__(self, name: str, status: str, i: int, n: int):
        now = self.clock()
        if self.current is not None:
            self.durations.append(now - self.current)
        self.current = now if status != "cached" else None
        mark = {"cached": "cached", "run": "running", "resume": "resuming"}[status]
        estimate = ""
        if status != "cached":
            left = n - i + 1
            estimate = (f", about {_clock(sum(self.durations) / len(self.durations) * left)} left"
                        if self.durations else ", estimate after the first step")
        self.echo(f"[step {i}/{n}] {mark} {name}, elapsed {_clock(now - self.start)}{estimate}")


def print_summary(out_dir):
    # the reports' statistics load scipy: imported when a summary is printed, not by `misbench --help`
    from misbench.reports.stats import format_correlation

    s = study_summary(out_dir)

    def f(v, fmt=".3f"):
        try:
            return format(float(v), fmt)
        except (TypeError, ValueError):
            return "-"

    baseline = s["summary"].get("paired_baseline")
    click.echo(f"\n{'run':<34} {'method':<12} {'rate':>4} {'top1':>5} {'MIS':>5} {'conf':>5} {'class':>5} "
               f"{'r(acc,conf)':>11}  {'paired d(conf) [95% CI], p':<30}")
    for r in s["runs"]:
        p = r.get("paired")
        pair = (f"{f(p['diff_mis_confidence'], '+.3f')} [{f(p['diff_conf_ci_low'], '+.3f')}, "
                f"{f(p['diff_conf_ci_high'], '+.3f')}] {f(p['wilcoxon_p_confidence'], '.2g')}") if p else ""
        click.echo(f"{r['name']:<34} {r['method']:<12} {f(r['rate'], '.1f'):>4} {f(r['top1'], '.2f'):>5} "
                   f"{f(r['mis'], '.3f'):>5} {f(r['mis_confidence'], '.3f'):>5} {f(r['class_mis_confidence'], '.3f'):>5} "
                   f"{f(r['r_acc_conf'], '+.3f'):>11}  {pair}")
    click.echo("MIS, conf: layer-balanced means over feature layers; class: softmax units' MIS confidence"
               + (f"; paired: per-unit differences against {baseline} (Wilcoxon p)" if baseline else ""))
    for key, label in (("correlation_rate_mis_confidence", "pruning rate vs MIS confidence"),
                       ("correlation_rate_mis", "pruning rate vs MIS"),
                       ("correlation_rate_class_mis_confidence", "pruning rate vs class-unit conf"),
                       ("correlation_rate_top1", "pruning rate vs top-1")):
        c = s["summary"][key]
        if c["pearson_r"] is not None:
            click.echo(f"{label:<32} {format_correlation(c)}")
    click.echo("r(acc,conf): Pearson correlation of softmax-unit MIS confidence with class-wise accuracy")
    if s["summary"].get("alpha_warning"):
        click.echo(f"warning: {s['summary']['alpha_warning']}")
    click.echo(f"report: {s['report']}")


def _run(config, out, dry_run, quick, overwrite=False):
    if dry_run:
        for name, status in api.study(config, out, quick=quick, dry_run=True, overwrite=overwrite)["plan"]:
            click.echo(f"{'cached' if status == 'cached' else 'run   '}  {name}")
        return
    ran, clock = [], StepClock()

    def on_step(name, status, i, n):
        clock(name, status, i, n)
        if status != "cached":
            ran.append(name)

    bars = StagedProgress({"extract": "img", "eval": "img", "embed": "img", "score": "unit"})
    try:
        api.study(config, out, quick=quick, on_step=on_step, progress=bars, overwrite=overwrite)
    finally:
        bars.close()
    click.echo(f"{len(ran)} steps ran; manifest {Path(out) / 'manifest.json'}", err=True)
    print_summary(out)


@click.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Study folder.")
@click.option("--dry-run", is_flag=True, help="Print the plan: which steps would run and which are cached.")
@click.option("--quick", is_flag=True, help="Apply the config's [quick] overrides.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder that is not a study folder.")
@handle_errors
def study(config_path, out, dry_run, quick, overwrite):
    """Run the whole study of CONFIG (TOML) into OUT, redoing only what changed."""
    _run(config_path, out, dry_run, quick, overwrite)


@click.command()
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Default: demo-out (demo-out-quick).")
@click.option("--quick", is_flag=True, help="A smaller demo (under a minute on 2 cores once set up).")
@click.option("--dry-run", is_flag=True)
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder that is not a study folder.")
@handle_errors
def demo(out, quick, dry_run, overwrite):
    """The bundled demo study: a miniature GoogLeNet on Fashion-MNIST, pruned, retrained, scored, reported."""
    out = out or ("demo-out-quick" if quick else "demo-out")
    click.echo(f"demo config: {demo_config_path()}", err=True)
    _run(demo_config_path(), Path(out), dry_run, quick, overwrite)


COMMANDS = [study, demo]

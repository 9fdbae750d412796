"""misbench study / demo."""

import time
import tomllib
from pathlib import Path

import click

from misbench import api
from misbench.studies.launch import EXECUTORS
from misbench.studies.run import demo_config_path, study_summary
from misbench.studies.slurm import cancel_study, study_status

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
                f"{f(p['diff_conf_ci_high'], '+.3f')}] {f(p['p_confidence'], '.2g')}") if p else ""
        click.echo(f"{r['name']:<34} {r['method']:<12} {f(r['rate'], '.1f'):>4} {f(r['top1'], '.2f'):>5} "
                   f"{f(r['mis'], '.3f'):>5} {f(r['mis_confidence'], '.3f'):>5} {f(r['class_mis_confidence'], '.3f'):>5} "
                   f"{f(r['r_acc_conf'], '+.3f'):>11}  {pair}")
    click.echo("MIS, conf: layer-balanced means over feature layers; class: softmax units' MIS confidence"
               + (f"; paired: layer-balanced mean of per-unit differences against {baseline}, bootstrap 95% CI, sign-flip p" if baseline else ""))
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
    if s["dictionaries"]:
        print_dictionaries(s["dictionaries"], f)
    click.echo(f"report: {s['report']}")


def print_dictionaries(rows, f):
    """report/dictionaries/dictionaries.csv as a table: per layer its neurons, then each dictionary."""
    click.echo(f"\n{'layer':<12} {'population':<24} {'units':>5} {'ok':>4} {'MIS':>5} {'MS':>5} {'FVU':>5} {'L0':>5} "
               f"{'dead':>4} {'dens':>4} {'sprs':>4}  {'d(MIS) [95% CI], rank-sum p':<30}")
    for r in rows:
        diff = (f"{f(r['diff_mis'], '+.3f')} [{f(r['diff_ci_low'], '+.3f')}, {f(r['diff_ci_high'], '+.3f')}] "
                f"{f(r['rank_sum_p'], '.2g')}") if r["diff_mis"] else ""
        click.echo(f"{r['layer']:<12} {r['label']:<24} {r['n_units']:>5} {r['n_scored']:>4} {f(r['mis']):>5} "
                   f"{f(r['ms']):>5} {f(r['fvu']):>5} {f(r['l0'], '.1f'):>5} {f(r['dead_share'], '.2f'):>4} "
                   f"{f(r['density'], '.2f'):>4} {f(r['share_sparse'], '.2f'):>4}  {diff}")
    click.echo("per layer: its neurons, then each dictionary's features (untrained: initial weights; permuted: "
               "activations permuted across images); MIS, MS: means over scored units; ok: units scored (constant "
               "and sparse left out); dens: mean density; sprs: share sparse; d(MIS): features - neurons, bootstrap "
               "95% CI (report/dictionaries/)")


def _print_dry_run(result):
    for name, status in result["plan"]:
        resources = result["resources"].get(name)
        click.echo(f"{'cached' if status == 'cached' else 'run   '}  {name}" + (f"  [{resources}]" if resources else ""))
    e = result["estimate"]
    hours = (f"about {e['gpu_hours']:,.1f} GPU hours for those to run at docs/reproducing.md's rates (one H100; "
             f"{e['train_images']:,} training, {e['val_images']:,} validation images)") if e["gpu_hours"] is not None \
        else "GPU hours: unknown until the data folders below exist"
    click.echo(f"{e['networks']} networks, {e['steps']} steps ({e['to_run']} to run, {e['cached']} cached); {hours}")
    for problem in result["problems"]:
        click.echo(f"Error: {problem}", err=True)
    if result["problems"]:
        raise SystemExit(1)


def _run(config, out, dry_run, quick, overwrite=False, executor="local"):
    if dry_run:
        _print_dry_run(api.study(config, out, quick=quick, dry_run=True, overwrite=overwrite, executor=executor))
        return
    if executor != "local":
        result = api.study(config, out, quick=quick, overwrite=overwrite, executor=executor)
        for name, job in result["jobs"].items():
            click.echo(f"submitted {name}: job {job}")
        click.echo(f"{len(result['jobs'])} jobs submitted; follow them with `misbench study status {out}`", err=True)
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
    if quick:
        click.echo("quick: a smoke test (one rate, fewer images and epochs); its numbers are not findings")


@click.command()
@click.argument("out", metavar="DIR", type=click.Path(file_okay=False))
@handle_errors
def status(out):
    """One line per step of the study in DIR (state, job id, node, elapsed, log); exit 0 when all are done, 1 when
    any failed (or Slurm lost its job), 2 while steps are pending, running or cancelled."""
    result = study_status(out)
    for r in result["steps"]:
        job = f"job {r['job_id']}" if r["job_id"] else "-"
        line = f"{r['state']:<13} {r['step']:<40} {job:<12} {r['node'] or '-':<10} {r['elapsed']:>8}  {r['log'] or '-'}"
        click.echo(line + (f"  ({r['reason']})" if r["reason"] else ""))
    counts = result["counts"]
    click.echo(f"{len(result['steps'])} steps: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    lost = [r for r in result["steps"] if r["state"] == "lost"]
    if lost:
        click.echo(f"Error: Slurm no longer knows job {lost[0]['job_id']} ({lost[0]['step']}) and it recorded no end"
                   + (f", nor {len(lost) - 1} more" if len(lost) > 1 else "") + ": submit the study again "
                   f"(`misbench study CONFIG --out {out} --executor slurm` reruns only what is not done)", err=True)
    if lost or counts.get("failed"):
        raise SystemExit(1)
    if counts.get("done", 0) != len(result["steps"]):
        raise SystemExit(2)


@click.command()
@click.argument("out", metavar="DIR", type=click.Path(file_okay=False))
@handle_errors
def cancel(out):
    """Cancel the queued and running Slurm jobs of the study in DIR (finished steps stay done)."""
    jobs = cancel_study(out)
    click.echo(f"cancelled {len(jobs)} jobs" + (f": {', '.join(jobs)}" if jobs else ""))


class CommandWithSubcommands(click.Command):
    """`misbench study CONFIG ...`, whose first argument may also name a subcommand (`status DIR`, `cancel DIR`)."""

    def __init__(self, *args, subcommands: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.subcommands = subcommands

    def parse_args(self, ctx, args):
        if args and args[0] in self.subcommands:
            ctx.meta["misbench.subcommand"] = list(args)
            return []
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        args = ctx.meta.pop("misbench.subcommand", None)
        if args is None:
            return super().invoke(ctx)
        command = self.subcommands[args[0]]
        # the parent is `misbench`'s context, so that usage lines read `misbench study status DIR`
        with command.make_context(f"{ctx.info_name} {args[0]}", args[1:], parent=ctx.parent) as sub:
            return command.invoke(sub)


@click.command(cls=CommandWithSubcommands, subcommands={"status": status, "cancel": cancel},
               epilog="Also: `misbench study status DIR` and `misbench study cancel DIR` (the Slurm executor's jobs).")
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Study folder.")
@click.option("--executor", default="local", show_default=True, type=click.Choice(list(EXECUTORS)),
              help="local: every step here, in order; slurm: every pending step as one Slurm job ([executor]).")
@click.option("--dry-run", is_flag=True, help="Print the plan (with --executor slurm each step's resources), the "
              "estimated GPU hours and every missing data folder or weight file.")
@click.option("--quick", is_flag=True, help="Apply the config's [quick] overrides.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder that is not a study folder.")
@handle_errors
def study(config_path, out, executor, dry_run, quick, overwrite):
    """Run the whole study of CONFIG (TOML) into OUT, redoing only what changed."""
    _run(config_path, out, dry_run, quick, overwrite, executor)


@click.command()
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Default: demo-out (demo-out-quick).")
@click.option("--quick", is_flag=True, help="A smaller demo (under a minute on 2 cores once set up).")
@click.option("--dry-run", is_flag=True, help="Print the plan: which steps would run and which are cached.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder that is not a study folder.")
@click.option("--seed", type=int, default=None,
              help="The study's seed in place of the config's 0 (training, pruning, tasks, intervals): how much the "
                   "demo's numbers move (README). Default out: demo-out-seedN.")
@handle_errors
def demo(out, quick, dry_run, overwrite, seed):
    """The bundled demo study: a miniature GoogLeNet on Fashion-MNIST, pruned, retrained, scored, reported."""
    out = out or ("demo-out-quick" if quick else "demo-out") + (f"-seed{seed}" if seed is not None else "")
    click.echo(f"demo config: {demo_config_path()}" + (f", seed {seed}" if seed is not None else ""), err=True)
    config = demo_config_path()
    if seed is not None:
        with open(config, "rb") as handle:
            config = tomllib.load(handle)
        config["study"]["seed"] = seed
    _run(config, Path(out), dry_run, quick, overwrite)


COMMANDS = [study, demo]

"""misbench prune / retrain / audit."""

import json

import click

from misbench import api
from misbench.models.checkpoint import load_checkpoint_dict
from misbench.pruning.masks import PruneSettings
from misbench.pruning.training import TrainSettings
from misbench.runtime.distributed import is_main

from .common import Progress, handle_errors, model_kwargs, model_options, settings_options


def training_options(func):
    """TrainSettings' options and what a training run reads and writes."""
    options = [
        click.option("--data", default=None, help="Training DATA."),
        click.option("--val-data", default=None, help="Validation DATA (top-1 after each epoch)."),
        click.option("--resize", type=int, default=None,
                     help="Override the model's preprocessing resize (stored in the checkpoint)."),
        click.option("--crop", type=int, default=None, help="Override the model's preprocessing centre crop."),
        click.option("--resume", is_flag=True, help="Continue from the last epoch checkpoint (OUT.partial)."),
        click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (.pt)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace an existing OUT (kept until the new checkpoint is complete)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class _EpochBar:
    def __init__(self):
        self.bar, self.key = None, None

    def __call__(self, step, epoch, done, total):
        if self.key != (step, epoch):
            self.close()
            self.bar, self.key = Progress(f"step {step} epoch {epoch}", "batch"), (step, epoch)
        self.bar(done, total)

    def close(self):
        if self.bar:
            self.bar.close()


def _run(model, model_kw, prune, kw):
    """`prune` holds api.prune's pruning arguments; None: retrain. `kw`: the command's other options."""
    bar = _EpochBar() if is_main() else None
    common = dict(progress=bar, **model_kwargs(*model_kw), **kw)
    try:
        if prune is None:
            path = api.retrain(model, **common)
        else:
            path = api.prune(model, **prune, **common)
    finally:
        if bar:
            bar.close()
    if not is_main():
        return
    ckpt = load_checkpoint_dict(path)
    sparsity = (ckpt.get("pruning") or {}).get("achieved_sparsity")
    history = ckpt["training"]["history"]
    last = history[-1]["val_top1"] if history else None
    click.echo(f"wrote {path}" + (f"  sparsity {sparsity:.4f}" if sparsity is not None else "")
               + (f"  val_top1 {last:.4f}" if last is not None else ""))


@click.command()
@click.argument("model")
@model_options
@settings_options(PruneSettings, TrainSettings)
@training_options
@handle_errors
def prune(model, arch, num_classes, arch_kwargs, trust_pickle, method, rate, scope, criterion, schedule, steps,
          exclude, **kw):
    """Prune MODEL by METHOD to RATE and retrain; write a misbench checkpoint."""
    _run(model, (arch, num_classes, arch_kwargs, trust_pickle),
         dict(method=method, rate=rate, scope=scope, criterion=criterion, schedule=schedule, steps=steps,
              exclude=exclude), kw)


@click.command()
@click.argument("model")
@model_options
@settings_options(TrainSettings, defaults={"epochs": 1}, helps={"epochs": "Retraining epochs (at least 1)."})
@training_options
@handle_errors
def retrain(model, arch, num_classes, arch_kwargs, trust_pickle, **kw):
    """Retrain MODEL without pruning (the unpruned control); masks of a pruned checkpoint stay enforced."""
    _run(model, (arch, num_classes, arch_kwargs, trust_pickle), None, kw)


@click.command()
@click.argument("model")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def audit(model, arch, num_classes, arch_kwargs, trust_pickle, as_json):
    """Per-layer sparsity of MODEL and whether it matches its pruning record (exit status 0 either way)."""
    result = api.audit(model, **model_kwargs(arch, num_classes, arch_kwargs, trust_pickle))
    if as_json:
        click.echo(json.dumps({k: result[k] for k in ("layers", "total", "target", "consistent", "problems",
                                                          "empty_layers")}, indent=1))
        return
    click.echo(f"{'layer':<40} {'weights':>10} {'zeros':>10} {'sparsity':>8} {'0-out':>6} {'0-in':>6}")
    for l in result["layers"]:
        click.echo(f"{l['name']:<40} {l['weights']:>10} {l['zeros']:>10} {l['sparsity']:>8.4f} "
                   f"{l['zero_out_channels']:>6} {l['zero_in_channels']:>6}")
    t = result["total"]
    click.echo(f"{'total (prunable)':<40} {t['weights']:>10} {t['zeros']:>10} {t['sparsity']:>8.4f}")
    target = result["target"]
    if target:
        click.echo(f"target: {target['method']} {target['scope']} {target['criterion']} rate {target['rate']} "
                   f"({target['schedule']}, {target['steps']} steps), achieved {target['achieved_sparsity']:.4f}")
    verdict = {True: "consistent", False: "INCONSISTENT", None: "no pruning record to compare with"}[result["consistent"]]
    click.echo(f"audit: {verdict}")
    for problem in result["problems"]:
        click.echo(f"  - {problem}")


COMMANDS = [prune, retrain, audit]

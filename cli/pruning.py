"""misbench prune / retrain / audit."""

import json

import click

from misbench import api
from misbench.models.checkpoint import load_checkpoint_dict
from misbench.pruning.masks import CRITERIA, METHODS, SCHEDULES
from misbench.runtime.distributed import is_main

from .common import Progress, handle_errors, labels_option, list_option, model_kwargs, model_options, workers_option


def training_options(func):
    options = [
        click.option("--epochs", default=0, show_default=True, help="Retraining epochs after each pruning step."),
        click.option("--data", default=None, help="Training DATA."),
        click.option("--val-data", default=None, help="Validation DATA (top-1 after each epoch)."),
        click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True),
        click.option("--lr", type=float, default=None, help="Default 0.01 (SGD) or 0.001 (Adam)."),
        click.option("--momentum", default=0.9, show_default=True),
        click.option("--weight-decay", default=1e-4, show_default=True),
        click.option("--gamma", default=0.9, show_default=True, help="ExponentialLR factor per epoch."),
        click.option("--batch-size", default=64, show_default=True),
        click.option("--train-limit", type=int, default=None, help="Only the first N training images."),
        click.option("--val-limit", type=int, default=None, help="Only the first N validation images."),
        workers_option,
        click.option("--device", default="auto", show_default=True),
        click.option("--no-amp", is_flag=True, help="Train in float32 on CUDA too (CPU training is always float32)."),
        click.option("--no-augment", is_flag=True, help="No random flips/crops in training."),
        click.option("--resize", type=int, default=None,
                     help="Override the model's preprocessing resize (stored in the checkpoint)."),
        click.option("--crop", type=int, default=None, help="Override the model's preprocessing centre crop."),
        click.option("--seed", default=0, show_default=True),
        click.option("--resume", is_flag=True, help="Continue from the last epoch checkpoint (OUT.partial)."),
        click.option("--overwrite", is_flag=True),
        click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (.pt)."),
        labels_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _train_options(kw) -> dict:
    return dict(epochs=kw["epochs"], optimizer=kw["optimizer"], lr=kw["lr"], momentum=kw["momentum"],
                weight_decay=kw["weight_decay"], gamma=kw["gamma"], batch_size=kw["batch_size"], seed=kw["seed"],
                train_limit=kw["train_limit"], val_limit=kw["val_limit"], workers=kw["workers"], device=kw["device"],
                amp=not kw["no_amp"], augment=not kw["no_augment"], labels=kw["labels"])


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
    """`prune` holds api.prune's pruning arguments; None: retrain."""
    bar = _EpochBar() if is_main() else None
    common = dict(data=kw["data"], val_data=kw["val_data"], resume=kw["resume"], overwrite=kw["overwrite"],
                  progress=bar, resize=kw["resize"], crop=kw["crop"], **model_kwargs(*model_kw), **_train_options(kw))
    try:
        if prune is None:
            path = api.retrain(model, kw["out"], **common)
        else:
            path = api.prune(model, out=kw["out"], **prune, **common)
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
@click.option("--method", required=True, type=click.Choice(list(METHODS)))
@click.option("--rate", required=True, type=float, help="Fraction of prunable weights removed, in (0, 1).")
@click.option("--scope", type=click.Choice(["global", "local"]), default=None,
              help="Default: global for unstructured, local for structured/connection.")
@click.option("--criterion", type=click.Choice(list(CRITERIA)), default="l1", show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="oneshot", show_default=True)
@click.option("--steps", default=None, type=int, help="Pruning steps of the iterative schedule (default 4).")
@list_option("--exclude", absent=None, help="Module names left unpruned, repeatable or comma-separated (GoogLeNet default: "
              "conv1,conv2,conv3,aux1,aux2; '' for none).")
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

"""misbench extract / eval."""

import click

from misbench import api
from misbench.activations.evaluate import EvalSettings
from misbench.activations.extract import ExtractSettings
from misbench.runtime.distributed import is_main

from .common import (Progress, handle_errors, list_option, model_kwargs, model_options, refuses_overwrite,
                     settings_options)


@click.command()
@click.argument("model")
@model_options
@click.option("--data", required=True, help="ImageFolder directory, fashion-mnist:train|test, or digits.")
@list_option("--layers", "--layer", "layers", required=True,
             help="Module names (see `misbench layers MODEL`), or logits, softmax, conv, mlp; repeatable or comma-separated.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output HDF5 file.")
@settings_options(ExtractSettings)
@click.option("--resume", is_flag=True, help="Continue an interrupted extraction.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file (kept until the new one is complete).")
@handle_errors
def extract(model, arch, num_classes, arch_kwargs, trust_pickle, data, layers, out, resume, overwrite, **options):
    """Record per-unit activations of MODEL on DATA into an HDF5 file."""
    with Progress("extract") as bar:
        path = api.extract(model, data, layers, out, resume=resume, overwrite=overwrite,
                           progress=bar if is_main() else None,
                           **model_kwargs(arch, num_classes, arch_kwargs, trust_pickle), **options)
    if is_main():
        click.echo(f"wrote {path}")


@click.command("eval")
@click.argument("model", required=False)
@model_options
@click.option("--data", default=None, help="DATA to evaluate MODEL on.")
@click.option("--acts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Evaluate from a finished activation file's stored logits instead.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="eval.json")
@click.option("--classwise", type=click.Path(dir_okay=False), default=None, help="Also write class,name,n,accuracy CSV.")
@settings_options(EvalSettings)
@handle_errors
@refuses_overwrite(passes=True)
def evaluate(model, arch, num_classes, arch_kwargs, trust_pickle, data, acts, out, classwise, overwrite, **options):
    """Top-1, top-5 and class-wise accuracy of MODEL on DATA (or from --acts)."""
    with Progress("eval") as bar:
        result = api.evaluate(model, data, acts=acts, out=out, classwise=classwise, progress=bar, overwrite=overwrite,
                              **model_kwargs(arch, num_classes, arch_kwargs, trust_pickle), **options)
    click.echo(f"top1 {result['top1']:.4f}  top5 {result['top5']:.4f}  n {result['n_images']}  -> {out}")


COMMANDS = [extract, evaluate]

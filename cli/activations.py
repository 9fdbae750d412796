"""misbench extract / eval."""

import click

from misbench import api
from misbench.activations.tokens import TOKEN_REDUCTIONS
from misbench.runtime.distributed import is_main

from .common import (Progress, handle_errors, labels_option, list_option, model_kwargs, model_options,
                     refuses_overwrite, workers_option)


@click.command()
@click.argument("model")
@model_options
@click.option("--data", required=True, help="ImageFolder directory, fashion-mnist:train|test, or digits.")
@list_option("--layers", "--layer", "layers", required=True,
             help="Module names (see `misbench layers MODEL`), or logits, softmax, conv, mlp; repeatable or comma-separated.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output HDF5 file.")
@click.option("--batch-size", default=64, show_default=True)
@workers_option
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--reduction", type=click.Choice(["mean", "max"]), default="mean", show_default=True)
@click.option("--token-reduction", type=click.Choice(TOKEN_REDUCTIONS), default="mean", show_default=True,
              help="How token layers ([N, tokens, D]) reduce over tokens; cls = the class token.")
@list_option("--features", "features", metavar="NAME=LAYER:FILE",
             help="Add a layer NAME of dictionary features of module LAYER (FILE: W_enc [K, D], b_enc [K], "
             "optional b_dec [D], activation); repeatable or comma-separated.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N images.")
@click.option("--resize", type=int, default=None, help="Override the resize of the model's preprocessing.")
@click.option("--crop", type=int, default=None, help="Override the centre crop of the model's preprocessing.")
@click.option("--on-bad-image", type=click.Choice(["fail", "skip"]), default="fail", show_default=True)
@click.option("--amp", is_flag=True,
              help="Mixed precision: float16 on CUDA, bfloat16 on CPU (off by default: exact activations).")
@click.option("--keep", default=None, help="topk:K: store only the K highest and lowest activations per unit "
              "(exact MIS for K >= (explanations+1) x tasks; bounded memory on huge datasets).")
@click.option("--resume", is_flag=True, help="Continue an interrupted extraction.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file (kept until the new one is complete).")
@labels_option
@handle_errors
def extract(model, arch, num_classes, arch_kwargs, trust_pickle, data, layers, out, batch_size, workers, device,
            reduction, token_reduction, features, dtype, limit, resize, crop, on_bad_image, amp, keep, resume, overwrite, labels):
    """Record per-unit activations of MODEL on DATA into an HDF5 file."""
    with Progress("extract") as bar:
        path = api.extract(model, data, layers, out, resume=resume, overwrite=overwrite,
                           progress=bar if is_main() else None,
                           **model_kwargs(arch, num_classes, arch_kwargs, trust_pickle),
                           reduction=reduction, token_reduction=token_reduction, features=tuple(features),
                           dtype=dtype, limit=limit, on_bad_image=on_bad_image, resize=resize,
                           crop=crop, amp=amp, keep=keep, labels=labels, batch_size=batch_size, workers=workers,
                           device=device)
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
@click.option("--batch-size", default=64, show_default=True)
@workers_option
@click.option("--device", default="auto", show_default=True)
@click.option("--limit", type=int, default=None)
@labels_option
@handle_errors
@refuses_overwrite(passes=True)
def evaluate(model, arch, num_classes, arch_kwargs, trust_pickle, data, acts, out, classwise, batch_size, workers,
             device, limit, labels, overwrite):
    """Top-1, top-5 and class-wise accuracy of MODEL on DATA (or from --acts)."""
    with Progress("eval") as bar:
        result = api.evaluate(model, data, acts=acts, out=out, classwise=classwise, progress=bar, overwrite=overwrite,
                              **model_kwargs(arch, num_classes, arch_kwargs, trust_pickle),
                              batch_size=batch_size, workers=workers, device=device, limit=limit, labels=labels)
    click.echo(f"top1 {result['top1']:.4f}  top5 {result['top5']:.4f}  n {result['n_images']}  -> {out}")


COMMANDS = [extract, evaluate]

"""misbench train-dictionary."""

import click

from misbench.activations.dictionary_training import DictionarySettings, train_dictionary as run

from .common import handle_errors, refuses_overwrite


@click.command("train-dictionary")
@click.argument("acts", type=click.Path(exists=True, dir_okay=False))
@click.option("--layer", required=True, help="The layer of ACTS whose rows the dictionary learns.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Dictionary file for extract --features.")
@click.option("--n-features", default=64, show_default=True, help="Dictionary size K.")
@click.option("--k", default=4, show_default=True, help="Active features per input (top-k).")
@click.option("--steps", default=300, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
@handle_errors
@refuses_overwrite("out")
def train_dictionary(acts, layer, out, n_features, k, steps, lr, batch_size, seed):
    """Train a small top-k sparse autoencoder on LAYER's stored activations (docs/mis.md has the recipe)."""
    record = run(acts, layer, out, DictionarySettings(n_features, k, steps, lr, batch_size, seed))
    click.echo(f"{layer}: {n_features} features (top-{k}), variance explained "
               f"{record['fraction_variance_explained']:.3f}, {record['alive_features']} alive -> {out}")
    click.echo(f"use: misbench extract ... --features NAME={layer}:{out}")


COMMANDS = [train_dictionary]

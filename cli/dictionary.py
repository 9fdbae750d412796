"""misbench train-dictionary."""

import click

from misbench import api
from misbench.activations.dictionary_training import DictionarySettings

from .common import handle_errors, refuses_overwrite, settings_options


@click.command("train-dictionary")
@click.argument("acts", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--layer", required=True, help="The layer of ACTS whose rows the dictionary learns.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Dictionary file for extract --features.")
@settings_options(DictionarySettings)
@click.option("--untrained-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the control: the same kind and width with its initial weights.")
@click.option("--positions", type=int, default=None,
              help="Train on per-position vectors instead (conv positions, tokens): a uniform sample of at most "
              "this many, drawn while --data streams through --model (no ACTS).")
@click.option("--model", "model_spec", default=None, help="With --positions: the MODEL whose LAYER is read.")
@click.option("--data", default=None, help="With --positions: the images (DATA).")
@click.option("--limit", type=int, default=None, help="With --positions: the first N images only.")
@click.option("--device", default="auto", show_default=True, help="With --positions: auto, cpu or cuda[:N].")
@handle_errors
@refuses_overwrite(passes=True)
def train_dictionary(acts, layer, out, untrained_out, positions, model_spec, data, limit, device, overwrite, **options):
    """Train a sparse autoencoder on LAYER's stored activations in ACTS (one vector per image), or with
    --positions on LAYER's per-position vectors (docs/mis.md has the recipe)."""
    record = api.train_dictionary(acts, layer, out, untrained_out=untrained_out, positions=positions, model=model_spec,
                                  data=data, limit=limit, device=device, overwrite=overwrite, **options)
    k_text = f", k {record['k']}" if record["k"] else ""
    click.echo(f"{layer}: {record['n_features']} features ({options['kind']}{k_text}), FVU {record['fvu']:.3f}, "
               f"L0 {record['l0']:.2f}, dead {record['dead_share']:.1%} -> {out}")
    click.echo(f"use: misbench extract ... --features NAME={layer}:{out}")


COMMANDS = [train_dictionary]

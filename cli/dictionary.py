"""misbench train-dictionary."""

import click

from misbench import api
from misbench.activations.dictionary_kinds import KINDS
from misbench.activations.dictionary_training import DictionarySettings, train_on_positions, train_dictionary as run
from misbench.errors import MisbenchError

from .common import handle_errors, refuses_overwrite


@click.command("train-dictionary")
@click.argument("acts", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--layer", required=True, help="The layer of ACTS whose rows the dictionary learns.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Dictionary file for extract --features.")
@click.option("--n-features", default=64, show_default=True, help="Dictionary size K.")
@click.option("--k", default=4, show_default=True, help="Active features per input (topk; batchtopk: on average).")
@click.option("--steps", default=300, show_default=True, help="Adam steps, one seeded minibatch each.")
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--batch-size", default=256, show_default=True, help="Rows per minibatch.")
@click.option("--seed", default=0, show_default=True, help="Seed of the initial weights and the minibatches.")
@click.option("--kind", type=click.Choice(list(KINDS)), default="topk", show_default=True,
              help="topk, batchtopk (k per input on average) or relu (ReLU with an L1 penalty --l1).")
@click.option("--expansion", type=float, default=None,
              help="Width as a multiple of the layer's units (replaces --n-features), e.g. 4.")
@click.option("--l1", default=1e-3, show_default=True, help="L1 penalty of --kind relu.")
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
@refuses_overwrite("out", "untrained_out")
def train_dictionary(acts, layer, out, n_features, k, steps, lr, batch_size, seed, kind, expansion, l1, untrained_out,
                     positions, model_spec, data, limit, device):
    """Train a sparse autoencoder on LAYER's stored activations in ACTS (one vector per image), or with
    --positions on LAYER's per-position vectors (docs/mis.md has the recipe)."""
    settings = DictionarySettings(n_features, k, steps, lr, batch_size, seed, kind, expansion, l1)
    if positions is None:
        if not acts or model_spec or data:
            raise MisbenchError("train-dictionary: give ACTS (image-level vectors), or --positions N with --model "
                                "and --data (per-position vectors), not both")
        record = run(acts, layer, out, settings, untrained_out=untrained_out)
    else:
        if acts or not (model_spec and data):
            raise MisbenchError("train-dictionary --positions: give --model and --data (the images stream through "
                                "the model) and no ACTS")
        record = train_on_positions(api.load_model(model_spec), data, layer, out, settings, positions,
                                    untrained_out=untrained_out, limit=limit, device=device)
    k_text = f", k {record['k']}" if record["k"] else ""
    click.echo(f"{layer}: {record['n_features']} features ({kind}{k_text}), FVU {record['fvu']:.3f}, "
               f"L0 {record['l0']:.2f}, dead {record['dead_share']:.1%} -> {out}")
    click.echo(f"use: misbench extract ... --features NAME={layer}:{out}")


COMMANDS = [train_dictionary]

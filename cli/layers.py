"""misbench layers."""

import click

from misbench import api

from .common import handle_errors, model_kwargs, model_options


def _classes(names: tuple, shown: int = 5) -> str:
    if not names:
        return ""
    more = f", ... ({len(names)} classes)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@click.command()
@click.argument("model")
@model_options
@handle_errors
def layers(model, arch, num_classes, arch_kwargs, trust_pickle):
    """List the layers of MODEL that `extract --layers` can record: name, kind, unit count.

    '*' marks the modules that `conv` expands to (every pre-activation conv unit), '+' those that `mlp`
    expands to (the hidden activation of every transformer MLP block); token layers count D units."""
    rows = api.layers(model, **model_kwargs(arch, num_classes, arch_kwargs, trust_pickle))
    width = max(len(r.name) for r in rows) + 2
    click.echo(f"{'layer':<{width}} {'kind':<8} {'units':>6}  module")
    for r in rows:
        mark = " *" if r.in_conv else " +" if r.in_mlp else ""
        detail = r.module + mark if r.module else _classes(r.classes)
        click.echo(f"{r.name:<{width}} {r.kind:<8} {r.n_units:>6}  {detail}".rstrip())
    for shortcut, marker, rows_of in (("conv", "*", [r for r in rows if r.in_conv]),
                                      ("mlp", "+", [r for r in rows if r.in_mlp])):
        if rows_of or shortcut == "conv":
            click.echo(f"{shortcut} = {len(rows_of)} modules, {sum(r.n_units for r in rows_of)} units ({marker})")


COMMANDS = [layers]

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

    '*' marks the modules that `conv` expands to (every pre-activation conv unit)."""
    rows = api.layers(model, **model_kwargs(arch, num_classes, arch_kwargs, trust_pickle))
    width = max(len(r.name) for r in rows) + 2
    click.echo(f"{'layer':<{width}} {'kind':<8} {'units':>6}  module")
    for r in rows:
        detail = (r.module + (" *" if r.in_conv else "")) if r.module else _classes(r.classes)
        click.echo(f"{r.name:<{width}} {r.kind:<8} {r.n_units:>6}  {detail}".rstrip())
    conv = [r for r in rows if r.in_conv]
    click.echo(f"conv = {len(conv)} modules, {sum(r.n_units for r in conv)} units (*)")


COMMANDS = [layers]

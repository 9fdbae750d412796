"""misbench assets list|stage."""

import click

from misbench import api

from .common import handle_errors


@click.group()
def assets():
    """List and stage the offline assets misbench knows (weights, datasets)."""


@assets.command("list")
@handle_errors
def list_assets():
    """Show each known asset and whether it is staged."""
    for asset in api.list_assets():
        mark = "staged " if asset["staged"] else "missing"
        click.echo(f"{mark}  {asset['name']:<14} {asset['where']}\n         {asset['description']}")


@assets.command("stage")
@click.argument("names", nargs=-1)
@click.option("--from", "from_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory holding the files (air-gapped machines).")
@handle_errors
def stage(names, from_dir):
    """Stage NAMES (default: all known assets) into the torch hub cache / misbench's data folder."""
    for name in names or [asset["name"] for asset in api.list_assets()]:
        click.echo(f"{name}: {api.stage_assets([name], from_dir)[name]}")


COMMANDS = [assets]

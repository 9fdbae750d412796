"""The `misbench` console script."""

import click

from misbench.version import __version__

from . import activations, assets, dictionary, layers, pruning, reports, scoring, study
from .common import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="misbench")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose, quiet):
    """Measure how interpretable the units of vision networks are (MIS), and how pruning changes that."""
    setup_logging(verbose, quiet)


def _register():
    for module in (activations, assets, dictionary, layers, pruning, reports, scoring, study):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main():
    cli(prog_name="misbench")

"""The `misbench` console script.

The commands are loaded when they are run (click's lazy-group pattern): each command module imports the
library stage it drives (torch, scipy, pandas, matplotlib: seconds), so `misbench --help` lists them from the
table below without importing any, and `misbench score` imports what scoring needs, not the reports.
"""

import importlib
import logging

import click

from misbench.version import __version__

# command -> (module under misbench.cli, the one-line summary `misbench --help` lists)
COMMANDS = {
    "extract": ("activations", "Record per-unit activations of MODEL on DATA into an HDF5 file."),
    "eval": ("activations", "Top-1, top-5 and class-wise accuracy of MODEL on DATA (or from --acts)."),
    "layers": ("layers", "List the layers of MODEL that `extract --layers` can record."),
    "score": ("scoring", "Score every unit of LAYERs in ACTS with the Mechanistic Interpretability Score."),
    "calibrate": ("scoring", "Fit alpha of mis_confidence to human 2-AFC responses, or derive one from tasks.h5."),
    "merge-scores": ("scoring", "Merge the mis.csv files of `score --shard I/N` runs into one."),
    "train-dictionary": ("dictionary", "Train a small top-k sparse autoencoder on LAYER's stored activations."),
    "prune": ("pruning", "Prune MODEL by METHOD to RATE and retrain; write a misbench checkpoint."),
    "retrain": ("pruning", "Retrain MODEL without pruning (the unpruned control)."),
    "audit": ("pruning", "Per-layer sparsity of MODEL and whether it matches its pruning record."),
    "report": ("reports", "Tables, statistics, figures and report.html."),
    "import-scores": ("reports", "Convert a published per-unit MIS pickle to mis.csv."),
    "study": ("study", "Run the whole study of CONFIG (TOML) into OUT, redoing only what changed."),
    "demo": ("study", "The bundled demo study: a miniature GoogLeNet on Fashion-MNIST, end to end."),
    "assets": ("assets", "List and stage the offline assets misbench knows (weights, datasets)."),
}


def load_command(name: str) -> click.Command:
    module = importlib.import_module(f"misbench.cli.{COMMANDS[name][0]}")
    command = next(c for c in module.COMMANDS if c.name == name)
    command.short_help = COMMANDS[name][1]
    return command


class LazyGroup(click.Group):
    """A group whose commands are imported when used; `commands` (introspection, tests) imports them all."""

    @property
    def commands(self) -> dict:
        return {name: load_command(name) for name in COMMANDS}

    @commands.setter
    def commands(self, _value):  # click.Group.__init__ sets it: the table above is the group's content
        pass

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, cmd_name):
        return load_command(cmd_name) if cmd_name in COMMANDS else None

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_module, summary) in COMMANDS.items()])


def setup_logging(verbose: int, quiet: bool):
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # FAISS's loader announces which CPU build it loaded at INFO: not the user's business (it stays under -vv)
    logging.getLogger("faiss").setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="misbench")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose, quiet):
    """Measure how interpretable the units of vision networks are (MIS), and how pruning changes that."""
    setup_logging(verbose, quiet)


def main():
    cli(prog_name="misbench")

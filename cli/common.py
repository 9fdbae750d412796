"""Shared CLI plumbing: errors to exit codes, progress bars, model options."""

import dataclasses
import functools
import json
import os
import sys
import time
import typing
from pathlib import Path

import click
from tqdm import tqdm

from misbench.errors import MisbenchError
from misbench.runtime.fileio import DiskFullError, cli_wording, disk_full_error, option_label, refuse_existing
from misbench.runtime.outputs import writing
from misbench.runtime.interrupts import terminate_as_interrupt
from misbench.runtime.schema import FIELD_DEFAULT, choice_list, kinds_of, settings_fields, spec


def _exit_now(message: str) -> None:
    """Print and end the process without Python's shutdown: after a failed write HDF5's library state is
    broken and its clean-up at exit would crash (segmentation fault) instead of exiting with status 1."""
    click.echo(f"Error: {message}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _quiet_failed_writes(unraisable) -> None:
    """HDF5 objects freed after a failed write (a full disk) each report it again from their destructor;
    the command reports it once, as one line."""
    if "file write failed" in str(unraisable.exc_value):
        return
    sys.__unraisablehook__(unraisable)


def handle_errors(func):
    """MisbenchError -> 'Error: ...' and exit status 1; Ctrl-C or SIGTERM -> status 130 and a hint that
    --resume exists; an OSError (unwritable path, full disk) -> one line naming the file."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        sys.unraisablehook = _quiet_failed_writes
        try:
            with terminate_as_interrupt(), cli_wording():
                return func(*args, **kwargs)
        except DiskFullError as err:
            _exit_now(str(err))
        except MisbenchError as err:
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt as err:
            what = "terminated (SIGTERM)" if str(err) == "SIGTERM" else "interrupted"
            click.echo(f"\n{what}: partial outputs are kept; rerun the same command (with --resume where it "
                       "exists) to continue", err=True)
            raise SystemExit(130) from None
        except OSError as err:
            full = disk_full_error(err, err.filename or "an output", "earlier results are unchanged: free space and rerun")
            if full is not None:
                _exit_now(str(full))
            if err.filename is None:  # h5py and torch name no file: the input being read is damaged
                raise click.ClickException(f"cannot read or write a file: {err}. An input may be damaged "
                                           "(extract or produce it again) or an output unwritable") from None
            raise click.ClickException(f"cannot use {err.filename}: {err.strerror or err}. Check the path and its "
                                       "permissions, or choose another") from None
    return wrapper


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def refuses_overwrite(*targets, passes: bool = False):
    """Adds --overwrite; without it the command stops before any work when one of its outputs exists.
    targets: parameter names of output files, or (parameter, (file, ...)) for a folder and the files it gets.
    passes: the command's library function takes `overwrite` and checks its outputs itself."""
    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, overwrite=False, **kwargs):
            if passes:
                return func(*args, overwrite=overwrite, **kwargs)
            names = {t if isinstance(t, str) else t[0] for t in targets}
            outputs = {}
            for target in targets:
                name, inside = (target, None) if isinstance(target, str) else target
                value = kwargs.get(name)
                outputs[name] = value if inside is None or not value else [Path(value) / f for f in inside]
            inputs = {k: v for k, v in kwargs.items() if k not in names and isinstance(v, str) and v}
            command = click.get_current_context().command
            arguments = {p.name for p in command.params if isinstance(p, click.Argument)}
            with writing({option_label(k): v for k, v in outputs.items()},
                         {k.upper() if k in arguments else option_label(k): v for k, v in inputs.items()},
                         f"misbench {command.name}"):
                refuse_existing(outputs, overwrite, inputs.values())
                return func(*args, **kwargs)
        return click.option("--overwrite", is_flag=True,
                            help="Replace existing outputs (without it the command refuses to).")(wrapper)
    return decorate


class Progress:
    """The library's progress(done, total) callbacks as a tqdm bar on a terminal; elsewhere (Slurm logs, pipes)
    as one line at most every `every` seconds, so that logs stay readable."""

    def __init__(self, desc: str, unit: str = "img", every: float = 60.0, stream=None, clock=time.monotonic):
        self.desc, self.unit, self.bar = desc, unit, None
        self.every, self.stream, self.clock = every, stream or sys.stderr, clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = None

    def __call__(self, done: int, total: int):
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=total, initial=done, desc=self.desc, unit=self.unit, dynamic_ncols=True,
                                file=self.stream)
            self.bar.update(done - self.bar.n)
            return
        now = self.clock()
        if self.start is None:  # short commands stay silent: the first line comes after `every` seconds
            self.start = self.last = now
        if now - self.last >= self.every:
            self.last = now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            print(f"{self.desc}: {done}/{total} {self.unit}{share}, elapsed {_clock(now - self.start)}",
                  file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _split_list(values) -> tuple:
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


class AliasOption(click.Option):
    """An option with older names (`aliases`) that still work but --help does not show."""

    def __init__(self, *args, aliases=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.aliases = tuple(aliases)

    def get_help_record(self, ctx):
        opts = self.opts
        self.opts = [o for o in opts if o not in self.aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


class ListOption(AliasOption):
    """A repeatable option whose values are also comma-separated lists (tests find them by this class)."""


def list_option(*names, absent=(), **kwargs):
    """A list option: `--opt a --opt b` and `--opt a,b` give the same tuple (one grammar on every command).
    `absent`: the value when the option is not given at all (None where that means "the default list")."""
    def callback(_ctx, param, values):
        if not values:
            return absent
        items = _split_list(values)
        if param.required and not items:
            raise click.BadParameter("expected at least one name")
        return items
    return click.option(*names, cls=ListOption, multiple=True, callback=callback, **kwargs)


def _parsed(parse):
    def callback(_ctx, _param, value):
        try:
            return parse(value)
        except MisbenchError as err:
            raise click.BadParameter(str(err)) from None
    return callback


def setting_option(field, default=FIELD_DEFAULT, help=None):
    """The click option of one settings field (misbench/runtime/schema.py): its flag, type, default, choices and
    help text come from the field."""
    s = spec(field)
    names = [s.flag or f"--{field.name.replace('_', '-')}", *s.aliases]
    default = default if default is not FIELD_DEFAULT else (
        s.cli_default if s.cli_default is not FIELD_DEFAULT else field.default)
    required = default is dataclasses.MISSING
    text = help if help is not None else (s.help() if callable(s.help) else s.help)
    kw = dict(help=text or None, metavar=s.metavar, aliases=s.aliases)
    kind = kinds_of(field.type)[0][0]
    kind = typing.get_origin(kind) or kind
    if kind is tuple:
        return list_option(*names, field.name, absent=default, **kw)
    if kind is bool:  # a default-True setting is switched off by its --no-... flag
        return click.option(*names, field.name, cls=AliasOption, is_flag=True, flag_value=not default,
                            default=default, **kw)
    choices = choice_list(s)
    if choices is not None:
        kw["type"] = click.Choice(choices)
    elif s.parse is not None:
        kw["callback"] = _parsed(s.parse)
    elif kind in (int, float):
        kw["type"] = kind
    if required:
        return click.option(*names, field.name, cls=AliasOption, required=True, **kw)
    return click.option(*names, field.name, cls=AliasOption, default=default,
                        show_default=default is not None and default != "", **kw)


def settings_options(*classes, skip=(), defaults=None, helps=None):
    """Every command-line field of the settings dataclasses `classes` (a field of two, once) as click options,
    less `skip`; `defaults`/`helps`: a command's own default or help text of a field."""
    defaults, helps = defaults or {}, helps or {}
    fields = {}
    for cls in classes:
        for field in settings_fields(cls, "cli"):
            if field.name not in skip:
                fields.setdefault(field.name, field)

    def decorate(func):
        for field in reversed(list(fields.values())):
            func = setting_option(field, defaults.get(field.name, FIELD_DEFAULT), helps.get(field.name))(func)
        return func
    return decorate


class StagedProgress:
    """progress(stage, done, total) callbacks (score's embed/score, a study's steps): one Progress per stage."""

    def __init__(self, units: dict | None = None, **options):
        self.units, self.options, self.bars = units or {}, options, {}

    def __call__(self, stage: str, done: int, total: int):
        if stage not in self.bars:
            self.bars[stage] = Progress(stage, self.units.get(stage.split()[0], "item"), **self.options)
        self.bars[stage](done, total)

    def close(self):
        for bar in self.bars.values():
            bar.close()
        self.bars = {}


def model_options(func):
    """MODEL argument plus the options that resolve it (DESIGN §3)."""
    func = click.option("--trust-pickle", is_flag=True, help="Allow whole-model pickles (runs code from the file).")(func)
    func = click.option("--arch-kwargs", default=None, help="JSON of extra architecture arguments for state_dicts.")(func)
    func = click.option("--num-classes", type=int, default=None, help="Classes of a plain state_dict's model.")(func)
    func = click.option("--arch", default=None, help="Architecture of a plain state_dict file.")(func)
    return func


def model_kwargs(arch, num_classes, arch_kwargs, trust_pickle) -> dict:
    """The model options as misbench.api's functions take them."""
    try:
        kwargs = json.loads(arch_kwargs) if arch_kwargs else None
    except json.JSONDecodeError as err:
        raise MisbenchError(f"--arch-kwargs is not valid JSON: {err}") from None
    return {"arch": arch, "num_classes": num_classes, "trust_pickle": trust_pickle, "arch_kwargs": kwargs}

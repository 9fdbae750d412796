"""One schema for every setting: a settings dataclass's fields, their annotations and their `setting(...)`
metadata. The command line's options (cli/common.py `settings_options`), the study config's sections and
their checks (studies/config.py) and the API's keyword checks (api.py) are all derived from it, so a new
setting is one field (plus its docs).

    tasks: int = setting(20, help="Tasks per unit.", low=1)

The annotation gives the type (`int | None`: None allowed; `tuple[str, ...]`: a list of strings); `choices`
a registry (a dict, a tuple, or a function returning one, read when checked, so later registrations count);
`low`/`high` the bounds; `check` a parser for values with a grammar of their own (`topk:K`, `auto|N`).
"""

__all__ = ["Setting", "setting", "spec", "settings_fields", "check_options", "check_value", "check_keys", "check_table",
           "validate", "section_defaults", "settings_from", "choice_list", "kinds_of", "FIELD_DEFAULT"]

import dataclasses
import math
import types
import typing
from typing import Any, Callable

from ..errors import MisbenchError, close_matches
from .fileio import option_label


FIELD_DEFAULT = object()  # Setting.cli_default: the command line's default is the field's


@dataclasses.dataclass(frozen=True)
class Setting:
    help: Any = ""                  # the --help text (or a function returning it: registries fill in late)
    flag: str = ""                  # the command line's name when not --name-with-dashes (--no-amp)
    aliases: tuple = ()             # older command-line names: still accepted, not shown by --help
    choices: Any = None             # a registry: dict or tuple of names, or a function returning one
    low: float | None = None        # inclusive bounds of numbers
    high: float | None = None
    check: Callable | None = None   # value -> None, or raises MisbenchError (a grammar of its own)
    expected: str = ""              # the wording of the expected type where the annotation's is not enough
    cli: bool = True                # a command-line option of the commands that take these settings
    config: bool = True             # a key of the study config's section
    cli_default: Any = FIELD_DEFAULT  # the command line's spelling of the default ("auto" for None)
    parse: Callable | None = None   # the command line's text -> the value (auto|N -> None or N)
    metavar: str | None = None


def setting(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **metadata) -> Any:
    """A dataclass field with its schema (Setting's fields as keywords)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"misbench": Setting(**metadata)})


def spec(field: dataclasses.Field) -> Setting:
    return field.metadata.get("misbench") or Setting()


def settings_fields(cls, where: str = "") -> list[dataclasses.Field]:
    """The fields of `cls` (where="cli" or "config": those that appear there)."""
    return [f for f in dataclasses.fields(cls) if not where or getattr(spec(f), where)]


def choice_list(setting_: Setting) -> list | None:
    choices = setting_.choices() if callable(setting_.choices) else setting_.choices
    return None if choices is None else list(choices)


def kinds_of(annotation) -> tuple[list, bool]:
    """(allowed types without None, whether None is allowed) of an annotation."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def _is(value, kind) -> bool:
    origin = typing.get_origin(kind) or kind
    if isinstance(value, bool):
        return origin is bool
    if origin in (tuple, list):
        return isinstance(value, (list, tuple))
    if origin is float:
        return isinstance(value, (int, float))
    return isinstance(value, origin)


_NAMES = {int: "an integer", float: "a number", str: "a string", tuple: "a list", list: "a list"}
_API_NAMES = {**_NAMES, bool: "True or False", dict: "a dict"}
_TOML_NAMES = {**_NAMES, bool: "true or false", dict: "a table"}


def _label(where: str, key: str) -> str:
    """`score option tasks`, `config [score] tasks`; no `where`: the option as the caller spells it."""
    return f"{where} {key}" if where else option_label(key)


def check_value(field: dataclasses.Field, value, where: str = "", toml: bool = False) -> None:
    """One value against its field: type (and list elements), choices, bounds, grammar."""
    s, key = spec(field), field.name
    kinds, optional = kinds_of(field.type)
    names = _TOML_NAMES if toml else _API_NAMES
    if value is None:
        if optional or field.default is None:
            return
    elif not any(_is(value, k) for k in kinds):
        expected = s.expected or " or ".join(names.get(typing.get_origin(k) or k, getattr(k, "__name__", str(k)))
                                             for k in kinds)
        if toml:  # the config's wording: `config [score] tasks: expected an integer, got 20.0 (float)`
            raise MisbenchError(f"{_label(where, key)}: expected {expected}, got {value!r} ({type(value).__name__})")
        none = " (or None)" if optional else ""
        raise MisbenchError(f"{_label(where, key)}={value!r}: expected {expected}{none}, got {type(value).__name__}")
    if value is None:
        raise MisbenchError(f"{_label(where, key)}: expected a value, got None")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)):
        item_kind = next((typing.get_args(k)[0] for k in kinds if typing.get_args(k)), None)
        for item in items:
            if item_kind is not None and not _is(item, item_kind):
                raise MisbenchError(f"{_label(where, key)}: every element must be {names[item_kind]}, got {item!r} "
                                    f"({type(item).__name__}) in {list(value)!r}")
        if len(set(map(repr, items))) < len(items):
            twice = next(v for i, v in enumerate(items) if v in items[:i])
            raise MisbenchError(f"{_label(where, key)}: {twice!r} is listed twice in {list(value)!r}; give each "
                                "value once")
    choices = choice_list(s)
    for item in items:
        if choices is not None and item not in choices:
            raise MisbenchError(f"{_label(where, key)}: {item!r} is not allowed; expected one of "
                                f"{', '.join(map(str, choices))}.{close_matches(str(item), list(map(str, choices)))}")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if isinstance(item, float) and not math.isfinite(item) and (s.low is not None or s.high is not None):
                raise MisbenchError(f"{_label(where, key)}: must be a finite number, got {item!r}")
            if s.low is not None and item < s.low:
                raise MisbenchError(f"{_label(where, key)}: must be at least {s.low:g}, got {item!r}")
            if s.high is not None and item > s.high:
                raise MisbenchError(f"{_label(where, key)}: must be at most {s.high:g}, got {item!r}")
    if s.check is not None:
        try:
            s.check(value)
        except MisbenchError as err:  # a message that names the key already keeps its own wording
            named = where and str(err).startswith(f"{key} ")
            raise MisbenchError(f"{where} {err}" if named else f"{_label(where, key)}: {err}") from None


def check_options(cls, options: dict, what: str, skip=()) -> None:
    """Keyword options of an API call against the fields of `cls` (less `skip`): unknown names with close
    matches, then each value. One MisbenchError, before any work."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    for key, value in options.items():
        if key not in fields:
            raise MisbenchError(f"unknown {what} option {key!r}: expected one of {', '.join(fields)}."
                                f"{close_matches(key, list(fields))}")
        check_value(fields[key], value, f"{what} option")


def check_keys(where: str, given: dict, allowed, hint: str = "") -> None:
    """The keys of a config table (`where`: `[score]`, `[executor.prune]`) against the allowed ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise MisbenchError(f"config {where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}"
                            f"{hint}")


def check_table(cls, given: dict, where: str, hint: str = "") -> None:
    """A config table against the config fields of `cls`: unknown keys, then each given value (TOML wording)."""
    fields = {f.name: f for f in settings_fields(cls, "config")}
    check_keys(where, given, fields, hint)
    for key, value in given.items():
        check_value(fields[key], value, f"config {where}", toml=True)


def validate(settings) -> None:
    """Every field of a settings object (its __post_init__ calls this): what the CLI, the API and the config
    check, also for objects made directly."""
    for field in dataclasses.fields(settings):
        check_value(field, getattr(settings, field.name))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def section_defaults(cls, **overrides) -> dict:
    """The study config section of `cls`: its config fields' defaults (tuples as TOML lists)."""
    out = {}
    for field in settings_fields(cls, "config"):
        default = (field.default if field.default is not dataclasses.MISSING else
                   field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        out[field.name] = _plain(overrides.get(field.name, default))
    return out


def settings_from(cls, values: dict, **overrides):
    """`cls` made from a config section (keys that are not its fields ignored; lists to tuples) and overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    return cls(**{**given, **overrides})

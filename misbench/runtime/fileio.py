"""Hashing and atomic writes: an output either appears whole or not at all."""

__all__ = ["read_csv_rows", "write_csv", "sha256_file", "atomic_path", "temp_dir_beside", "write_json", "write_text", "write_hdf5", "utc_now", "disk_full_error",
           "refuse_same_paths", "DiskFullError", "json_plain", "refuse_existing", "cli_wording", "config_wording",
           "option_label",
           "overwrite_hint", "flag_hint"]

import contextlib
import contextvars
import csv
import datetime as _dt
import errno
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import h5py

from ..errors import MisbenchError

log = logging.getLogger(__name__)

_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# HDF5 reports failed writes inside its message text ("errno = 28, error message = 'No space left on device'")
_FULL_TEXT = re.compile(r"errno = (%s)\b|No space left on device|File too large|Disk quota exceeded"
                        % "|".join(str(e) for e in sorted(_FULL_ERRNOS)))


class DiskFullError(MisbenchError):
    """A write failed for lack of space (or the file-size limit). After one, HDF5's library state is
    unusable, so the CLI ends the process right after printing the message."""


def disk_full_error(err: BaseException, path, advice: str) -> DiskFullError | None:
    """A one-line DiskFullError for a failed write to `path`, or None when `err` is something else."""
    if getattr(err, "errno", None) in _FULL_ERRNOS or _FULL_TEXT.search(str(err)):
        reason = os.strerror(err.errno) if getattr(err, "errno", None) in _FULL_ERRNOS else "no space left " \
            "(or the file-size limit, ulimit -f, was reached)"
        return DiskFullError(f"cannot write {path}: {reason}; {advice}")
    return None


def refuse_same_paths(inputs: dict, outputs: dict) -> None:
    """Refuse, before any work, an output that is one of the inputs or another output of the same command.

    `inputs` and `outputs` map an option name (e.g. "--out") to a path; non-path inputs (a model name) may be
    given and are ignored unless they name an existing file."""
    def same(a: Path, b: Path) -> bool:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()

    seen = []
    for name, value in inputs.items():
        if value and Path(str(value)).exists():
            seen.append((name, Path(str(value)), "input"))
    for name, value in outputs.items():
        if not value:
            continue
        path = Path(value)
        for other, other_path, kind in seen:
            if same(path, other_path):
                raise MisbenchError(f"{name} {path} is the same file as the {kind} {other} {other_path}: writing it "
                                    f"would destroy the {kind}; choose another path for {name}")
        seen.append((name, path, "output"))


# who called: error messages name `--tasks-out` / `--overwrite` for the command line, `tasks_out` /
# `overwrite=True` for Python callers (the check itself exists once, in the library), and `[extract] limit` for
# the config keys of a study's step
_CLI = contextvars.ContextVar("misbench_cli_wording", default=False)
_CONFIG_KEYS: contextvars.ContextVar[dict] = contextvars.ContextVar("misbench_config_keys", default={})


@contextlib.contextmanager
def cli_wording():
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


@contextlib.contextmanager
def config_wording(keys: dict[str, str]):
    """Inside a study's step: the parameters in `keys` are named as its config spells them (`limit` ->
    `[extract] limit`); the others as around it."""
    token = _CONFIG_KEYS.set({**_CONFIG_KEYS.get(), **keys})
    try:
        yield
    finally:
        _CONFIG_KEYS.reset(token)


def option_label(name: str) -> str:
    """A parameter's name as the caller spells it: `tasks_out` -> `--tasks-out` on the command line, `limit` ->
    `[extract] limit` in a study's extract step."""
    key = _CONFIG_KEYS.get().get(name)
    if key is not None:
        return key
    return f"--{name.replace('_', '-')}" if _CLI.get() else name


def flag_hint(name: str) -> str:
    """A boolean option as the caller sets it: `--resume` or `resume=True`."""
    return option_label(name) if _CLI.get() else f"{name}=True"


def overwrite_hint() -> str:
    return f"pass {flag_hint('overwrite')}"


def refuse_existing(outputs: dict, overwrite: bool, inputs=()) -> None:
    """Refuse, before any work, outputs that exist unless `overwrite`.

    `outputs` maps a parameter name ("out", "tasks_out") to a path, a list of paths (a folder's files) or None;
    `inputs`: paths that are also read (an output that is an input gets refuse_same_paths's precise error)."""
    if overwrite:
        return
    read = {Path(str(p)).resolve() for p in inputs if p}
    for name, value in outputs.items():
        paths = value if isinstance(value, (list, tuple)) else [value]
        for path in (Path(str(p)) for p in paths if p):
            if path.exists() and path.resolve() not in read:
                raise MisbenchError(f"{option_label(name)}: {path} already exists; {overwrite_hint()} to replace it, "
                                    "or choose another path")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def temp_dir_beside(path, kind: str):
    """A scratch directory `.<name><kind>.tmp<pid>` beside `path`, removed on exit; those of killed runs
    (SIGKILL leaves them) are removed when the next run starts, so they never pile up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path, kind)
    tmp = path.with_name(f".{path.name}{kind}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from an earlier call that failed to clean up
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        full = disk_full_error(err, path, f"{path} is unchanged: free space and rerun")
        if full is None:
            raise
        raise full from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temps(path: Path, kind: str = "") -> None:
    """Temp files (or directories) `.<name><kind>.tmp<pid>` of killed runs (their process is gone) beside
    `path`; another live writer's stay."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}{kind}.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s, left by a killed run", tmp)
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_hdf5(path, build) -> None:
    """Build an HDF5 file in memory with build(h5) and write it whole: a full disk is then an ordinary,
    clean OSError (HDF5 writing to a full disk can leave its library state broken, and crash at exit)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        build(h5)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getbuffer())


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def json_plain(obj):
    """`obj` as write_json stores it and json.load reads it back (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(obj, default=_json_default))


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_csv_rows(path) -> list[dict]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        raise MisbenchError(f"{path} does not exist") from None


def write_csv(path, rows: list[dict], columns: list[str]) -> None:
    """`rows` under `columns`, atomically (every CSV misbench writes: mis.csv and the reports' tables): floats
    to 6 significant digits, None and non-finite numbers as empty cells, a column a row lacks empty."""
    def fmt(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return ""
        return f"{v:.6g}" if isinstance(v, float) else v

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([fmt(row.get(c)) for c in columns])

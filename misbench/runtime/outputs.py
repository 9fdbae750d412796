"""The one check every writing command makes before any work: its outputs against all its inputs, and a
lock on each output so that a second writer is refused instead of sharing (and corrupting) a file."""

__all__ = ["writing", "flatten_paths", "refuse_inside_folders", "refuse_inputs_within"]

import contextlib
from pathlib import Path

from ..errors import MisbenchError
from .fileio import refuse_same_paths
from .lock import lock_outputs


def flatten_paths(mapping: dict) -> dict:
    """{name: path | [paths] | None} -> {name: path} (a folder's files get `name (file)` names)."""
    flat = {}
    for name, value in mapping.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{name} ({Path(str(p)).name})": p for p in value if p})
        elif value:
            flat[name] = value
    return flat


def refuse_inside_folders(folders: dict, outputs: dict) -> None:
    """Refuse an output inside an input folder whose files of its kind the command reads (`folders`: name ->
    (folder, suffixes), e.g. DATA and image extensions): it would replace one of them, or join them next time."""
    for name, (folder, suffixes) in folders.items():
        if not folder or not Path(str(folder)).is_dir():
            continue
        root = Path(str(folder)).resolve()
        for out_name, out in outputs.items():
            path = Path(str(out)).resolve()
            if path.suffix.lower() in suffixes and root in path.parents:
                raise MisbenchError(f"{out_name} {out} lies inside the input folder {name} {folder} and has an image's "
                                    f"extension: writing it would replace or add one of the images read; choose a "
                                    f"path outside {folder}")


def refuse_inputs_within(name: str, folder, inputs: dict) -> None:
    """Refuse an output folder that holds one of the inputs (a report replaces its whole folder: the input would go
    with it). `inputs` map a name to a path, a list option's text (`a=x.csv:layer,y.csv`) or a list of either:
    each existing path in them counts."""
    root = Path(str(folder)).resolve()
    for input_name, value in inputs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for token in (t for v in values if isinstance(v, (str, Path)) for t in str(v).split(",")):
            _, sep, after = token.partition("=")  # LABEL=path[:layer], unless the whole token is a path
            path = after if sep and after and not Path(token).exists() else token
            for candidate in (path, path.rpartition(":")[0]):
                if candidate and Path(candidate).exists() and root in Path(candidate).resolve().parents:
                    raise MisbenchError(f"{name} {folder} holds the input {input_name} {candidate}: the report "
                                        f"replaces its folder, so the input would be lost; choose a {name} folder "
                                        "that holds none of the inputs")


@contextlib.contextmanager
def writing(outputs: dict, inputs: dict | None = None, what: str = "misbench command", folders: dict | None = None):
    """Refuse an output that is one of `inputs` (give every file the command reads: sidecars such as mis.json,
    tasks.h5 and dictionaries included) or another output; then hold a lock on each output while the block
    runs, so that a second command writing one of them is refused naming this process (misbench.runtime.lock).

    `outputs`/`inputs` map an option name ("--out", "ACTS") to a path, a list of paths, or None; `folders` maps
    one to an input folder and the suffixes of the files read from it (refuse_inside_folders)."""
    outputs = flatten_paths(outputs)
    refuse_same_paths(flatten_paths(inputs or {}), outputs)
    refuse_inside_folders(folders or {}, outputs)
    with lock_outputs(outputs.values(), what):
        yield

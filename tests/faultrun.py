"""Run `misbench ARGS...` with a fault injected: the process sends itself a signal right after a named
function returns (or right when it is called) for the Nth time.

    FAULT_AT=misbench.activations.store:ActivationWriter.commit FAULT_SIGNAL=KILL FAULT_COUNT=2 python tests/faultrun.py extract ...

FAULT_AT is MODULE:QUALNAME (os:replace, pathlib:Path.unlink and misbench functions alike). The wrapper
replaces the original at its owner before the CLI imports anything else, so every module that imports the
function by name later gets the wrapped one, and modules already loaded are rebound (importing every misbench
module up front instead cost each run about 2 s). FAULT_MATCH, if set, counts only calls whose
arguments' text contains it (e.g. the checkpoint's file name for os:replace). FAULT_WHEN=before signals
on entry instead of after return. Test-only: the library has no injection point of its own.
"""

import functools
import importlib
import os
import signal
import sys


def _install(at: str, signum: int, count: int, match: str, before: bool):
    module_name, _, qualname = at.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = qualname.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = {"n": 0}

    def fire(args, kwargs):
        if match and match not in " ".join(map(str, (*args, *kwargs.values()))):
            return
        calls["n"] += 1
        if calls["n"] == count:
            sys.stderr.flush()
            os.kill(os.getpid(), signum)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        if before:
            fire(args, kwargs)
        result = original(*args, **kwargs)
        if not before:
            fire(args, kwargs)
        return result

    if isinstance(original, (staticmethod, classmethod)):
        raise SystemExit(f"faultrun: {at} is a static/class method; not supported")
    setattr(owner, name, wrapped)
    if not parents:  # module-level functions imported by name elsewhere
        for module in list(sys.modules.values()):
            for attr, value in list(vars(module).items()) if module is not None else ():
                if value is original and module is not owner:
                    setattr(module, attr, wrapped)


def main():
    at = os.environ.get("FAULT_AT")
    if at:
        signum = getattr(signal, "SIG" + os.environ.get("FAULT_SIGNAL", "KILL"))
        _install(at, signum, int(os.environ.get("FAULT_COUNT", "1")), os.environ.get("FAULT_MATCH", ""),
                 os.environ.get("FAULT_WHEN", "after") == "before")
    from misbench.cli.main import cli

    cli(sys.argv[1:], prog_name="misbench")


if __name__ == "__main__":
    main()

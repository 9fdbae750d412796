"""The one way a strategy joins a registry (backends, selections, pruning methods, architectures, model
families, reports): under a name that is not taken yet (torchvision's `register_model` refuses a duplicate
too), so that a plugin can never replace a built-in by accident."""

__all__ = ["register"]

from .errors import MisbenchError


def register(registry: dict, name: str, entry, what: str):
    """`registry[name] = entry`, refused when `name` is registered already; returns `entry`."""
    if name in registry:
        raise MisbenchError(f"{what} {name!r} is registered twice: {registry[name]!r} holds the name; "
                            "register the new one under another name")
    registry[name] = entry
    return entry

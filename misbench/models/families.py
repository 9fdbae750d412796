"""Model families named by a prefix of the architecture (`timm.NAME`): how a family's networks are built, what
an untrained one expects as input, and which weights a MODEL string may name -- looked up in one place, the way
timm resolves a model source from its name (`parse_model_name`). A new family is one module that registers itself
and one import line in misbench/models/archs.py (docs/contributing.md)."""

__all__ = ["Family", "FAMILIES", "register_family", "family_of"]

import dataclasses
from typing import Callable

from ..registry import register


@dataclasses.dataclass(frozen=True)
class Family:
    """`build(arch, num_classes, arch_kwargs)`: a randomly initialised network (`arch` with its prefix);
    `preprocess(arch)`: the Preprocess an untrained one expects. The weights policy: misbench builds a family's
    networks randomly initialised (MODEL `arch:random`) and loads trained ones from a state_dict file or a
    misbench checkpoint (--arch arch); `arch:WEIGHTS` is refused, saying `why_random` (where the family's
    pretrained weights would come from, and why misbench does not read them)."""

    name: str
    build: Callable
    preprocess: Callable
    why_random: str


FAMILIES: dict[str, Family] = {}  # prefix -> family


def register_family(prefix: str, family: Family) -> Family:
    return register(FAMILIES, prefix, family, "model family")


def family_of(arch: str) -> Family | None:
    """The family whose prefix starts `arch`, or None (torchvision and misbench's own architectures)."""
    return next((f for prefix, f in FAMILIES.items() if str(arch).startswith(prefix)), None)

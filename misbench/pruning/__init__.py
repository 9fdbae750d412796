"""Pruning: masks by method and criterion, schedules, enforcement."""

from .masks import (CRITERIA, METHODS, PruneSettings, apply_masks, compute_masks, default_exclude, prunable_layers,
                    sparsity_of)

__all__ = ["CRITERIA", "METHODS", "PruneSettings", "apply_masks", "compute_masks", "default_exclude",
           "prunable_layers", "sparsity_of"]

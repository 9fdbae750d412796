"""Pruning: masks by method and criterion, schedules, enforcement."""

from .masks import (CRITERIA, METHODS, PruneSettings, PruningMethod, apply_masks, compute_masks, default_exclude,
                    prunable_layers, register_method, sparsity_of)

__all__ = ["CRITERIA", "METHODS", "PruningMethod", "register_method", "PruneSettings", "apply_masks", "compute_masks", "default_exclude",
           "prunable_layers", "sparsity_of"]

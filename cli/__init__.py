"""The click command layer of misbench (installed as misbench.cli): parsing and printing only."""

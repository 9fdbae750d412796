"""Study configs shipped with misbench (installed as misbench.configs)."""

"""`python -m misbench` (e.g. under `torchrun -m misbench ...`)."""

from misbench.cli.main import main

main()

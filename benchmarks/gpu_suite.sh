#!/usr/bin/env bash
# The GPU suite: extraction, embeddings per backend, MIS units/s and a training step on one GPU,
# printed as a table (about 5 minutes on one H100). Record the figures in docs/performance.md.
#   bash benchmarks/gpu_suite.sh [results.json]
# Then the distributed paths on all GPUs of the node (NCCL):
#   MISBENCH_DDP=1 bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1
"$PY" benchmarks/gpu_suite.py "$@"
if [ "${MISBENCH_DDP:-0}" = 1 ]; then
  n=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
  tmp=$(mktemp -d)
  "$PY" -c "
import numpy as np, sys; sys.path.insert(0, 'benchmarks')
from _common import generated_folder; from pathlib import Path
generated_folder(Path('$tmp/images'), 4096, size=64)"
  start=$(date +%s)
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" -m misbench -q prune googlenet \
      --method connection --rate 0.5 --epochs 1 --data "$tmp/images" --batch-size 256 --workers 4 --out "$tmp/ddp.pt"
  echo "DDP retraining epoch, GoogLeNet, 4096 images, $n GPUs: $(( $(date +%s) - start )) s (incl. start-up)"
  rm -rf "$tmp"
fi

#!/usr/bin/env bash
# The GPU suite: extraction, embeddings per backend, MIS units/s and a training step on one GPU,
# printed as a table (sized for a few minutes on one H100; not yet timed there). Record the figures
# in docs/performance.md.
#   bash benchmarks/gpu_suite.sh [--json results.json]
# Then the distributed paths on all GPUs of the node (NCCL):
#   MISBENCH_DDP=1 bash benchmarks/gpu_suite.sh
# The same code at toy sizes on CPU (gloo), as the tests run it:
#   MISBENCH_DDP=1 MISBENCH_DDP_PROCS=2 MISBENCH_DDP_IMAGES=32 MISBENCH_DDP_DEVICE=cpu MISBENCH_DDP_WORKERS=0 \
#     bash benchmarks/gpu_suite.sh --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1
status=0
"$PY" benchmarks/gpu_suite.py "$@" || status=$?
if [ "${MISBENCH_DDP:-0}" = 1 ]; then
  if ! "$PY" -c 'import misbench.cli' 2>/dev/null; then
    echo "# installing misbench into $PY's environment (no dependencies, offline)"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  fi
  device=${MISBENCH_DDP_DEVICE:-cuda}
  n=${MISBENCH_DDP_PROCS:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}
  images=${MISBENCH_DDP_IMAGES:-4096}
  batch=$(( images < 256 ? images : 256 ))
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from _common import generated_folder
generated_folder(Path('$tmp/images'), $images, size=64)"
  start=$(date +%s)
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" -m misbench -q prune googlenet:random \
      --method connection --rate 0.5 --epochs 1 --data "$tmp/images" --batch-size "$batch" --workers "${MISBENCH_DDP_WORKERS:-4}" \
      --labels folder-order --device "$device" --out "$tmp/ddp.pt"
  "$PY" -m misbench -q audit --json "$tmp/ddp.pt" | "$PY" -c "import json, sys
sys.exit(0 if json.load(sys.stdin)['consistent'] else 'masks were not enforced by DDP retraining')"
  echo "DDP retraining epoch, GoogLeNet, $images images, $n processes on $device: $(( $(date +%s) - start )) s (incl. start-up)"
fi
exit $status

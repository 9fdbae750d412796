#!/usr/bin/env bash
# Everything a GPU node should verify, in one go: misbench's tests with CUDA among their devices,
# then the GPU suite with its DDP part, the scoring-scale benchmark (distance engines on the GPU)
# and the end-to-end GoogLeNet x 50,000 JPEGs figure. Logs and tables go to OUT_DIR.
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--out OUT_DIR] [--cpu]
# --cpu runs the same steps on CPU at toy sizes (a dry run of this script).
# --wheels installs missing packages offline first (see docs/installation.md, "A node without
# internet that already has PyTorch").
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="" out="gpu-check" suite=() e2e=(--images 50000 --device cuda)
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --cpu) suite=(--device cpu --quick); e2e=(--quick); shift
           export MISBENCH_DDP_PROCS=2 MISBENCH_DDP_IMAGES=32 MISBENCH_DDP_DEVICE=cpu MISBENCH_DDP_WORKERS=0 ;;
    *) echo "unknown argument $1: expected --wheels DIR, --out DIR or --cpu" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHON=$PY PYTHONUNBUFFERED=1
mkdir -p "$out"
if [ -n "$wheels" ]; then
  "$PY" -m pip install -q --no-index --no-deps "$wheels"/*.whl || exit 1
fi
"$PY" -c 'import misbench.cli' 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
{ nvidia-smi || true; "$PY" -c 'import torch, faiss; print("torch", torch.__version__, "cuda", torch.version.cuda,
"gpus", torch.cuda.device_count(), "faiss", faiss.__version__, "faiss gpus",
getattr(faiss, "get_num_gpus", lambda: 0)())'; } 2>&1 | tee "$out/environment.txt"
status=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_extract.py tests/test_similarity.py \
    tests/test_pruning.py tests/test_mis.py 2>&1 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
MISBENCH_DDP=1 bash benchmarks/gpu_suite.sh "${suite[@]}" --json "$out/suite.json" 2>&1 | tee "$out/suite.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
# the decision stage's engines on this device (torch on the GPU vs FAISS), then the end-to-end figure:
# every GoogLeNet unit over 50,000 generated JPEGs, extraction included (docs/performance.md)
"$PY" benchmarks/score_scale.py $([ "${e2e[0]}" = --quick ] && echo --quick || echo --device cuda) 2>&1 | tee "$out/score_scale.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
"$PY" benchmarks/googlenet_e2e.py "${e2e[@]}" --json "$out/e2e.json" 2>&1 | tee "$out/e2e.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED); logs in $out/"
exit $status

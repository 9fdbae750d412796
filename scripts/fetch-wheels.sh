#!/usr/bin/env bash
# The wheels a GPU node with its own PyTorch usually lacks (faiss-cpu, lpips, at the versions of
# constraints.txt), fetched on a machine with internet for the node's Python; see
# docs/installation.md, "A node without internet that already has PyTorch".
#   bash scripts/fetch-wheels.sh DIR [PYTHON_VERSION]      (default 3.12, x86-64 Linux)
set -euo pipefail
dir=${1:?usage: scripts/fetch-wheels.sh DIR [PYTHON_VERSION]}
py=${2:-3.12}
root="$(cd "$(dirname "$0")/.." && pwd)"
mapfile -t pins < <(grep -E '^(faiss-cpu|lpips)==' "$root/constraints.txt")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "${pins[@]}"
ls "$dir"

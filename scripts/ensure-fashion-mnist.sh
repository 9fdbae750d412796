#!/usr/bin/env bash
# Install Debian's dataset-fashion-mnist if it is missing (root or sudo needed); otherwise say how.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
[ -f "$dir/t10k-labels-idx1-ubyte.gz" ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "Fashion-MNIST not found at $dir and apt-get is unavailable:" >&2
  echo "  stage the idx files with: .venv/bin/misbench assets stage fashion-mnist --from DIR" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "installing Debian package dataset-fashion-mnist" >&2
$sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
  $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
}

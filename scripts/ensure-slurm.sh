#!/usr/bin/env bash
# Install Debian's Slurm (slurmctld, slurmd, slurm-client) and munge for the tests' single-node cluster
# (tests/slurm_cluster.py) where this runs as root or with sudo; otherwise say how. Nothing is started here.
set -euo pipefail
missing=()
for cmd in slurmctld slurmd sbatch munged; do
  command -v "$cmd" >/dev/null || missing+=("$cmd")
done
[ ${#missing[@]} = 0 ] && exit 0
packages="slurmctld slurmd slurm-client munge"
if ! command -v apt-get >/dev/null; then
  echo "Slurm not found (${missing[*]}) and apt-get is unavailable: the Slurm tests are skipped." >&2
  echo "  install $packages (or your distribution's equivalents) to run them" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if ! sudo -n true 2>/dev/null; then
    echo "Slurm not found (${missing[*]}) and no root: the Slurm tests are skipped; install $packages to run them" >&2
    exit 0
  fi
  sudo="sudo -n"
fi
echo "installing Debian packages $packages (the tests' single-node Slurm)" >&2
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $packages >/dev/null 2>&1 || {
  echo "could not install $packages: the Slurm tests are skipped" >&2
  exit 0
}

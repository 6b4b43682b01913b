#!/usr/bin/env bash
# Set everything up from nothing and run the test suite (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# shellcheck disable=SC1091
. "${VAEMAP_VENV:-.venv}/bin/activate"
export NIPYPE_NO_ET=1 MPLBACKEND=Agg PYTHONHASHSEED=0

# System packages for the tests that need them, from Debian (as root, with apt-get); without
# them those tests skip and say why:
#   chromium          the report tests take screenshots of the HTML reports in a real browser
#   slurm-wlm, munge  tests/cluster starts a one-node SLURM cluster on localhost and runs vaemap
#                     through the shipped SLURM plugin file
apt_updated=
apt_install() {  # apt_install WHAT PACKAGE... (apt-get's own options first, when any)
  local what=$1
  shift
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "vaemap test: not root or no apt-get: $what not installed; those tests will be skipped"
    return 0
  fi
  if [ -z "$apt_updated" ]; then
    apt-get update -qq || echo "vaemap test: apt-get update failed"
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
    || echo "vaemap test: $what could not be installed; those tests will be skipped"
}
command -v chromium >/dev/null 2>&1 || apt_install chromium chromium
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
    || ! command -v munged >/dev/null 2>&1; then
  apt_install "slurm-wlm and munge" --no-install-recommends slurm-wlm munge
fi
python -m pytest "$@"

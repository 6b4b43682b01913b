#!/usr/bin/env bash
# Set everything up from nothing and run the main job on embedded demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. "${VAEMAP_VENV:-.venv}/bin/activate"
export NIPYPE_NO_ET=1 MPLBACKEND=Agg
vaemap-demo "$@"

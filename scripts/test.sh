#!/usr/bin/env bash
# Set everything up from nothing and run the test suite (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# shellcheck disable=SC1091
. "${VAEMAP_VENV:-.venv}/bin/activate"
export NIPYPE_NO_ET=1 MPLBACKEND=Agg PYTHONHASHSEED=0
# The report tests drive a real headless browser when Debian's chromium can be installed.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "vaemap test: chromium could not be installed; browser tests will be skipped"
fi
python -m pytest "$@"

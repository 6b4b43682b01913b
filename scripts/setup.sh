#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from the pin files, from nothing.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   runtime + test tools
# The venv is .venv unless VAEMAP_VENV says otherwise. Its interpreter, CPython 3.11, is PYTHON
# when set, else found or installed by scripts/find-python.sh (PATH, then apt, then uv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VAEMAP_VENV:-.venv}
pins=requirements.txt
[ "${1:-}" = "--test" ] && pins=requirements-test.txt

if [ ! -x "$venv/bin/python" ]; then
  python=$(scripts/find-python.sh)
  echo "vaemap setup: creating $venv with $("$python" --version) ($python)"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.vaemap-installed-$(cat requirements.txt "$pins" pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "vaemap setup: installing pinned dependencies from $pins"
  python -m pip install --quiet --disable-pip-version-check -r "$pins"
  # classic dmipy cannot resolve its own metadata on numpy 2: install it alone, without deps.
  nodeps=$(sed -n 's/^# no-deps: //p' requirements.txt)
  # shellcheck disable=SC2086  # one word per package on that line: split on purpose
  [ -n "$nodeps" ] && python -m pip install --quiet --disable-pip-version-check --no-deps $nodeps
  python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
echo "vaemap setup: ready ($(python -c 'import vaemap_bids; print("vaemap", vaemap_bids.__version__)'))"

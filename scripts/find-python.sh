#!/usr/bin/env bash
# Print the path of a CPython 3.11 that can create a virtual environment with pip, installing
# one if none is found (scripts/setup.sh calls this when it creates the venv). In order:
#   1. $PYTHON, when set (it must be such a 3.11: nothing else is tried then);
#   2. python3.11, or python3 when it is 3.11, on PATH;
#   3. Debian/Ubuntu as root: apt-get install python3.11 python3.11-venv (where the release has
#      them: Debian 12, Ubuntu 22.04/23.04; Debian's ensurepip lives in the -venv package);
#   4. uv python install 3.11: uv (pinned below) from PyPI, with any pip at hand, into
#      ${VAEMAP_TOOLS:-~/.cache/vaemap}; uv downloads CPython builds from GitHub
#      (python-build-standalone), so this works only where GitHub is reachable.
# Messages go to stderr, the path to stdout; exit 1, with the reason, when every step failed.
set -euo pipefail
UV_VERSION=0.13.9

say() { echo "vaemap setup: $*" >&2; }

# a CPython 3.11 with venv and ensurepip (Debian ships ensurepip apart, in python3.11-venv)
usable() {
  "$1" -c 'import sys, venv, ensurepip
sys.exit(sys.version_info[:2] != (3, 11) or sys.implementation.name != "cpython")' >/dev/null 2>&1
}

if [ -n "${PYTHON:-}" ]; then
  if usable "$PYTHON"; then echo "$PYTHON"; exit 0; fi
  say "error: PYTHON=$PYTHON is not a CPython 3.11 with venv and ensurepip"
  exit 1
fi

for candidate in python3.11 python3; do
  found=$(command -v "$candidate" || true)
  if [ -n "$found" ] && usable "$found"; then echo "$found"; exit 0; fi
done

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "no usable Python 3.11 on PATH: installing Debian's python3.11 and python3.11-venv"
  apt-get update -qq >&2 || say "apt-get update failed"
  if apt-cache show python3.11 >/dev/null 2>&1 \
      && apt-cache show python3.11-venv >/dev/null 2>&1; then
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3.11 python3.11-venv >/dev/null && usable /usr/bin/python3.11; then
      echo /usr/bin/python3.11
      exit 0
    fi
    say "apt-get could not install python3.11 and python3.11-venv"
  else
    say "this distribution has no python3.11/python3.11-venv package"
  fi
fi

tools=${VAEMAP_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/vaemap}
uv=$(command -v uv || true)
if [ -z "$uv" ] && [ -x "$tools/uv-$UV_VERSION/bin/uv" ]; then
  uv=$tools/uv-$UV_VERSION/bin/uv
fi
if [ -z "$uv" ]; then
  # any pip will do (it need not be 3.11); --target keeps uv out of that Python's packages
  for pip_python in python3 python; do
    found=$(command -v "$pip_python" || true)
    if [ -n "$found" ] && "$found" -m pip --version >/dev/null 2>&1; then
      say "installing uv==$UV_VERSION from PyPI into $tools/uv-$UV_VERSION"
      if "$found" -m pip install --quiet --disable-pip-version-check \
          --target "$tools/uv-$UV_VERSION" "uv==$UV_VERSION" >&2; then
        uv=$tools/uv-$UV_VERSION/bin/uv
      fi
      break
    fi
  done
fi
if [ -n "$uv" ]; then
  say "fetching CPython 3.11 with uv python install"
  if log=$("$uv" python install 3.11 --no-progress 2>&1); then
    found=$("$uv" python find --managed-python 3.11 2>/dev/null || true)
    if [ -n "$found" ] && usable "$found"; then echo "$found"; exit 0; fi
  fi
  reason=$(printf '%s\n' "$log" | grep -v '^\s*$' | tail -n 1 | sed 's/^ *//')
  say "uv could not fetch CPython 3.11 (its builds come from GitHub): ${reason:-no reason given}"
else
  say "no uv on PATH and no pip to install it from PyPI"
fi
say "error: no CPython 3.11 found or installable; install it with venv support" \
    "(Debian/Ubuntu: apt-get install python3.11 python3.11-venv) or set PYTHON=/path/to/python3.11"
exit 1

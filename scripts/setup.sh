#!/usr/bin/env bash
# Set up the project environment from nothing (CPU-only Linux, Python 3.11):
#   - a virtual environment .venv in the repo (unless one is already active),
#   - the pinned CPU dependencies (requirements/cpu.txt), sglang 0.5.23 with --no-deps,
#   - this package (editable) and its CPU stand-ins for sgl_kernel/torchvision (a .pth file),
#   - the tiny test models (random weights + offline tokenizer).
# Idempotent: a stamp of the inputs skips the install when nothing changed.
# Source it to get $PY (the environment's python); run it to just set up.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  VENV="$VIRTUAL_ENV"
else
  VENV="$ROOT/.venv"
fi
PY="$VENV/bin/python"
PYTHON_BOOT="${PYTHON:-python3}"

stamp_inputs() {
  cat requirements/cpu.txt requirements/sglang.txt pyproject.toml
  "$PYTHON_BOOT" --version 2>&1
}
STAMP="$VENV/.tokendance-setup-$(stamp_inputs | sha256sum | cut -c1-16)"

if [[ ! -x "$PY" ]]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON_BOOT" -m venv "$VENV"
fi

if [[ ! -f "$STAMP" ]]; then
  echo "[setup] installing pinned CPU dependencies (first run: ~2 minutes, ~2.7 GB)"
  t0=$(date +%s)
  # pip's "Location ... is ignored" warnings about local indexes are noise on these machines.
  "$PY" -m pip install -q --disable-pip-version-check -r requirements/cpu.txt 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -r requirements/sglang.txt 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 \
    | grep -v "^WARNING: Location" || true
  # The CPU stand-ins must be in place before anything imports sglang (it imports
  # torchvision, whose meta registrations need the nms schemas the stand-ins provide).
  "$PY" -m sglang_tokendance.cpu.install >/dev/null
  "$PY" -c "import torch, sglang, transformers; assert torch.__version__.startswith('2.13.0')" \
    || { echo "[setup] dependency check failed" >&2; exit 1; }
  rm -f "$VENV"/.tokendance-setup-*
  touch "$STAMP"
  echo "[setup] dependencies installed in $(( $(date +%s) - t0 ))s"
fi

# Cheap and idempotent: the CPU stand-ins (.pth) and the tiny models (cached by content hash).
"$PY" -m sglang_tokendance.cpu.install >/dev/null
for arch in llama qwen2; do
  "$PY" -m sglang_tokendance.models build tiny --arch "$arch" >/dev/null 2>&1 \
    || "$PY" -m sglang_tokendance.models build tiny --arch "$arch"
done
export PY

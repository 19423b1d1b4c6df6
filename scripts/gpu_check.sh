#!/usr/bin/env bash
# GPU check of the position-tagged Triton kernels (benchmarks/kernels.py): correctness against
# the torch reference at 7B-like sizes (64 rows of 4k tokens, every row laid out with 90% of its
# keys reused at shifted positions, 32/8 heads, head_dim 128, bf16) and the cost of the fused
# delta rotation (the same kernels with the rotation compiled out). Needs python with CUDA torch + triton; SGLang
# is not needed. Finishes in a few minutes; prints a short table last; JSON goes to
# $OUT/kernels.json when OUT is set (the device runner's folder), else runs/gpu_check/.
# Without CUDA it prints a skip note and exits 0. Extra arguments go to benchmarks/kernels.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-runs/gpu_check}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to $PY: skipped (CPU tests cover the kernels in the"
    echo "Triton interpreter: pytest tests/test_attention_triton.py)"
    exit 0
fi
"$PY" -c "import triton; print('triton', triton.__version__)"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
mkdir -p "$OUT_DIR"
timeout 290 "$PY" benchmarks/kernels.py --out "$OUT_DIR/kernels.json" --batch 64 --seq 4096 \
    --reused 0.9 --all-laid-out --dtypes bf16 --repeats 10 "$@"

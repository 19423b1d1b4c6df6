#!/usr/bin/env bash
# Trained-model KV per agent, society-shaped 64 x 4 trimmed to the model's 4,096-token context,
# under threshold mirror policies between 0.5 and 1.0 (the trace and flags of the 12-03 run,
# benchmarks/results/2026-12-03-cpu-2core-issue14-d/kv64-trained/run.sh), beside mode off.
# Run from anywhere; writes runs/kv64-eps/ in the repo root. Usage: run-eps.sh [EPS...]
set -euo pipefail
cd "$(dirname "$0")/../../../.."
source .venv/bin/activate
mkdir -p runs
EPS=("$@")
[ ${#EPS[@]} -gt 0 ] || EPS=(0.6 0.75)
python -m sglang_tokendance.trace generate society --agents 64 --rounds 4 --seed 0 \
  --private-words 70 --shared-words 11 -o runs/society_n64_trim.jsonl
OUT=runs/kv64-eps
mkdir -p $OUT
M=sglang_tokendance/models/trained
ARGS="--max-total-tokens 300000 --max-running-requests 64"
for eps in "${EPS[@]}"; do
  python -m sglang_tokendance.replay runs/society_n64_trim.jsonl --mode tokendance --model $M \
    --server-args "$ARGS --tokendance-mirror threshold --tokendance-mirror-eps $eps --tokendance-mirror-scale token" \
    --no-progress --server-log $OUT/tokendance-eps$eps.log \
    --report $OUT/tokendance-eps$eps.json > $OUT/tokendance-eps$eps.txt
done
if [ -z "${SKIP_OFF:-}" ]; then
  python -m sglang_tokendance.replay runs/society_n64_trim.jsonl --mode off --model $M \
    --server-args "$ARGS" --no-progress --server-log $OUT/off.log --report $OUT/off.json \
    > $OUT/off.txt
fi

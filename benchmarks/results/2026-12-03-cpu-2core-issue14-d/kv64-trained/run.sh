#!/usr/bin/env bash
# Trained-model KV per agent, society-shaped 64 x 4 trimmed to the model's 4,096-token context.
# Run from anywhere; writes runs/kv64-trained/ in the repo root.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
source .venv/bin/activate
python -m sglang_tokendance.trace generate society --agents 64 --rounds 4 --seed 0 \
  --private-words 70 --shared-words 11 -o runs/society_n64_trim.jsonl
OUT=runs/kv64-trained
mkdir -p $OUT
M=sglang_tokendance/models/trained
for mode in off tokendance; do
  python -m sglang_tokendance.replay runs/society_n64_trim.jsonl --mode $mode --model $M \
    --server-args "--max-total-tokens 300000 --max-running-requests 64" --no-progress \
    --server-log $OUT/$mode.log --report $OUT/$mode.json > $OUT/$mode.txt
done

#!/usr/bin/env bash
# Trained-model KV per agent, society-shaped 64 x 4 trimmed to the model's 4,096-token context
# (the trace and flags of benchmarks/results/2026-12-06-cpu-2core-issue14-g/kv64-trained/), under
# threshold mirror policies given as SCALE:EPS (--tokendance-mirror-scale, --tokendance-mirror-eps).
# Run from anywhere; writes runs/kv64-scale/ in the repo root. Usage: run.sh token:0.5 layer:0.6
# (OFF=1 also replays mode off).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
source .venv/bin/activate
mkdir -p runs
python -m sglang_tokendance.trace generate society --agents 64 --rounds 4 --seed 0 \
  --private-words 70 --shared-words 11 -o runs/society_n64_trim.jsonl
OUT=runs/kv64-scale
mkdir -p $OUT
M=sglang_tokendance/models/trained
ARGS="--max-total-tokens 300000 --max-running-requests 64"
for spec in "$@"; do
  scale=${spec%%:*}
  eps=${spec#*:}
  name=tokendance-$scale-eps$eps
  python -m sglang_tokendance.replay runs/society_n64_trim.jsonl --mode tokendance --model $M \
    --server-args "$ARGS --tokendance-mirror threshold --tokendance-mirror-eps $eps \
      --tokendance-mirror-scale $scale" \
    --no-progress --server-log $OUT/$name.log --report $OUT/$name.json > $OUT/$name.txt
done
if [ -n "${OFF:-}" ]; then
  python -m sglang_tokendance.replay runs/society_n64_trim.jsonl --mode off --model $M \
    --server-args "$ARGS" --no-progress --server-log $OUT/off.log --report $OUT/off.json \
    > $OUT/off.txt
fi

#!/usr/bin/env bash
# The same trained-model 64 x 4 replay under other mirror policies (run run.sh first: it makes
# the trace). Writes runs/kv64-trained/tokendance-<policy>.json.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
source .venv/bin/activate
OUT=runs/kv64-trained
M=sglang_tokendance/models/trained
for pol in "threshold 1.0" "drop 0"; do
  set -- $pol
  name=$1-$2
  python -m sglang_tokendance.replay runs/society_n64_trim.jsonl --mode tokendance --model $M \
    --server-args "--max-total-tokens 300000 --max-running-requests 64 \
    --tokendance-mirror $1 --tokendance-mirror-eps $2 --tokendance-mirror-scale token" --no-progress \
    --server-log $OUT/tokendance-$name.log --report $OUT/tokendance-$name.json \
    > $OUT/tokendance-$name.txt
done

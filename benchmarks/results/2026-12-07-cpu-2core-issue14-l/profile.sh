#!/usr/bin/env bash
# Sample the tokendance server's scheduler (py-spy, 50 Hz) while round_latency replays the
# 32-agent capacity probe (society32-capacity, tokendance only), then summarize the samples.
# py-spy is a diagnostic, not a project dependency: installed into a scratch folder.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
OUT=${OUT:-$HERE/profile-s32}
SPY=${SPY:-/tmp/td-pyspy}
mkdir -p "$OUT"
[ -x "$SPY/bin/py-spy" ] || "$ROOT/.venv/bin/pip" install -q --target "$SPY" py-spy
cd "$ROOT"
.venv/bin/python benchmarks/round_latency.py --cases society32-capacity --modes tokendance \
    --repeats "${REPEATS:-12}" --out "$OUT/rl" > "$OUT/rl.log" 2>&1 &
BENCH=$!
for _ in $(seq 1 100); do grep -q "up in" "$OUT/rl.log" 2>/dev/null && break; sleep 2; done
sleep 8  # past the warm-up replay
PID=$(pgrep -f "sglang::scheduler" | head -1)
PYTHONPATH="$SPY" "$SPY/bin/py-spy" record -p "$PID" -d "${SECONDS_SAMPLED:-40}" -r 50 \
    -f raw -o "$OUT/sched.txt" --nonblocking || true
wait "$BENCH"
gzip -9f "$OUT/sched.txt"
.venv/bin/python "$HERE/summarize_profile.py" "$OUT/sched.txt.gz" > "$OUT/profile.txt"
head -40 "$OUT/profile.txt"

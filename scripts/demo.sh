#!/usr/bin/env bash
# TokenDance demo on CPU: generate a small GenerativeAgents trace, replay it against an embedded
# SGLang server in mode off (stock prefix caching) and in mode tokendance, compare the reports.
#   scripts/demo.sh                      # 6 agents x 3 rounds, tiny model, reports under runs/
# Environment: DEMO_AGENTS, DEMO_ROUNDS, DEMO_MAX_TOKENS, DEMO_MODEL (tiny|small|DIR),
#              DEMO_OUT (output directory), DEMO_CLOSED_LOOP=1 (feed outputs forward).
# Each replay starts its own server and always stops it (also on errors and Ctrl-C).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"

AGENTS="${DEMO_AGENTS:-6}"
ROUNDS="${DEMO_ROUNDS:-3}"
MAX_TOKENS="${DEMO_MAX_TOKENS:-16}"
MODEL="${DEMO_MODEL:-tiny}"
OUT="${DEMO_OUT:-$ROOT/runs/demo-$(date +%Y%m%d-%H%M%S)}"
LOOP=()
[[ "${DEMO_CLOSED_LOOP:-0}" == "1" ]] && LOOP=(--closed-loop)
mkdir -p "$OUT"

echo "== trace: generative_agents, $AGENTS agents x $ROUNDS rounds (seed 0) -> $OUT"
"$PY" -m sglang_tokendance.trace generate generative_agents --agents "$AGENTS" \
  --rounds "$ROUNDS" --seed 0 --max-tokens "$MAX_TOKENS" -o "$OUT/trace.jsonl"

for mode in off tokendance; do
  echo
  echo "== replay, mode $mode (embedded CPU server, model $MODEL)"
  "$PY" -m sglang_tokendance.replay "$OUT/trace.jsonl" --mode "$mode" --model "$MODEL" \
    ${LOOP[@]+"${LOOP[@]}"} --report "$OUT/$mode.json" --server-log "$OUT/server-$mode.log"
done

echo
echo "== off vs tokendance"
"$PY" -m sglang_tokendance.replay compare "$OUT/off.json" "$OUT/tokendance.json"
echo
echo "reports, trace and server logs: $OUT"

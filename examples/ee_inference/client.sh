#!/usr/bin/env bash
# Query a running server (examples/ee_inference/server.sh) through both endpoints.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
URL=${URL:-http://127.0.0.1:${PORT:-5000}}
echo "== Megatron-compatible PUT /api, early exit at threshold 0.8, per-token exit layers"
"$PY" tools/request_client.py --url "$URL" --api megatron --prompt "ROMEO:" --max-tokens 24 \
  --early-exit --threshold 0.8 --print-exits
echo "== OpenAI-compatible POST /v1/completions, streamed"
"$PY" tools/request_client.py --url "$URL" --api openai --prompt "JULIET:" --max-tokens 24 \
  --mode early_exit --threshold 0.8 --stream
echo "== the same with curl"
curl -s "$URL/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "KING:", "max_tokens": 16, "temperature": 0, "early_exit": {"mode": "early_exit", "threshold": 0.8}}'
echo
curl -s "$URL/metrics" | grep -E '^ee_(requests|generated_tokens|mean_exit)' || true

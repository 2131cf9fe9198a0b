#!/usr/bin/env bash
# Start the built binary on the default models and check /health and one completion.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-.appliance-data/test}
port=${PORT:-18080}
dist/appliance/appliance serve --data-dir "$data" --port "$port" > build/smoke.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
start=$(date +%s.%N)
for _ in $(seq 1 600); do
  if curl -fs "http://127.0.0.1:$port/health" > /dev/null; then break; fi
  sleep 0.1
done
echo "healthy after $(echo "$(date +%s.%N) - $start" | bc) s"
curl -fs "http://127.0.0.1:$port/health"; echo
curl -fs "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "gemma3-270m", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}'; echo

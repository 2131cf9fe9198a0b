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
healthy=no
for _ in $(seq 1 600); do
  if curl -fs "http://127.0.0.1:$port/health" > /dev/null; then healthy=yes; break; fi
  if ! kill -0 "$pid" 2>/dev/null; then break; fi
  sleep 0.1
done
if [ "$healthy" != yes ]; then
  echo "smoke: the binary did not become healthy; see build/smoke.log" >&2
  exit 1
fi
echo "healthy after $(echo "$(date +%s.%N) - $start" | bc) s"
curl -fs "http://127.0.0.1:$port/health"; echo
curl -fs "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "gemma3-270m", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}'; echo
# Document search: a collection, a file, a query (tantivy, usearch and the parsers inside the bundle).
curl -fs -X DELETE "http://127.0.0.1:$port/v1/collections/smoke" > /dev/null || true
curl -fs "http://127.0.0.1:$port/v1/collections" -H 'content-type: application/json' -d '{"name": "smoke"}' > /dev/null
curl -fs "http://127.0.0.1:$port/v1/collections/smoke/documents" -F "files=@README.md" | head -c 200; echo
curl -fs "http://127.0.0.1:$port/v1/collections/smoke/search" -H 'content-type: application/json' \
  -d '{"query": "prefix cache", "top_k": 1}' | head -c 300; echo
curl -fs "http://127.0.0.1:$port/" | grep -c "Document Q&amp;A"
# The gateway inside the bundle: metrics, guardrails (phonenumbers, python-stdnum) and the usage chain.
curl -fs "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "gemma3-270m", "prompt": "Mail jane@example.com or call +44 20 7946 0958", "max_tokens": 2}' \
  | grep -o '"guardrails":\[[^]]*\]'
# Named-entity PII inside the bundle (Presidio, spaCy and its English pipeline's data): flagged by default.
curl -fs "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "gemma3-270m", "prompt": "Write to Margaret Okafor at 221B Baker Street, London NW1 6XE", "max_tokens": 2}' \
  | grep -o '"kind":"person"[^}]*}'
curl -fs "http://127.0.0.1:$port/metrics" | grep -m1 '^appliance_requests_total'
dist/appliance/appliance --data-dir "$data" usage verify


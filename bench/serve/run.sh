#!/usr/bin/env bash
# Load test of `zrag serve` on loopback with `hey` (apt-get install hey): /v1/search in three
# modes and /v1/ask at several concurrency levels. COLLECTION defaults to the indexed
# reverse-dictionary corpus (see BENCHMARKS.md); results in bench/serve/results.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
COLLECTION="${COLLECTION:-bench-out/revdict.zrag}"
command -v hey >/dev/null || { echo "install hey: apt-get install hey" >&2; exit 1; }
cargo build --release -p zrag-cli
PORT="${PORT:-18080}"
./target/release/zrag --collection "$COLLECTION" serve --addr "127.0.0.1:$PORT" \
  --max-concurrent-searches 64 --max-concurrent-generations 2 ${SERVE_ARGS:-} &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.5; done
python3 bench/serve/loadtest.py --base "http://127.0.0.1:$PORT" --out bench/serve/results.json "$@"

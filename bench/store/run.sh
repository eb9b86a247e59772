#!/usr/bin/env bash
# The PostgreSQL + pgvector store against the embedded one (issue 7), in one run:
#   1. bench_store: ingest throughput (100k synthetic 384-d chunks, commits of 2000) and
#      exact / HNSW / BM25 queries per second on both stores;
#   2. `zrag copy` of the real reverse-dictionary collection (bench-out/revdict.zrag,
#      131k chunks) into PostgreSQL: ingest throughput on real data, no encoding;
#   3. one vs two `zrag serve` processes over that database under `hey` (/v1/search, dense).
# Needs the database from `bash scripts/pg.sh start` and Debian's `hey`. Results land in
# bench/store/results.jsonl; BENCHMARKS.md quotes them.
#
#   bash bench/store/run.sh [CHUNKS]
set -euo pipefail
cd "$(dirname "$0")/../.."
CHUNKS=${1:-100000}
OUT=bench/store/results.jsonl
SECONDS_PER_RUN=${SECONDS_PER_RUN:-15}
bash scripts/pg.sh start
eval "$(bash scripts/pg.sh env)"
command -v hey >/dev/null || apt-get install -y -q hey >/dev/null
cargo build --release -p zrag-cli
cargo build --release -p zrag-index --example bench_store
psql "$ZRAG_TEST_POSTGRES" -qc "DROP SCHEMA IF EXISTS bench_store CASCADE; DROP SCHEMA IF EXISTS bench_revdict CASCADE" 2>/dev/null
: >"$OUT"
note() { echo "{\"note\": \"$1\", \"loadavg\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >>"$OUT"; }

note "bench_store $CHUNKS"
target/release/examples/bench_store --pg "$ZRAG_TEST_POSTGRES?schema=bench_store" \
  --chunks "$CHUNKS" --dir target/bench-store | tee -a "$OUT"

if [ -d bench-out/revdict.zrag ]; then
  note "zrag copy revdict"
  target/release/zrag --json --collection bench-out/revdict.zrag copy \
    --to "$ZRAG_TEST_POSTGRES?schema=bench_revdict" | python3 -c 'import json,sys; d=json.load(sys.stdin); d["measure"]="copy_revdict"; print(json.dumps(d))' | tee -a "$OUT"

  STORE="$ZRAG_TEST_POSTGRES?schema=bench_revdict"
  serve() {
    target/release/zrag --store "$STORE" serve --addr "127.0.0.1:$1" --no-generator \
      --max-concurrent-searches 64 >/dev/null 2>&1 &
    echo $!
  }
  wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/healthz" >/dev/null && return; sleep 0.5; done; exit 1; }
  BODY='{"query": "a small furry animal that lives in burrows", "k": 10}'
  hey_qps() {  # port concurrency -> requests/s
    hey -z "${SECONDS_PER_RUN}s" -c "$2" -m POST -T application/json -d "$BODY" \
      "http://127.0.0.1:$1/v1/search" | awk '/Requests\/sec/ {print $2}'
  }
  A=$(serve 18181); B=$(serve 18182)
  trap 'kill $A $B 2>/dev/null || true' EXIT
  wait_up 18181; wait_up 18182
  hey -n 50 -c 2 -m POST -T application/json -d "$BODY" http://127.0.0.1:18181/v1/search >/dev/null
  hey -n 50 -c 2 -m POST -T application/json -d "$BODY" http://127.0.0.1:18182/v1/search >/dev/null
  for c in 1 4 16; do
    one=$(hey_qps 18181 "$c")
    half=$(( (c + 1) / 2 ))
    hey_qps 18181 "$half" >/tmp/zrag-hey-a & pa=$!
    hey_qps 18182 "$half" >/tmp/zrag-hey-b & pb=$!
    wait $pa $pb
    two=$(python3 -c "print(float(open('/tmp/zrag-hey-a').read()) + float(open('/tmp/zrag-hey-b').read()))")
    echo "{\"measure\": \"serve_scaling\", \"concurrency\": $c, \"one_server_qps\": $one, \"two_servers_qps\": $two, \"loadavg\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}" | tee -a "$OUT"
  done
  # BM25 and hybrid over the real corpus, one server.
  for mode in bm25 hybrid; do
    BODY="{\"query\": \"a small furry animal that lives in burrows\", \"k\": 10, \"mode\": \"$mode\"}"
    echo "{\"measure\": \"serve_$mode\", \"concurrency\": 2, \"one_server_qps\": $(hey_qps 18181 2)}" | tee -a "$OUT"
  done
fi

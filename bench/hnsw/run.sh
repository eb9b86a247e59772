#!/usr/bin/env bash
# HNSW side by side, in one run: zrag vs hnswlib 0.8.0 vs faiss-cpu IndexHNSWFlat (vs PostgreSQL 15 +
# pgvector 0.8.0 on request, ENGINES=pgvector) on N x 384 MiniLM (+ synthetic) vectors, M = 16,
# efConstruction = 100, build on 2 threads, search on 1 thread one query at a time; recall@10 vs
# queries/s per ef, build time, index size. See README.md here.
#
#   bash bench/hnsw/run.sh [N]            N base vectors, default 1000000
#
# Environment (all optional):
#   ENGINES="hnswlib faiss zrag"   engines to run, one after another (each alone on the machine);
#                                  the saved results of engines not run this time are kept;
#                                  also: pgvector (PostgreSQL + pgvector HNSW through SQL, README.md)
#   DATA=DIR                       data and results; default bench-out/hnsw1m for N = 1000000,
#                                  bench-out/hnsw1m/n$N otherwise
#   Q=1000 M=16 EFC=100 BUILD_THREADS=2 SEARCH_THREADS=1 EF=10,16,24,32,48,64,96,128,192,256
#   MODE=batch|loop                how the Python engines hand over queries (README.md)
#   ENGINE_ARGS="--rounds 2 --min-seconds 1"  more arguments for every engine
#   PREPARE_ARGS="--max-real 20000"            more arguments for prepare.py
#   MAX_LOAD=1.0                   before each engine wait (up to WAIT_MAX=1800 s) until the 1-minute
#                                  load average is below this; unset: only report it
#   PY_HNSWLIB=/work/venv-llama/bin/python   python with hnswlib 0.8.0 + numpy
#   PY_FAISS=python3                         python with faiss-cpu + numpy (also runs prepare.py)
#   PY_PG=python3                            python with psycopg 3 + pgvector (the Python client)
#   PG_DIR=target/pg-bench PG_PORT=55440     pgvector: the benchmark's own PostgreSQL instance
#                                  (scripts/pg.sh with ZRAG_PG_DIR/ZRAG_PG_PORT; not the test server
#                                  on 55432), started before the engine and stopped after it
#                                  unless PG_KEEP=1
#   PG_SHARED_BUFFERS=6GB PG_MAINTENANCE_WORK_MEM=8GB   pgvector: the index and the table fit in
#                                  shared_buffers, the whole graph in maintenance_work_mem
#   PLOT_DIR=DIR                   where the SVGs go; default bench/hnsw for N = 1000000, else DATA
set -euo pipefail
cd "$(dirname "$0")/../.."

N=${1:-1000000}
Q=${Q:-1000}
M=${M:-16}
EFC=${EFC:-100}
BUILD_THREADS=${BUILD_THREADS:-2}
SEARCH_THREADS=${SEARCH_THREADS:-1}
EF=${EF:-10,16,24,32,48,64,96,128,192,256}
MODE=${MODE:-batch}
ENGINES=${ENGINES:-hnswlib faiss zrag}
ENGINE_ARGS=${ENGINE_ARGS:-}
PREPARE_ARGS=${PREPARE_ARGS:-}
PY_HNSWLIB=${PY_HNSWLIB:-/work/venv-llama/bin/python}
PY_FAISS=${PY_FAISS:-python3}
PY_PG=${PY_PG:-$PY_FAISS}
PG_DIR=${PG_DIR:-$PWD/target/pg-bench}
PG_PORT=${PG_PORT:-55440}
PG_SHARED_BUFFERS=${PG_SHARED_BUFFERS:-6GB}
PG_MAINTENANCE_WORK_MEM=${PG_MAINTENANCE_WORK_MEM:-8GB}
if [ "$N" = 1000000 ]; then
    DATA=${DATA:-bench-out/hnsw1m}
    PLOT_DIR=${PLOT_DIR:-bench/hnsw}
else
    DATA=${DATA:-bench-out/hnsw1m/n$N}
    PLOT_DIR=${PLOT_DIR:-$DATA}
fi
mkdir -p "$DATA" "$PLOT_DIR"
LOG="$DATA/run.log"
say() { echo "[$(date '+%F %T')] $*" | tee -a "$LOG" >&2; }

# ---- python environments (hnswlib in a venv, faiss in the system python)
if ! "$PY_HNSWLIB" -c 'import hnswlib, numpy' 2>/dev/null; then
    [ -x "$PY_HNSWLIB" ] || { python3 -m venv "$(dirname "$(dirname "$PY_HNSWLIB")")"; }
    "$PY_HNSWLIB" -m pip install --quiet hnswlib==0.8.0 numpy
fi
if ! "$PY_FAISS" -c 'import faiss, numpy' 2>/dev/null; then
    "$PY_FAISS" -m pip install --quiet faiss-cpu numpy || {
        say "no faiss-cpu for $PY_FAISS: install it (pip install faiss-cpu numpy) or set PY_FAISS"; exit 1; }
fi

case " $ENGINES " in
    *" pgvector "*)
        if ! "$PY_PG" -c 'import psycopg, pgvector.psycopg, numpy' 2>/dev/null; then
            "$PY_PG" -m pip install --quiet 'psycopg[binary]==3.3.9' pgvector==0.5.1 numpy
        fi ;;
esac

# ---- the benchmark's own PostgreSQL (pgvector engine): scripts/pg.sh on PG_DIR:PG_PORT
pg() { ZRAG_PG_DIR="$PG_DIR" ZRAG_PG_PORT="$PG_PORT" bash scripts/pg.sh "$@"; }
PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/zrag_test"
pg_start() {
    pg start
    local psql=(/usr/lib/postgresql/15/bin/psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d zrag_test -qtA)
    if [ "$("${psql[@]}" -c 'SHOW shared_buffers')" != "$PG_SHARED_BUFFERS" ]; then
        "${psql[@]}" -c "ALTER SYSTEM SET shared_buffers = '$PG_SHARED_BUFFERS'"
        pg restart
    fi
    say "pgvector: PostgreSQL on $PG_URL ($PG_DIR), shared_buffers $("${psql[@]}" -c 'SHOW shared_buffers')"
}

# ---- data (prepare.py skips the work when meta.json matches)
if [ ! -x target/release/zrag ]; then
    say "building the zrag binary for the query embeddings"
    cargo build --release --quiet -p zrag-cli || say "zrag build failed: prepare.py falls back to held-out rows as queries"
fi
say "data: $DATA (N=$N, Q=$Q)"
# shellcheck disable=SC2086
"$PY_FAISS" bench/hnsw/prepare.py --n "$N" --q "$Q" --out "$DATA" $PREPARE_ARGS 2>&1 | tee -a "$LOG" >&2

# ---- the committed 1M results (bench/hnsw/results-1m.jsonl) stand in for an engine that has
# no saved result here yet (a fresh machine), so that running one engine keeps the others
if [ "$N" = 1000000 ] && [ -f bench/hnsw/results-1m.jsonl ]; then
    for engine in hnswlib faiss zrag pgvector; do
        if [ ! -f "$DATA/results.$engine.jsonl" ] && grep -q "\"engine\": \"$engine\"" bench/hnsw/results-1m.jsonl; then
            grep "\"engine\": \"$engine\"" bench/hnsw/results-1m.jsonl > "$DATA/results.$engine.jsonl"
            say "$engine: no saved result in $DATA, starting from bench/hnsw/results-1m.jsonl"
        fi
    done
fi

# ---- engines, one after another
wait_idle() {
    local load waited=0
    load=$(cut -d' ' -f1 /proc/loadavg)
    if [ -n "${MAX_LOAD:-}" ]; then
        while awk -v l="$load" -v m="$MAX_LOAD" 'BEGIN { exit !(l >= m) }' && [ "$waited" -lt "${WAIT_MAX:-1800}" ]; do
            if [ $((waited % 300)) = 0 ]; then say "load $load >= $MAX_LOAD, waiting"; fi
            sleep 30; waited=$((waited + 30)); load=$(cut -d' ' -f1 /proc/loadavg)
        done
    fi
    say "load average before $1: $(cat /proc/loadavg)"
}

COMMON=(--base "$DATA/base.f32" --queries "$DATA/queries.f32" --truth "$DATA/truth.i32" --dim 384
        --m "$M" --ef-construction "$EFC" --build-threads "$BUILD_THREADS" --search-threads "$SEARCH_THREADS"
        --ef "$EF")
for engine in $ENGINES; do
    case $engine in
        hnswlib) cmd=("$PY_HNSWLIB" bench/hnsw/hnswlib_bench.py "${COMMON[@]}" --mode "$MODE") ;;
        faiss) cmd=("$PY_FAISS" bench/hnsw/faiss_hnsw_bench.py "${COMMON[@]}" --mode "$MODE") ;;
        zrag)
            if ! cargo build --release --quiet -p zrag-index --example bench_hnsw; then
                say "zrag: cargo build of the bench_hnsw example failed, skipped"; continue
            fi
            cmd=(target/release/examples/bench_hnsw "${COMMON[@]}") ;;
        pgvector)
            pg_start
            cmd=("$PY_PG" bench/hnsw/pgvector_bench.py --url "$PG_URL"
                 --maintenance-work-mem "$PG_MAINTENANCE_WORK_MEM" "${COMMON[@]}") ;;
        *) say "unknown engine $engine (hnswlib, faiss, zrag, pgvector)"; exit 1 ;;
    esac
    # shellcheck disable=SC2206
    cmd+=($ENGINE_ARGS)
    wait_idle "$engine"
    say "run: ${cmd[*]}"
    out="$DATA/results.$engine.jsonl"
    if "${cmd[@]}" > "$out.tmp" 2> >(tee -a "$LOG" >&2); then
        mv "$out.tmp" "$out"
        say "$engine done: $(grep -c '"search"' "$out") search points; load average $(cat /proc/loadavg)"
    else
        say "$engine FAILED (exit $?), its previous results (if any) are kept"; rm -f "$out.tmp"
    fi
    if [ "$engine" = pgvector ] && [ "${PG_KEEP:-0}" != 1 ]; then pg stop; say "pgvector: PostgreSQL stopped"; fi
done

# ---- all engines' lines in one file, then plots and tables
: > "$DATA/results.jsonl"
for engine in hnswlib faiss zrag pgvector; do
    if [ -f "$DATA/results.$engine.jsonl" ]; then cat "$DATA/results.$engine.jsonl" >> "$DATA/results.jsonl"; fi
done
[ -s "$DATA/results.jsonl" ] || { say "no results"; exit 1; }
"$PY_FAISS" bench/hnsw/plot.py "$DATA/results.jsonl" --meta "$DATA/meta.json" \
    --svg "$PLOT_DIR/recall_qps.svg" --nines-svg "$PLOT_DIR/recall_qps_nines.svg" \
    --build-svg "$PLOT_DIR/build.svg" --md "$DATA/summary.md"
say "wrote $DATA/results.jsonl, $DATA/summary.md, $PLOT_DIR/recall_qps.svg, recall_qps_nines.svg, build.svg"

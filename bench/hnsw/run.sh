#!/usr/bin/env bash
# HNSW side by side, in one run: zrag vs hnswlib 0.8.0 vs faiss-cpu IndexHNSWFlat on N x 384
# MiniLM (+ synthetic) vectors, M = 16, efConstruction = 100, build on 2 threads, search on 1 thread
# one query at a time; recall@10 vs queries/s per ef, build time, index size. See README.md here.
#
#   bash bench/hnsw/run.sh [N]            N base vectors, default 1000000
#
# Environment (all optional):
#   ENGINES="hnswlib faiss zrag"   engines to run, one after another (each alone on the machine);
#                                  the saved results of engines not run this time are kept
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

# ---- data (prepare.py skips the work when meta.json matches)
if [ ! -x target/release/zrag ]; then
    say "building the zrag binary for the query embeddings"
    cargo build --release --quiet -p zrag-cli || say "zrag build failed: prepare.py falls back to held-out rows as queries"
fi
say "data: $DATA (N=$N, Q=$Q)"
# shellcheck disable=SC2086
"$PY_FAISS" bench/hnsw/prepare.py --n "$N" --q "$Q" --out "$DATA" $PREPARE_ARGS 2>&1 | tee -a "$LOG" >&2

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
        *) say "unknown engine $engine (hnswlib, faiss, zrag)"; exit 1 ;;
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
done

# ---- all engines' lines in one file, then plots and tables
: > "$DATA/results.jsonl"
for engine in hnswlib faiss zrag; do
    if [ -f "$DATA/results.$engine.jsonl" ]; then cat "$DATA/results.$engine.jsonl" >> "$DATA/results.jsonl"; fi
done
[ -s "$DATA/results.jsonl" ] || { say "no results"; exit 1; }
"$PY_FAISS" bench/hnsw/plot.py "$DATA/results.jsonl" --meta "$DATA/meta.json" \
    --svg "$PLOT_DIR/recall_qps.svg" --nines-svg "$PLOT_DIR/recall_qps_nines.svg" \
    --build-svg "$PLOT_DIR/build.svg" --md "$DATA/summary.md"
say "wrote $DATA/results.jsonl, $DATA/summary.md, $PLOT_DIR/recall_qps.svg, recall_qps_nines.svg, build.svg"

#!/usr/bin/env bash
# Exact MIPS, zrag vs faiss-cpu IndexFlatIP: same data (1M x 384 random unit vectors, seeded),
# same thread count, batch 1 and batch 64, top-10. Prints a markdown table.
#
#   bash bench/exact/run.sh                 # defaults below
#   THREADS=2 ROUNDS=3 N=1000000 bash bench/exact/run.sh
#
# The engines run in alternating rounds so that both see the same background load; the table
# reports each engine's best round and lists all of them.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DATA=${DATA:-$ROOT/bench-out/exact}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
N=${N:-1000000}
DIM=${DIM:-384}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

python3 -c 'import faiss, numpy' 2>/dev/null || python3 -m pip install --quiet "faiss-cpu==1.15.1" numpy
python3 bench/exact/gen_data.py --out "$DATA" --n "$N" --dim "$DIM" --queries 64
cargo build --release --quiet -p zrag-index --bench exact_vs_faiss
# The bench executable (cargo bench would rebuild nothing, but its own output is noisy).
BENCH=$(cargo bench -p zrag-index --bench exact_vs_faiss --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable")][-1])')

RESULTS=$DATA/results-threads$THREADS.jsonl
: > "$RESULTS"
load() { cut -d' ' -f1 /proc/loadavg; }
for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS: faiss (load $(load))" >&2
    python3 bench/exact/faiss_bench.py --data "$DATA" --threads "$THREADS" \
        | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['load']='$(load)'; print(json.dumps(r))" >> "$RESULTS"
    echo "round $round/$ROUNDS: zrag (load $(load))" >&2
    "$BENCH" --data "$DATA" --threads "$THREADS" --json \
        | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['load']='$(load)'; print(json.dumps(r))" >> "$RESULTS"
done
python3 bench/exact/table.py "$RESULTS"

#!/usr/bin/env bash
# Search over f32 / f16 / int8 vectors, zrag vs faiss-cpu (IndexFlatIP, IndexScalarQuantizer
# QT_fp16 / QT_8bit, IndexRefineFlat over QT_8bit): same data (1M x 384 random unit vectors from
# gen_data.py, plus recall on real MiniLM vectors), same thread count, batch 1 and 64, top-10.
# Prints markdown tables.
#
#   bash bench/exact/quantized_run.sh
#   THREADS=2 ROUNDS=2 REAL=bench-out/revdict.zrag CARGO_TARGET_DIR=/work/target-quant bash bench/exact/quantized_run.sh
#
# The engines run in alternating rounds so that both see the same background load; the table
# takes each configuration's best round and lists all of them with the load average.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DATA=${DATA:-$ROOT/bench-out/exact}
REAL=${REAL:-$ROOT/bench-out/revdict.zrag}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
N=${N:-1000000}
DIM=${DIM:-384}
SHORTLIST=${SHORTLIST:-30}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

python3 -c 'import faiss, numpy' 2>/dev/null || python3 -m pip install --quiet "faiss-cpu==1.15.1" numpy
python3 bench/exact/gen_data.py --out "$DATA" --n "$N" --dim "$DIM" --queries 64
cargo build --release --quiet -p zrag-index --bench quantized_vs_faiss
BENCH=$(cargo bench -p zrag-index --bench quantized_vs_faiss --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable")][-1])')

REAL_ARGS=()
[ -d "$REAL/segments" ] && REAL_ARGS=(--real "$REAL")
RESULTS=$DATA/quantized-threads$THREADS.jsonl
: > "$RESULTS"
load() { cut -d' ' -f1-3 /proc/loadavg; }
tag_load() { python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['load']='$1'; print(json.dumps(r))"; }
for round in $(seq "$ROUNDS"); do
    # Real-data recall and the zrag sweep are deterministic: measured in the last round only.
    EXTRA=()
    ZEXTRA=()
    if [ "$round" = "$ROUNDS" ]; then EXTRA=("${REAL_ARGS[@]}"); ZEXTRA=(--sweep); fi
    L=$(load); echo "round $round/$ROUNDS: faiss (load $L)" >&2
    python3 bench/exact/quantized_faiss.py --data "$DATA" --threads "$THREADS" --shortlist "$SHORTLIST" "${EXTRA[@]}" \
        | tag_load "$L" >> "$RESULTS"
    L=$(load); echo "round $round/$ROUNDS: zrag (load $L)" >&2
    "$BENCH" --data "$DATA" --threads "$THREADS" --shortlist "$SHORTLIST" --json "${EXTRA[@]}" "${ZEXTRA[@]}" \
        | tag_load "$L" >> "$RESULTS"
done
echo "load at the end: $(load)" >&2
python3 bench/exact/quantized_table.py "$RESULTS"

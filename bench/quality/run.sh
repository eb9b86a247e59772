#!/usr/bin/env bash
# Retrieval quality on the reverse-dictionary test split (issue 4): nDCG@10 and recall@100 for
# BM25, dense (HNSW and exact), hybrid (RRF and score fusion), and each with re-ranking: the
# bi-encoder on every test query, the generator (log p(query | chunk), SmolLM2) on the first
# LM_LIMIT queries, with the first-stage runs repeated on that subset for a fair comparison.
#
#   bash bench/quality/run.sh            # needs bench-out/revdict.zrag (see BENCHMARKS.md)
#   LM_LIMIT=100 LM_DEPTH=10 SPLIT=test bash bench/quality/run.sh
#
# Each run writes a report (metrics.json, report.md, plots) under $OUT/<name>; table.py
# prints the markdown table that BENCHMARKS.md holds.
set -euo pipefail
cd "$(dirname "$0")/../.."
ZRAG=${ZRAG:-target/release/zrag}
COLLECTION=${COLLECTION:-bench-out/revdict.zrag}
DATA=${DATA:-bench-out/revdict}
SPLIT=${SPLIT:-test}
OUT=${OUT:-bench-out/quality-$SPLIT}
LM_LIMIT=${LM_LIMIT:-100}
LM_DEPTH=${LM_DEPTH:-10}
BI_DEPTH=${BI_DEPTH:-100}
ONLY=${ONLY:-}
mkdir -p "$OUT"

run() {
    local name=$1; shift
    if [ -n "$ONLY" ] && ! grep -qw "$name" <<<"$ONLY"; then return; fi
    echo "[$(date '+%T')] $name: $*" >&2
    "$ZRAG" --collection "$COLLECTION" --json eval retrieval \
        --queries "$DATA/queries.jsonl" --qrels "$DATA/qrels/$SPLIT.tsv" \
        --report "$OUT/$name" "$@" > "$OUT/$name.json"
}

run bm25 --mode bm25
run dense --mode dense
run dense-exact --mode dense --exact
run hybrid-rrf --mode hybrid --fusion rrf
run hybrid-score --mode hybrid --fusion score --dense-weight 0.5
run bm25+bi --mode bm25 --rerank bi-encoder --rerank-depth "$BI_DEPTH"
run hybrid-rrf+bi --mode hybrid --fusion rrf --rerank bi-encoder --rerank-depth "$BI_DEPTH"
for mode in bm25 dense hybrid; do
    run "$mode@$LM_LIMIT" --mode "$mode" --limit "$LM_LIMIT"
    run "$mode+lm@$LM_LIMIT" --mode "$mode" --limit "$LM_LIMIT" --rerank generator --rerank-depth "$LM_DEPTH"
done
python3 bench/quality/table.py "$OUT"

#!/usr/bin/env bash
# HNSW, zrag vs hnswlib 0.8.0, on real MiniLM vectors: the first N chunk vectors of the
# reverse-dictionary collection (see BENCHMARKS.md for building it), Q more rows as queries.
#   bash bench/hnsw/run.sh [N] [Q]
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-20000}
Q=${2:-500}
VENV=${VENV:-/work/venv-llama}
VECTORS=${VECTORS:-bench-out/hnsw-vectors.f32}
cat bench-out/revdict.zrag/segments/seg-*/vectors.f32 | head -c $(( (N + Q) * 384 * 4 )) > "$VECTORS"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c 'import hnswlib, numpy' 2>/dev/null || "$VENV/bin/pip" install --quiet hnswlib==0.8.0 numpy
cargo build --release --quiet -p zrag-index --example bench_hnsw
target/release/examples/bench_hnsw "$VECTORS" 384 "$N" "$Q"
"$VENV/bin/python" bench/hnsw/hnswlib_bench.py "$VECTORS" 384 "$N" "$Q"

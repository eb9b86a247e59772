#!/usr/bin/env bash
# The main job on a fresh machine: fetch the models, build zrag, index the sample corpus and
# answer a question with its sources.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh
cargo build --release --quiet -p zrag-cli
zrag=target/release/zrag
collection=target/demo-collection
$zrag --collection "$collection" index samples/corpus
question="${1:-How far is the Moon from Earth?}"
echo "Q: $question"
# RAG-Sequence over the top 3 chunks; sources are cited by their posterior p(z|x,y).
$zrag --collection "$collection" ask "$question" --k 3 --max-tokens 48

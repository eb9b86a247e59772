#!/usr/bin/env bash
# Reverse-dictionary QA: closed-book vs retrieve-then-read vs RAG-Sequence vs RAG-Token on a
# fixed sample of the test split, answers scored by EM / token F1 against the lemma.
# Needs the benchmark data and a collection of its corpus (see bench/revdict/README or
# BENCHMARKS.md): `zrag data revdict --out bench-out/revdict` and
# `zrag --collection bench-out/revdict.zrag index bench-out/revdict/corpus.jsonl`.
set -euo pipefail
cd "$(dirname "$0")/../.."
SAMPLE=${SAMPLE:-60}
K=${K:-5}
cargo build --release -p zrag-cli
./target/release/zrag --collection bench-out/revdict.zrag eval qa \
  --questions bench-out/revdict/answers.jsonl --split test --sample "$SAMPLE" \
  --marginalize closed-book,none,sequence,token --k "$K" \
  --question-template 'Which word means "{question}"?' --instruction 'Answer with the word.' \
  --answer-prefix 'The word is "' --cut-at '"' --max-tokens 8 --max-context-tokens 160 \
  --report bench/qa/report "$@"

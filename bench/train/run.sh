#!/usr/bin/env bash
# Retriever and generator training on the reverse-dictionary benchmark (train split to train,
# dev to choose, test to report). Needs bench-out/revdict (zrag data revdict) and its indexed
# collection bench-out/revdict.zrag (see BENCHMARKS.md). Results: bench-out/train/*.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p zrag-cli
Z="./target/release/zrag --collection bench-out/revdict.zrag"
D=bench-out/revdict
PROMPT=(--question-template 'Which word means "{question}"?' --instruction 'Answer with the word.'
        --answer-prefix 'The word is "' --answer-suffix '"')
mkdir -p bench-out/train
# DPR on E_Q (the collection's E_D vectors stay valid): in-batch + 1 BM25 hard negative.
$Z train retriever --method dpr --queries $D/queries.jsonl --qrels $D/qrels/train.tsv \
  --dev-qrels $D/qrels/dev.tsv --dev-limit 500 --steps 600 --lr 3e-5 --eval-every 100 \
  --save-every 100 --out bench-out/train/dpr
# LSR from scratch: p_LSR from SmolLM2's log p(lemma | chunk ∘ gloss), k 5, τ 0.1.
$Z train retriever --method lsr --queries $D/queries.jsonl --qrels $D/qrels/train.tsv \
  --answers $D/answers.jsonl --dev-qrels $D/qrels/dev.tsv --dev-limit 500 --limit 200 \
  --steps 100 --batch-size 4 --k 5 --tau 0.1 --lr 2e-5 --eval-every 25 --save-every 0 \
  --max-context-tokens 96 --lm-cache bench-out/train/lm-cache.jsonl "${PROMPT[@]}" \
  --out bench-out/train/lsr
# Test split with each chosen query encoder.
for run in dpr lsr; do
  $Z --query-encoder bench-out/train/$run/best/query-encoder eval retrieval \
    --queries $D/queries.jsonl --qrels $D/qrels/test.tsv --json > bench-out/train/$run-test.json
done

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
LSR=(--method lsr --queries $D/queries.jsonl --qrels $D/qrels/train.tsv --answers $D/answers.jsonl
     --dev-qrels $D/qrels/dev.tsv --dev-limit 500 --limit 200 --steps 100 --batch-size 4 --lr 2e-5
     --eval-every 25 --save-every 0 --max-context-tokens 96 --lm-cache bench-out/train/lm-cache.jsonl
     "${PROMPT[@]}")
# LSR from scratch: p_LSR from SmolLM2's log p(lemma | chunk ∘ gloss). The settings comparison
# (k 5 with --lm-score prob / mean-logprob, --tau 1.0 / 0.3 / 0.03) uses the same flags.
$Z train retriever "${LSR[@]}" --k 5 --tau 0.1 --out bench-out/train/lsr
$Z train retriever "${LSR[@]}" --k 10 --tau 0.1 --out bench-out/train/lsr-k10
# LSR from DPR's last checkpoint.
$Z --query-encoder bench-out/train/dpr/checkpoint/query-encoder train retriever "${LSR[@]}" \
  --k 10 --tau 0.1 --out bench-out/train/lsr-from-dpr
# Test split with each chosen query encoder; per-query results for bench/train/paired.py.
$Z eval retrieval --queries $D/queries.jsonl --qrels $D/qrels/test.tsv \
  --report bench-out/train/report-base --json > bench-out/train/base-test.json
for run in dpr lsr lsr-k10 lsr-from-dpr; do
  $Z --query-encoder bench-out/train/$run/best/query-encoder eval retrieval \
    --queries $D/queries.jsonl --qrels $D/qrels/test.tsv --report bench-out/train/report-$run \
    --json > bench-out/train/$run-test.json
  python3 bench/train/paired.py bench-out/train/report-base bench-out/train/report-$run
done
# The generator: LoRA on retrieved context, then RAG-Sequence EM on 100 test questions with the
# shipped Q4_1 model, its f32 de-quantisation (the adapter's base) and the adapter.
T=(--question-template 'Which word means "{question}"?' --instruction 'Answer with the word.'
   --answer-prefix 'The word is "')
$Z train generator --qa $D/answers.jsonl --split train --dev-split dev --dev-limit 40 --limit 300 \
  --k 5 --batch-size 2 --steps 150 --lr 2e-4 --eval-every 25 --save-every 25 \
  --max-context-tokens 160 "${T[@]}" --answer-suffix '"' --out bench-out/train/generator
for v in base f32 lora; do
  extra=()
  [ $v = f32 ] && extra=(--dequantize)
  [ $v = lora ] && extra=(--adapter bench-out/train/generator/adapter.safetensors)
  $Z eval qa --questions $D/answers.jsonl --split test --sample 100 --marginalize sequence --k 5 \
    "${T[@]}" --cut-at '"' --max-tokens 8 --max-context-tokens 160 "${extra[@]}" \
    --report bench-out/train/qa-$v
done

#!/usr/bin/env bash
# End-to-end timings (issue 8): index the reverse-dictionary corpus, then answer test questions
# with RAG-Sequence and RAG-Token, with one zrag binary. Run it with the binary before and after
# a change on the same machine to compare.
#
#   bash bench/e2e/run.sh index  [CORPUS]      # CORPUS default bench-out/revdict/corpus.jsonl
#   bash bench/e2e/run.sh qa     COLLECTION    # 100 test questions, --marginalize sequence,token
#
# Environment: BIN (target/release/zrag), TAG (a name for the outputs: after), SAMPLE (100),
# ZRAG_ENCODER_PRECISION (f32|int8; binaries older than issue 8 ignore it).
# Outputs: bench-out/e2e/<TAG>-index.zrag and -index.time, bench-out/e2e/<TAG>-qa/ (report)
# and -qa.time.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/zrag}
TAG=${TAG:-after}
SAMPLE=${SAMPLE:-100}
OUT=bench-out/e2e
mkdir -p "$OUT"
timed() {  # timed NAME CMD...: wall/user/RSS of CMD into $OUT/NAME.time
    /usr/bin/time -f '%e s wall, %U s user, %S s sys, %M KiB max RSS' -o "$OUT/$1.time" "${@:2}"
    echo "$1: $(cat "$OUT/$1.time")" >&2
}
case "${1:-}" in
index)
    corpus=${2:-bench-out/revdict/corpus.jsonl}
    rm -rf "$OUT/$TAG-index.zrag"
    timed "$TAG-index" "$BIN" --collection "$OUT/$TAG-index.zrag" index "$corpus"
    ;;
qa)
    collection=${2:?collection directory}
    timed "$TAG-qa" "$BIN" --collection "$collection" eval qa \
        --questions bench-out/revdict/answers.jsonl --split test --sample "$SAMPLE" \
        --marginalize sequence,token --k 5 \
        --question-template 'Which word means "{question}"?' --instruction 'Answer with the word.' \
        --answer-prefix 'The word is "' --cut-at '"' --max-tokens 8 --max-context-tokens 160 \
        --report "$OUT/$TAG-qa"
    ;;
*)
    echo "usage: bench/e2e/run.sh index [CORPUS] | qa COLLECTION" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Coverage-guided fuzzing of zrag's parsers with cargo-fuzz (libFuzzer); see fuzz/README.md.
#
#   scripts/fuzz.sh                   every target for $FUZZ_SECONDS (default 180) seconds
#   scripts/fuzz.sh chunker gguf      only these targets
#   FUZZ_SECONDS=20 scripts/fuzz.sh   a short smoke run (CI)
#
# Environment:
#   FUZZ_SECONDS    fuzzing time per target, in seconds (default 180)
#   FUZZ_SANITIZER  none (default) or address: cargo-fuzz's -s; ASan needs its own build,
#                   kept apart in fuzz/target/asan
#   FUZZ_TIMEOUT    seconds one input may take before libFuzzer calls it a hang (default 20)
#   FUZZ_RSS_MB     memory limit in MB; going over it is a crash (default 2048)
#
# cargo-fuzz needs nightly flags (-Z); on a stable toolchain RUSTC_BOOTSTRAP=1 lets rustc
# accept them, which is what this script does (nightly works too). The seeds under
# fuzz/corpus/<target> are only read; what the fuzzer finds goes to
# fuzz/corpus-generated/<target> (git-ignored) and carries over between runs. A crashing input
# lands in fuzz/artifacts/<target>/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> fuzz/artifacts/<target>/crash-...
# from the repository root.
#
# Exit status: 0 when no target found anything, 1 otherwise (or when a build fails).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-180}"
SANITIZER="${FUZZ_SANITIZER:-none}"
TIMEOUT="${FUZZ_TIMEOUT:-20}"
RSS_MB="${FUZZ_RSS_MB:-2048}"
ALL_TARGETS=(loaders chunker manifest gguf index_files)
TARGETS=("${ALL_TARGETS[@]}")
if [[ $# -gt 0 ]]; then
    TARGETS=("$@")
fi

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd "$ROOT"
FUZZ_ARGS=(-s "$SANITIZER")
if [[ "$SANITIZER" != none ]]; then
    FUZZ_ARGS+=(--target-dir "$ROOT/fuzz/target/$SANITIZER")
fi

echo "== building ${TARGETS[*]} (sanitizer: $SANITIZER)"
build_start=$(date +%s)
for target in "${TARGETS[@]}"; do
    cargo fuzz build "${FUZZ_ARGS[@]}" "$target"
done
echo "== built in $(($(date +%s) - build_start)) s"

LOGS="$ROOT/fuzz/target/logs"
mkdir -p "$LOGS"
failed=()
summary=()
for target in "${TARGETS[@]}"; do
    generated="$ROOT/fuzz/corpus-generated/$target"
    seeds="$ROOT/fuzz/corpus/$target"
    mkdir -p "$generated" "$ROOT/fuzz/artifacts/$target"
    log="$LOGS/$target.log"
    echo "== fuzzing $target for $SECONDS_PER_TARGET s (log: $log)"
    status=0
    # The first corpus directory receives new inputs; the seeds are only read.
    cargo fuzz run "${FUZZ_ARGS[@]}" "$target" "$generated" "$seeds" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout="$TIMEOUT" -rss_limit_mb="$RSS_MB" \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$last")
    if [[ $status -eq 0 ]]; then
        result=ok
    else
        result="FAILED (exit $status)"
        failed+=("$target")
        grep -E 'panicked at|^==[0-9]+==|SUMMARY|Test unit written to|out-of-memory|timeout' "$log" |
            head -n 12 || true
    fi
    line=$(printf '%-12s %-18s runs %-10s exec/s %-7s cov %-6s ft %-6s corpus %-10s peak %s MB' \
        "$target" "$result" "${runs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "${rss:-?}")
    echo "$line"
    summary+=("$line")
done

echo "== summary (${SECONDS_PER_TARGET} s per target, sanitizer $SANITIZER)"
printf '%s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "== crashes in: ${failed[*]} (inputs under fuzz/artifacts/)"
    exit 1
fi

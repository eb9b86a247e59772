#!/usr/bin/env bash
# Generation speed, SmolLM2-135M-Instruct Q4_1: llama.cpp (llama-cpp-python 0.3.36) vs zrag.
#
#   bash bench/generate/run.sh
#   THREADS=2 RUNS=3 VENV=/work/venv-llama GGUF=/path/to/model.gguf bash bench/generate/run.sh
#
# Creates (once) a venv with llama-cpp-python built from its PyPI sdist (it compiles llama.cpp:
# about 11-25 minutes on this 2-core machine, needs cmake-from-pip, g++ and python3-venv), then
# runs the reference benchmark and writes bench/generate/llamacpp-results.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${VENV:-/work/venv-llama}
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
GGUF=${GGUF:-${ZRAG_HOME:-$HOME/.cache/zrag}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-$ROOT/bench/generate}

[ -f "$GGUF" ] || { echo "missing $GGUF: run scripts/fetch-models.sh first" >&2; exit 1; }

if ! "$VENV/bin/python" -c 'import llama_cpp, numpy; assert llama_cpp.__version__ == "0.3.36"' 2>/dev/null; then
    echo "building llama-cpp-python 0.3.36 into $VENV (compiles llama.cpp, takes a while)" >&2
    python3 -m venv "$VENV"
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        "$VENV/bin/pip" install --quiet "llama-cpp-python==0.3.36" numpy
fi

# ---- reference: llama.cpp ------------------------------------------------------------------
echo "llama.cpp (load $(cut -d' ' -f1 /proc/loadavg))" >&2
"$VENV/bin/python" bench/generate/llamacpp_bench.py --gguf "$GGUF" --threads "$THREADS" --runs "$RUNS" \
    > "$OUT/llamacpp-results.json"
"$VENV/bin/python" - "$OUT/llamacpp-results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"llama.cpp (llama-cpp-python {r['llama_cpp_python']}), {r['threads']} threads, "
      f"load {r['loadavg_start']} -> {r['loadavg_end']}; median (best) of {r['runs']} runs")
d = r["decode"]
print(f"  decode  {d['new_tokens']} greedy tokens: {d['decode_tokens_per_s']:.1f} ({d['best_decode_tokens_per_s']:.1f}) tok/s; "
      f"prompt of {d['prompt_tokens']} tokens at {d['prompt_tokens_per_s']:.0f} tok/s")
p = r["prompt"]
print(f"  prompt  {p['tokens']} tokens: {p['tokens_per_s']:.0f} ({p['best_tokens_per_s']:.0f}) tok/s")
s = r["score"]
print(f"  score   {s['sequences']} x {s['tokens'] // s['sequences']} tokens, logits_all: "
      f"{s['tokens_per_s']:.0f} ({s['best_tokens_per_s']:.0f}) tok/s; with float64 log-softmax "
      f"{s['eval_plus_logprob_tokens_per_s']:.0f} ({s['best_eval_plus_logprob_tokens_per_s']:.0f}) tok/s")
fc = [x["foreign_cpu"] for k in ("decode", "prompt", "score") for x in r[k]["runs"]]
print(f"  other processes used {min(fc):.2f}-{max(fc):.2f} cores during the runs"
      + ("  << CONTENDED: numbers not comparable, rerun on a quiet machine" if max(fc) > 0.1 else ""))
PY

# ---- zrag ----------------------------------------------------------------------------------
# The same token ids (read from the reference's results), the same threads.
cargo build --release --quiet -p zrag-models --example bench_generate
echo "zrag (load $(cut -d' ' -f1 /proc/loadavg))" >&2
RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS target/release/examples/bench_generate \
    --workloads "$OUT/llamacpp-results.json" --model "$GGUF" --runs "$RUNS" > "$OUT/zrag-results.json"
python3 - "$OUT/llamacpp-results.json" "$OUT/zrag-results.json" <<'PY'
import json, sys
ref, ours = (json.load(open(p)) for p in sys.argv[1:3])
rows = [
    ("decode tok/s (128 greedy tokens)", ref["decode"]["decode_tokens_per_s"], ours["decode"]["decode_tokens_per_s"]),
    ("prompt tok/s (short ChatML prompt)", ref["decode"]["prompt_tokens_per_s"], ours["decode"]["prompt_tokens_per_s"]),
    (f"prompt tok/s ({ref['prompt']['tokens']} tokens)", ref["prompt"]["tokens_per_s"], ours["prompt"]["tokens_per_s"]),
    ("teacher-forced scoring tok/s (+log-softmax)", ref["score"]["eval_plus_logprob_tokens_per_s"], ours["score"]["tokens_per_s"]),
    (f"k={ref['rag_batch']['documents']} batch decode tok/s (all sequences)", ref["rag_batch"]["decode_tokens_per_s"], ours["rag_batch"]["batched_decode_tokens_per_s"]),
    (f"k={ref['rag_batch']['documents']} batch, 150-token prompts + 32 tokens: 1/s", 1 / ref["rag_batch"]["seconds"], 1 / ours["rag_batch"]["batched_seconds"]),
]
print(f"{'workload':<46} {'llama.cpp':>10} {'zrag':>10} {'ratio':>7}")
for name, r, z in rows:
    print(f"{name:<46} {r:>10.1f} {z:>10.1f} {z / r:>6.2f}x")
b = ours["rag_batch"]
print(f"zrag, k={b['documents']} documents x {b['new_tokens']} greedy tokens: one batch {b['batched_seconds']:.2f}s, "
      f"one after another {b['sequential_seconds']:.2f}s ({b['speedup']:.2f}x); "
      f"scoring one batch {ours['score']['tokens_per_s']:.0f} vs one by one {ours['score']['one_by_one_tokens_per_s']:.0f} tok/s")
PY

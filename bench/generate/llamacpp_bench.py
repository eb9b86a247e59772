#!/usr/bin/env python3
"""Generation speed of the reference: llama.cpp (llama-cpp-python 0.3.36) on SmolLM2-135M Q4_1.

Three workloads, all with n_threads = n_threads_batch = THREADS (default 2):

  decode    greedy decoding of 128 new tokens after a short ChatML prompt (llama.cpp's greedy
            sampler, repeat_penalty 1.0, end-of-generation tokens ignored so that every run
            decodes exactly 128 tokens). Prompt eval is timed separately: the clock for the
            decode rate starts when the first new token has been sampled, so the rate covers
            127 single-token decode steps (+ sampling). llama.cpp's own perf counters
            (llama_perf_context: prompt eval vs eval) are reported too.
  prompt    prompt processing of a 512-token prompt (one llama_decode call per n_batch=512;
            logits of the last position only).
  rag_batch k = 5 document prompts (the score sequences cut to 150 tokens) decoded together
            as 5 sequences of one context (low-level llama_batch API): one llama_decode for the
            prompts, then 31 steps of 5 tokens; decode rate = 5 x 31 tokens / decode time.
  score     teacher-forced scoring: logits_all=True, 5 sequences of ~200 tokens evaluated one
            after another (reset between them); the rate counts the eval, the copy of all the
            logits to numpy (what llama-cpp-python does) and, separately, the eval plus the
            float64 log-softmax of every next token (what a RAG scorer needs).

AMX: as in scripts/reference_smollm2.py, the model is loaded with use_extra_bufts = false because
llama.cpp's AMX path (chosen by default on this AMX-capable Xeon) segfaults on the first decode
(llama.cpp issue #20824). For this Q4_1 model (Q8_0 token embedding / tied output) that leaves
llama.cpp's regular AVX-512 CPU kernels, the same ones a build without AMX would run.

One warm-up run per workload, then the median of RUNS (default 3) runs; the best run and every
run (with the load average at its start) are reported too. Prints one JSON object.

Usage: /work/venv-llama/bin/python bench/generate/llamacpp_bench.py [--gguf PATH] [--threads 2] [--runs 3]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import llama_cpp
import llama_cpp.llama_cpp as _llama_c
from llama_cpp import Llama

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Text for long prompts / scored sequences. Repeated and cut to the token counts needed.
FILLER = (
    "The Amazon River in South America is the largest river by discharge volume of water in "
    "the world, and the disputed longest river system in the world in comparison to the Nile. "
    "The headwaters of the Apurimac River on Nevado Mismi had been considered for nearly a "
    "century as the Amazon basin's most distant source, until a 2014 study found it to be the "
    "headwaters of the Mantaro River on the Cordillera Rumi Cruz in Peru. The Mantaro and "
    "Apurimac rivers join, and with other tributaries form the Ucayali River, which in turn "
    "meets the Maranon River upstream of Iquitos, Peru, forming what countries other than "
    "Brazil consider to be the main stem of the Amazon. Brazilians call this section the "
    "Solimoes River above its confluence with the Rio Negro, forming what Brazilians call the "
    "Amazon at the Meeting of Waters at Manaus, the largest city on the river. "
)
SCORE_TOPICS = [
    "Photosynthesis is the process by which green plants turn light into chemical energy. ",
    "A dictionary lists the words of a language with their meanings and origins. ",
    "The printing press made books cheaper and spread literacy across Europe. ",
    "Volcanoes form where molten rock rises through cracks in the Earth's crust. ",
    "Bees communicate the location of flowers to each other through a waggle dance. ",
]


# llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist (from its CMake log; not queryable
# at run time).
VENDORED_LLAMA_CPP = {"0.3.36": "llama.cpp 0c1e570 (ggml 0.25.3)"}


def disable_extra_buffer_types():
    default = _llama_c.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    _llama_c.llama_model_default_params = params


def chatml(user):
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


def tokens_of(llm, text, n=None):
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    if n is not None:
        while len(ids) < n:
            ids = ids + ids
        ids = ids[:n]
    return ids


def perf(llm):
    p = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return {"t_p_eval_ms": p.t_p_eval_ms, "n_p_eval": p.n_p_eval, "t_eval_ms": p.t_eval_ms, "n_eval": p.n_eval}


def bench_decode(llm, prompt_ids, n_new):
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    t0 = time.perf_counter()
    t_first = None
    out = []
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(tok)
        if t_first is None:
            t_first = time.perf_counter()
        if len(out) >= n_new:
            break
    t_end = time.perf_counter()
    p = perf(llm)
    return {
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(out),
        "prompt_eval_s": t_first - t0,
        "decode_s": t_end - t_first,
        "prompt_tokens_per_s": len(prompt_ids) / (t_first - t0),
        "decode_tokens_per_s": (len(out) - 1) / (t_end - t_first),
        "end_to_end_new_tokens_per_s": len(out) / (t_end - t0),
        "llama_perf": p,
        "llama_perf_decode_tokens_per_s": p["n_eval"] / (p["t_eval_ms"] / 1000.0) if p["t_eval_ms"] else None,
        "llama_perf_prompt_tokens_per_s": p["n_p_eval"] / (p["t_p_eval_ms"] / 1000.0) if p["t_p_eval_ms"] else None,
        "ids": out,
    }


def bench_prompt(llm, ids):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    dt = time.perf_counter() - t0
    return {"tokens": len(ids), "seconds": dt, "tokens_per_s": len(ids) / dt}


def bench_score(llm, seqs):
    n = sum(len(s) for s in seqs)
    t0 = time.perf_counter()
    for s in seqs:
        llm.reset()
        llm.eval(s)
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = 0.0
    for s in seqs:
        llm.reset()
        llm.eval(s)
        x = np.asarray(llm.scores[: len(s)], dtype=np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))[:-1]
        total += float((x[np.arange(len(s) - 1), s[1:]] - lse).sum())
    t_logprob = time.perf_counter() - t0
    return {
        "sequences": len(seqs),
        "tokens": n,
        "eval_seconds": t_eval,
        "tokens_per_s": n / t_eval,
        "eval_plus_logprob_seconds": t_logprob,
        "eval_plus_logprob_tokens_per_s": n / t_logprob,
        "sum_logprob": total,
    }


def bench_rag_batch(model, threads, prompts, n_new):
    """k prompts decoded as one batch (sequence ids 0..k-1 in one context, as zrag's
    `rag_batch`): one llama_decode for all the prompts, then one per step with k tokens."""
    k = len(prompts)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = 2048
    cp.n_batch = 1024
    cp.n_ubatch = 512
    cp.n_seq_max = k
    cp.n_threads = threads
    cp.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(sum(len(p) for p in prompts), 0, k)

    def fill(entries):
        # entries: (token, pos, seq, want_logits)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if want else 0
        batch.n_tokens = len(entries)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax_of(i):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
        return int(logits.argmax())

    try:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        entries, last = [], []
        for seq, p in enumerate(prompts):
            for pos, tok in enumerate(p):
                entries.append((tok, pos, seq, pos == len(p) - 1))
            last.append(len(entries) - 1)
        fill(entries)
        nxt = [argmax_of(i) for i in last]
        t_prompt = time.perf_counter() - t0
        positions = [len(p) for p in prompts]
        t1 = time.perf_counter()
        for _ in range(1, n_new):
            fill([(nxt[s], positions[s], s, True) for s in range(k)])
            positions = [x + 1 for x in positions]
            nxt = [argmax_of(i) for i in range(k)]
        t_decode = time.perf_counter() - t1
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return {
        "documents": k,
        "prompt_tokens_each": [len(p) for p in prompts],
        "new_tokens": n_new,
        "seconds": t_prompt + t_decode,
        "prompt_seconds": t_prompt,
        "decode_seconds": t_decode,
        "decode_tokens_per_s": k * (n_new - 1) / t_decode,
    }


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def best_of(runs, key):
    return max(r[key] for r in runs)


def cpu_busy_seconds():
    """Busy CPU time of the whole machine so far (all cores, /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed_runs(fn, n):
    """n runs of fn(), each tagged with the 1-minute load average at its start and with
    `foreign_cpu`: the cores' worth of CPU that other processes used during the run (machine busy
    time minus this process's own, over wall time). The machine is shared, and llama.cpp's
    spinning OpenMP threads slow down sharply when another process takes a core; a run with
    foreign_cpu above ~0.1 is contended."""
    runs = []
    for _ in range(n):
        load = round(os.getloadavg()[0], 2)
        b0, t0, w0 = cpu_busy_seconds(), os.times(), time.perf_counter()
        r = fn()
        b1, t1, w1 = cpu_busy_seconds(), os.times(), time.perf_counter()
        own = (t1.user - t0.user) + (t1.system - t0.system)
        r["loadavg"] = load
        r["foreign_cpu"] = round(max(0.0, (b1 - b0) - own) / (w1 - w0), 3)
        runs.append(r)
    return runs


def main():
    default_gguf = os.path.join(
        os.environ.get("ZRAG_HOME", os.path.expanduser("~/.cache/zrag")), "models", "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=default_gguf)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--score-tokens", type=int, default=200)
    ap.add_argument("--extra-bufts", action="store_true", help="keep llama.cpp's AMX/repack buffers (crashes here)")
    args = ap.parse_args()
    if not args.extra_bufts:
        disable_extra_buffer_types()
    common = dict(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads, seed=0, verbose=False)

    load1 = os.getloadavg()[0]
    result = {
        "engine": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp": VENDORED_LLAMA_CPP.get(llama_cpp.__version__, "unknown"),
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip(),
        "model": os.path.basename(args.gguf),
        "threads": args.threads,
        "use_extra_bufts": bool(args.extra_bufts),
        "flash_attn": False,
        "runs": args.runs,
        "cpu": platform.processor() or platform.machine(),
        "loadavg_start": round(load1, 2),
    }

    # (i) decode and (ii) prompt processing: logits of the last position only.
    llm = Llama(n_ctx=1024, n_batch=512, n_ubatch=512, logits_all=False, **common)
    prompt_ids = tokens_of(llm, chatml("Write a short story about a lighthouse keeper and a storm."))
    bench_decode(llm, prompt_ids, args.new_tokens)  # warm-up
    runs = timed_runs(lambda: bench_decode(llm, prompt_ids, args.new_tokens), args.runs)
    text = llm.detokenize(runs[0]["ids"]).decode("utf-8", errors="replace")
    for r in runs:
        del r["ids"]
    result["decode"] = {
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens,
        "prompt_tokens_per_s": median_of(runs, "prompt_tokens_per_s"),
        "decode_tokens_per_s": median_of(runs, "decode_tokens_per_s"),
        "best_decode_tokens_per_s": best_of(runs, "decode_tokens_per_s"),
        "end_to_end_new_tokens_per_s": median_of(runs, "end_to_end_new_tokens_per_s"),
        "llama_perf_decode_tokens_per_s": median_of(runs, "llama_perf_decode_tokens_per_s"),
        "text_head": text[:200],
        "runs": runs,
    }

    long_ids = tokens_of(llm, FILLER, args.prompt_tokens)
    bench_prompt(llm, long_ids)  # warm-up
    runs = timed_runs(lambda: bench_prompt(llm, long_ids), args.runs)
    result["prompt"] = {
        "tokens": len(long_ids),
        "n_batch": 512,
        "tokens_per_s": median_of(runs, "tokens_per_s"),
        "best_tokens_per_s": best_of(runs, "tokens_per_s"),
        "runs": runs,
    }
    del llm

    # (iii) teacher-forced scoring with logits at every position.
    llm = Llama(n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, **common)
    seqs = [tokens_of(llm, topic + FILLER, args.score_tokens) for topic in SCORE_TOPICS]
    bench_score(llm, seqs)  # warm-up
    runs = timed_runs(lambda: bench_score(llm, seqs), args.runs)
    result["score"] = {
        "sequences": len(seqs),
        "tokens": sum(len(s) for s in seqs),
        "tokens_per_s": median_of(runs, "tokens_per_s"),
        "best_tokens_per_s": best_of(runs, "tokens_per_s"),
        "eval_plus_logprob_tokens_per_s": median_of(runs, "eval_plus_logprob_tokens_per_s"),
        "best_eval_plus_logprob_tokens_per_s": best_of(runs, "eval_plus_logprob_tokens_per_s"),
        "runs": runs,
    }

    # (iv) RAG shape: the k score sequences cut to 150 tokens, 32 greedy tokens each, decoded
    # as one batch of k sequences.
    doc_prompts = [s[:150] for s in seqs]
    bench_rag_batch(llm.model, args.threads, doc_prompts, 32)  # warm-up
    runs = timed_runs(lambda: bench_rag_batch(llm.model, args.threads, doc_prompts, 32), args.runs)
    result["rag_batch"] = {
        "documents": len(doc_prompts),
        "prompt_tokens_each": [len(p) for p in doc_prompts],
        "new_tokens": 32,
        "seconds": median_of(runs, "seconds"),
        "decode_tokens_per_s": median_of(runs, "decode_tokens_per_s"),
        "best_decode_tokens_per_s": best_of(runs, "decode_tokens_per_s"),
        "runs": runs,
    }
    del llm
    result["loadavg_end"] = round(os.getloadavg()[0], 2)
    # The exact token ids of every workload, so that zrag's side of the benchmark
    # (crates/zrag-models/examples/bench_generate.rs) runs the very same inputs.
    result["workloads"] = {
        "decode_prompt_ids": [int(t) for t in prompt_ids],
        "decode_new_tokens": args.new_tokens,
        "prompt_ids": [int(t) for t in long_ids],
        "score_sequences": [[int(t) for t in s] for s in seqs],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

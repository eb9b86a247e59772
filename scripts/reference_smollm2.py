#!/usr/bin/env python3
"""llama.cpp reference outputs (golden file) for the SmolLM2-135M-Instruct Q4_1 GGUF generator.

The reference is llama.cpp as shipped in `llama-cpp-python==0.3.36` (SPEC §3, §6). The golden
file it writes is read by zrag-models tests, which check zrag's own GGUF tokenizer and decoder
against it:

  tokenization  ~40 varied strings, tokenized by llama.cpp with add_bos=False and both
                special=True (ChatML markers become single special tokens) and special=False
                (they are split as plain text), plus the detokenized text of the ids.
  logits        teacher-forced evaluation of 3 prompts (logits_all=True, n_ctx=512, n_batch=512,
                2 threads): for every position, the log-softmax of the next actual token, the
                top-10 ids with their raw logits, and the logsumexp of the raw logits; the full
                raw logit vector of the last position of prompt 1 (rounded to 5 decimals).
  generation    the first 40 greedy tokens (temp 0, repeat_penalty 1.0) after 2 ChatML prompts;
                generation stops early at an end-of-generation token (which is then included).

Schema (one JSON object):
  generator {reference, llama_cpp_python, llama_cpp, system_info, gguf, gguf_size, script}
  settings {n_ctx, n_batch, n_threads, use_extra_bufts, flash_attn, top_k, gen_tokens, tokenize, logits, greedy}
  n_vocab; metadata {GGUF key: value as string, token/merge arrays left out}
  special_tokens {bos, eos, eot, sep, nl, pad, add_bos, add_eos, eog: [ids], control: [ids], pieces: {id: text}}
  chat_system_default: the system message SmolLM2's chat template inserts
  tokenization [{text, ids, ids_nospecial, ids_add_bos, pieces, pieces_hex, detokenized,
                 detokenized_nospecial, roundtrip}]
  logits [{name, text, ids, n_tokens, sum_next_logprob, last_logits (first prompt only),
           positions: [{pos, token, logsumexp, top_ids, top_logits, next_token, next_logprob}]}]
           (next_* absent at the last position)
  generation [{name, prompt, prompt_ids, ids, text, text_special, stopped_at_eog,
               sampler_matches_argmax, min_margin, steps: [{top_ids, top_logits, margin, logprob}]}]
  Logits are llama.cpp's float32 values rounded to 5 decimals; logsumexp / logprobs in float64.

Needs: a venv with `pip install llama-cpp-python==0.3.36 numpy` (see bench/generate/run.sh).

Usage:
    /work/venv-llama/bin/python scripts/reference_smollm2.py \
        --gguf ~/.cache/zrag/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out crates/zrag-models/tests/data/smollm2_llamacpp.json

Deterministic: fixed inputs, a fixed thread count (2) and batch size, greedy decoding only.

AMX: llama.cpp built with -march=native on this AMX-capable Xeon puts the Q4_1/Q8_0 weights in
its AMX "extra buffer type", and ggml_backend_amx_mul_mat then segfaults on the first decode
(llama.cpp issue #20824; #16315 reports wrong AMX results for Q4_0/Q4_1). The script therefore
loads the model with llama_model_params.use_extra_bufts = false (no AMX, no CPU_REPACK; neither
repack applies to Q4_1 or, on x86, Q8_0), i.e. llama.cpp's plain CPU kernels: Q4_1 x Q8_1 and
Q8_0 x Q8_0 dot products with activations quantized to 8 bits. --extra-bufts restores the default.
"""

import argparse
import json
import os
import sys

try:
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama
except ImportError as exc:  # pragma: no cover
    sys.exit(f"reference_smollm2.py needs: pip install llama-cpp-python==0.3.36 numpy ({exc})")
import llama_cpp.llama_cpp as _llama_c

N_THREADS = 2
N_CTX = 512
N_BATCH = 512
TOP_K = 10
GEN_TOKENS = 40

# Default system message of SmolLM2's chat template (used when the caller gives none).
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(user, system=SYSTEM):
    """SmolLM2's chat template with add_generation_prompt=True (system=None: no system turn,
    which the GGUF's template itself never produces; it inserts SYSTEM instead)."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return head + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


TOKENIZATION_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Retrieval-augmented generation combines a retriever with a generator.",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple    spaces   between words",
    "line one\nline two\n\nline four",
    "\n\nstarts with newlines",
    "ends with newline\n",
    "tab\tseparated\tvalues",
    "mixed \t\n whitespace \r\n windows line end",
    "12345 and 3.14159",
    "1 22 333 4444 55555 666666 1234567890",
    "Call 555-0100 in 2024, or +1 (800) 123-4567.",
    "Hello, world! How are you? I'm fine... (really) [yes] {no} <maybe>",
    "don't, I'll, you're, we've, she'd, it's, they're, can't, won't",
    "DON'T SHOUT; I'LL Whisper",
    "café naïve résumé über Straße",
    "中文分词测试：你好，世界！",
    "日本語のテキスト and 한국어",
    "emoji 🙂 and 👍🏽 and 🇫🇷",
    "Greek: αβγ δέλτα Ωμέγα",
    "Русский текст",
    "def add(a, b):\n    return a + b\n",
    "fn main() { println!(\"{}\", x[0] * 2); } // comment",
    "if (x != y && z >= 10) { y += 1; }",
    '{"key": "value", "n": [1, 2, 3]}',
    "https://example.com/path?query=1&b=two#frag",
    "user@example.org",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|>",
    "text before <|im_end|> text after",
    "<|im_start|",
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ALLCAPS lowercase MiXeDcAsE CamelCaseWord snake_case_word",
    "a",
    "",
    "   ",
    "The year 1913: Webster's dictionary defines 'abandon' (v. t.) as to give up.",
]

PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was "
    "constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
    "anniversary of the French Revolution. Although initially criticised by some of France's "
    "leading artists and intellectuals for its design, it has since become a global cultural "
    "icon of France and one of the most recognisable structures in the world."
)

LOGIT_PROMPTS = [
    ("chatml_short", chatml("What is 2+2?")),
    (
        "plain_sentence",
        "The library opened at nine in the morning, and by ten o'clock every seat near the "
        "windows was taken by students preparing for their final exams.",
    ),
    (
        "chatml_passage_question",
        chatml(f"{PASSAGE}\n\nWho designed the Eiffel Tower, and when was it built?"),
    ),
]

GEN_PROMPTS = [
    # With the template's default system turn, the first greedy step is a near-tie ("L" 24.740
    # vs "The" 24.651 in llama.cpp): see "steps"/"min_margin" before calling a mismatch a bug.
    ("capital_of_france", chatml("What is the capital of France?")),
    ("capital_of_france_no_system", chatml("What is the capital of France?", system=None)),
    (
        "passage_question",
        chatml(
            "Answer the question using the passage.\n\nPassage: The Amazon River in South America "
            "is the largest river by discharge volume of water in the world. It flows through "
            "Peru, Colombia and Brazil before emptying into the Atlantic Ocean.\n\n"
            "Question: Into which ocean does the Amazon River flow?"
        ),
    ),
]


# llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist (from its CMake log; not queryable
# at run time).
VENDORED_LLAMA_CPP = {"0.3.36": "llama.cpp 0c1e570 (ggml 0.25.3)"}


def disable_extra_buffer_types():
    """Make Llama() load weights with use_extra_bufts = false (see the module docstring)."""
    default = _llama_c.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    _llama_c.llama_model_default_params = params


def model_metadata(llm):
    meta = dict(llm.metadata)
    keep = {
        k: v
        for k, v in meta.items()
        if not k.startswith("tokenizer.ggml.tokens")
        and not k.startswith("tokenizer.ggml.merges")
        and not k.startswith("tokenizer.ggml.token_type")
        and not k.startswith("tokenizer.ggml.scores")
    }
    vocab = llm._model.vocab
    special = {
        "bos": llama_cpp.llama_vocab_bos(vocab),
        "eos": llama_cpp.llama_vocab_eos(vocab),
        "eot": llama_cpp.llama_vocab_eot(vocab),
        "sep": llama_cpp.llama_vocab_sep(vocab),
        "nl": llama_cpp.llama_vocab_nl(vocab),
        "pad": llama_cpp.llama_vocab_pad(vocab),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
    }
    eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    control = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_control(vocab, t)]

    def piece(t):
        return llm.detokenize([t], special=True).decode("utf-8", errors="replace")

    special["eog"] = eog
    special["control"] = control
    special["pieces"] = {str(t): piece(t) for t in sorted(set(control + eog))}
    return keep, special


def decode(llm, ids, special):
    return llm.detokenize(ids, special=special).decode("utf-8", errors="replace")


def tokenization_cases(vocab_llm):
    cases = []
    for text in TOKENIZATION_TEXTS:
        raw = text.encode("utf-8")
        ids = vocab_llm.tokenize(raw, add_bos=False, special=True)
        ids_ns = vocab_llm.tokenize(raw, add_bos=False, special=False)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "ids_nospecial": ids_ns,
                "ids_add_bos": vocab_llm.tokenize(raw, add_bos=True, special=True),
                "pieces": [decode(vocab_llm, [t], True) for t in ids],
                "pieces_hex": [vocab_llm.detokenize([t], special=True).hex() for t in ids],
                "detokenized": decode(vocab_llm, ids, True),
                "detokenized_nospecial": decode(vocab_llm, ids_ns, False),
                "roundtrip": vocab_llm.detokenize(ids, special=True) == raw,
            }
        )
    return cases


def logsumexp(x):
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m))))


def top_k(row, k):
    # Stable order: by logit descending, then by id ascending (ties are rare but possible).
    order = np.lexsort((np.arange(row.shape[0]), -row))[:k]
    return [int(i) for i in order], [round(float(row[i]), 5) for i in order]


def teacher_forced(llm, name, text, full_last):
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert len(ids) <= N_CTX
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids), :], dtype=np.float64)
    positions = []
    for i in range(len(ids)):
        row = scores[i]
        lse = logsumexp(row)
        tk_ids, tk_logits = top_k(row, TOP_K)
        pos = {
            "pos": i,
            "token": ids[i],
            "logsumexp": round(lse, 5),
            "top_ids": tk_ids,
            "top_logits": tk_logits,
        }
        if i + 1 < len(ids):
            nxt = ids[i + 1]
            pos["next_token"] = nxt
            pos["next_logprob"] = round(float(row[nxt] - lse), 5)
        positions.append(pos)
    out = {"name": name, "text": text, "ids": ids, "n_tokens": len(ids), "positions": positions}
    if full_last:
        out["last_logits"] = [round(float(v), 5) for v in scores[-1]]
    out["sum_next_logprob"] = round(sum(p.get("next_logprob", 0.0) for p in positions), 5)
    return out


def greedy(llm, name, text):
    vocab = llm._model.vocab
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    out_ids = []
    steps = []
    stopped_at_eog = False
    argmax_agrees = True
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        # Cross-check the greedy sampler against the argmax of the logits it sampled from, and
        # keep the top-5 so that a consumer can tell a real divergence from a near-tie.
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        if int(np.argmax(row)) != tok:
            argmax_agrees = False
        tk_ids, tk_logits = top_k(row, 5)
        steps.append(
            {
                "top_ids": tk_ids,
                "top_logits": tk_logits,
                "margin": round(tk_logits[0] - tk_logits[1], 5),
                "logprob": round(float(row[tok] - logsumexp(row)), 5),
            }
        )
        out_ids.append(int(tok))
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            stopped_at_eog = True
            break
        if len(out_ids) >= GEN_TOKENS:
            break
    return {
        "name": name,
        "prompt": text,
        "prompt_ids": ids,
        "ids": out_ids,
        "steps": steps,
        "min_margin": min(st["margin"] for st in steps),
        "text": decode(llm, out_ids, False),
        "text_special": decode(llm, out_ids, True),
        "stopped_at_eog": stopped_at_eog,
        "sampler_matches_argmax": argmax_agrees,
    }


def main():
    default_gguf = os.path.join(
        os.environ.get("ZRAG_HOME", os.path.expanduser("~/.cache/zrag")),
        "models",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=default_gguf)
    ap.add_argument("--out", default="crates/zrag-models/tests/data/smollm2_llamacpp.json")
    ap.add_argument("--extra-bufts", action="store_true", help="keep llama.cpp's AMX/repack buffers (crashes here)")
    args = ap.parse_args()
    if not args.extra_bufts:
        disable_extra_buffer_types()

    vocab_llm = Llama(model_path=args.gguf, vocab_only=True, verbose=False)
    metadata, special = model_metadata(vocab_llm)
    tokenization = tokenization_cases(vocab_llm)
    n_vocab = vocab_llm.n_vocab()
    del vocab_llm

    llm = Llama(
        model_path=args.gguf,
        logits_all=True,
        n_ctx=N_CTX,
        n_batch=N_BATCH,
        n_ubatch=N_BATCH,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        seed=0,
        verbose=False,
    )
    logits = [
        teacher_forced(llm, name, text, full_last=(i == 0))
        for i, (name, text) in enumerate(LOGIT_PROMPTS)
    ]
    generation = [greedy(llm, name, text) for name, text in GEN_PROMPTS]

    golden = {
        "generator": {
            "reference": "llama.cpp via llama-cpp-python",
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp": VENDORED_LLAMA_CPP.get(llama_cpp.__version__, "unknown"),
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip(),
            "gguf": os.path.basename(args.gguf),
            "gguf_size": os.path.getsize(args.gguf),
            "script": "scripts/reference_smollm2.py",
        },
        "settings": {
            "n_ctx": N_CTX,
            "n_batch": N_BATCH,
            "n_threads": N_THREADS,
            "use_extra_bufts": bool(args.extra_bufts),
            "flash_attn": False,
            "top_k": TOP_K,
            "gen_tokens": GEN_TOKENS,
            "tokenize": "tokenize(text.encode(), add_bos=False, special=True|False)",
            "logits": "raw logits (float32 from llama.cpp, rounded to 5 decimals); log-softmax computed in float64",
            "greedy": "temp=0 (llama.cpp greedy sampler), repeat_penalty=1.0; stops after 40 tokens or at an end-of-generation token (included)",
        },
        "n_vocab": n_vocab,
        "metadata": metadata,
        "special_tokens": special,
        "chat_system_default": SYSTEM,
        "tokenization": tokenization,
        "logits": logits,
        "generation": generation,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()

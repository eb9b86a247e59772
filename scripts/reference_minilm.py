#!/usr/bin/env python3
"""Independent reference embeddings for a BERT sentence encoder (default: all-MiniLM-L6-v2).

A deliberately plain numpy implementation, used by crates/zrag-models/tests/reference_minilm.rs
to check zrag's Rust encoder: it shares nothing with it but the model files. It reads
model.safetensors by hand (8-byte little-endian header length, JSON header, raw little-endian
tensors), tokenizes with the Python `tokenizers` package on the same tokenizer.json, and runs
BERT in float64 on one text at a time (so no padding or attention mask is involved), then
pools (mean or CLS, from 1_Pooling/config.json) and L2-normalises like sentence-transformers.

Needs only: pip install numpy tokenizers

Usage:
    python3 scripts/reference_minilm.py [--model-dir DIR] < texts.json > embeddings.json

stdin is a JSON list of strings; stdout is a JSON list of embeddings (lists of floats), in order.
DIR defaults to ${ZRAG_HOME:-~/.cache/zrag}/models/all-MiniLM-L6-v2.
"""

import argparse
import json
import math
import os
import struct
import sys

try:
    import numpy as np
    from tokenizers import Tokenizer
except ImportError as exc:  # pragma: no cover - exercised only on a bare machine
    sys.exit(f"reference_minilm.py needs numpy and tokenizers: pip install numpy tokenizers ({exc})")

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
}


def load_safetensors(path):
    """Returns {name: float64 array} for every floating-point tensor in the file."""
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] == "BF16":
            start, end = info["data_offsets"]
            raw = np.frombuffer(data[base + start : base + end], dtype="<u2").astype(np.uint32)
            array = (raw << 16).view(np.float32)
        else:
            dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
            start, end = info["data_offsets"]
            array = np.frombuffer(data[base + start : base + end], dtype=dtype)
        tensors[name] = array.reshape(info["shape"]).astype(np.float64)
    # Some exports put everything under "bert.".
    if "embeddings.word_embeddings.weight" not in tensors:
        tensors = {k[len("bert.") :]: v for k, v in tensors.items() if k.startswith("bert.")}
    return tensors


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x, kind):
    if kind == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))
    if kind in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if kind == "relu":
        return np.maximum(x, 0.0)
    raise SystemExit(f"unsupported hidden_act {kind!r}")


def layer_norm(x, gamma, beta, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def bert_states(w, config, ids):
    """Token states (n, hidden) for one unpadded sequence of token ids."""
    n = len(ids)
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = hidden // heads
    eps = config.get("layer_norm_eps", 1e-12)
    act = config.get("hidden_act", "gelu")

    def dense(x, prefix):
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    def norm(x, prefix):
        return layer_norm(x, w[prefix + ".weight"], w[prefix + ".bias"], eps)

    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = norm(x, "embeddings.LayerNorm")
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def split_heads(t):
            return t.reshape(n, heads, head_dim).transpose(1, 0, 2)

        q = split_heads(dense(x, p + "attention.self.query"))
        k = split_heads(dense(x, p + "attention.self.key"))
        v = split_heads(dense(x, p + "attention.self.value"))
        probs = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(head_dim))
        context = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
        x = norm(dense(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        inner = gelu(dense(x, p + "intermediate.dense"), act)
        x = norm(dense(inner, p + "output.dense") + x, p + "output.LayerNorm")
    return x


def pooling_mode(model_dir):
    path = os.path.join(model_dir, "1_Pooling", "config.json")
    if not os.path.exists(path):
        return "mean"
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def max_seq_length(model_dir, config):
    path = os.path.join(model_dir, "sentence_bert_config.json")
    n = 256
    if os.path.exists(path):
        with open(path) as f:
            n = json.load(f).get("max_seq_length") or 256
    return min(n, config["max_position_embeddings"])


def main():
    zrag_home = os.environ.get("ZRAG_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "zrag")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-dir", default=os.path.join(zrag_home, "models", "all-MiniLM-L6-v2")
    )
    args = parser.parse_args()

    with open(os.path.join(args.model_dir, "config.json")) as f:
        config = json.load(f)
    weights = load_safetensors(os.path.join(args.model_dir, "model.safetensors"))
    tokenizer = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_length(args.model_dir, config))
    pooling = pooling_mode(args.model_dir)

    texts = json.load(sys.stdin)
    out = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        states = bert_states(weights, config, ids)
        pooled = states[0] if pooling == "cls" else states.mean(axis=0)
        pooled = pooled / max(np.linalg.norm(pooled), 1e-12)
        out.append([float(v) for v in pooled])
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

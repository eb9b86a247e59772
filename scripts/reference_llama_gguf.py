#!/usr/bin/env python3
"""Independent reference for zrag's llama decoder: a float64 numpy forward pass over the
de-quantised weights of a llama-architecture GGUF file (read with the `gguf` package).

Usage: reference_llama_gguf.py MODEL.gguf TOKEN_IDS_JSON
Prints a JSON object {"logits": [[...vocab...] per position]} for the given token ids.
Written from the llama architecture description (RMSNorm, RoPE on adjacent pairs as stored
in GGUF, grouped-query attention, SwiGLU), sharing no code with the Rust implementation.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def main():
    path, ids_json = sys.argv[1], sys.argv[2]
    ids = json.loads(ids_json)
    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("llama.") or key == "general.architecture":
            meta[key] = field.contents()
    assert meta["general.architecture"] == "llama", meta["general.architecture"]
    tensors = {t.name: t for t in reader.tensors}

    def weight(name):
        t = tensors[name]
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)

    hidden = int(meta["llama.embedding_length"])
    n_layers = int(meta["llama.block_count"])
    n_heads = int(meta["llama.attention.head_count"])
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    eps = float(meta["llama.attention.layer_norm_rms_epsilon"])
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    hd = hidden // n_heads
    group = n_heads // n_kv

    emb = weight("token_embd.weight").reshape(-1, hidden)
    out_w = weight("output.weight").reshape(-1, hidden) if "output.weight" in tensors else emb
    x = emb[ids]
    T = len(ids)
    pos = np.arange(T)[:, None]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rms(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v):  # v: [T, heads, hd]; rotate (v[2i], v[2i+1])
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos[:, None, :] - b * sin[:, None, :]
        out[..., 1::2] = a * sin[:, None, :] + b * cos[:, None, :]
        return out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(n_layers):
        p = f"blk.{l}."
        h = rms(x, weight(p + "attn_norm.weight"))
        q = (h @ weight(p + "attn_q.weight").reshape(-1, hidden).T).reshape(T, n_heads, hd)
        k = (h @ weight(p + "attn_k.weight").reshape(-1, hidden).T).reshape(T, n_kv, hd)
        v = (h @ weight(p + "attn_v.weight").reshape(-1, hidden).T).reshape(T, n_kv, hd)
        q, k = rope(q), rope(k)
        att = np.empty((T, n_heads, hd))
        for head in range(n_heads):
            kv = head // group
            s = q[:, head, :] @ k[:, kv, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            att[:, head, :] = s @ v[:, kv, :]
        x = x + att.reshape(T, -1) @ weight(p + "attn_output.weight").reshape(hidden, -1).T
        h = rms(x, weight(p + "ffn_norm.weight"))
        g = h @ weight(p + "ffn_gate.weight").reshape(-1, hidden).T
        u = h @ weight(p + "ffn_up.weight").reshape(-1, hidden).T
        a = g / (1 + np.exp(-g)) * u
        x = x + a @ weight(p + "ffn_down.weight").reshape(hidden, -1).T
    x = rms(x, weight("output_norm.weight"))
    logits = x @ out_w.T
    json.dump({"logits": np.round(logits, 5).tolist()}, sys.stdout)


if __name__ == "__main__":
    main()

"""Writes the shared benchmark data: random unit vectors, float32 little-endian, row-major.

    base.f32     n × dim corpus
    queries.f32  q × dim queries (same distribution, different stream)
    meta.json    {"n", "dim", "queries", "seed"}

Both the faiss script and the Rust bench read these files, so they search identical data.
"""
import argparse
import json
import os

import numpy as np


def unit_rows(rng, rows, dim):
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--seed", type=int, default=20240601)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    meta = {"n": a.n, "dim": a.dim, "queries": a.queries, "seed": a.seed}
    meta_path = os.path.join(a.out, "meta.json")
    base_path = os.path.join(a.out, "base.f32")
    if os.path.exists(meta_path) and os.path.exists(base_path):
        with open(meta_path) as f:
            if json.load(f) == meta and os.path.getsize(base_path) == a.n * a.dim * 4:
                print(f"data in {a.out} is up to date")
                return
    base_rng, query_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(a.seed).spawn(2))
    with open(base_path, "wb") as f:
        for start in range(0, a.n, 100_000):
            unit_rows(base_rng, min(100_000, a.n - start), a.dim).tofile(f)
    unit_rows(query_rng, a.queries, a.dim).tofile(os.path.join(a.out, "queries.f32"))
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    print(f"wrote {a.n} x {a.dim} vectors and {a.queries} queries to {a.out}")


if __name__ == "__main__":
    main()

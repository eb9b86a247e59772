"""faiss-cpu IndexFlatIP on the shared data: queries/s at batch 1 and batch 64.

Writes its top-k (ids int64, scores float32, raw little-endian) next to the data so the Rust
bench can check that both engines return the same rows, and prints one JSON line of results.
"""
import argparse
import json
import os
import time

import faiss
import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch1-reps", type=int, default=1, help="passes over the queries one at a time")
    p.add_argument("--batch64-reps", type=int, default=3)
    a = p.parse_args()

    with open(os.path.join(a.data, "meta.json")) as f:
        meta = json.load(f)
    dim = meta["dim"]
    base = np.fromfile(os.path.join(a.data, "base.f32"), dtype="<f4").reshape(-1, dim)
    queries = np.fromfile(os.path.join(a.data, "queries.f32"), dtype="<f4").reshape(-1, dim)
    faiss.omp_set_num_threads(a.threads)
    index = faiss.IndexFlatIP(dim)
    index.add(base)
    del base

    index.search(queries[:1], a.k)  # warm-up: page in the index once

    t0 = time.perf_counter()
    batch1 = []
    for _ in range(a.batch1_reps):
        batch1 = [index.search(queries[i : i + 1], a.k) for i in range(len(queries))]
    batch1_qps = a.batch1_reps * len(queries) / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    for _ in range(a.batch64_reps):
        scores64, ids64 = index.search(queries[:64], a.k)
    batch64_qps = a.batch64_reps * len(queries[:64]) / (time.perf_counter() - t0)

    ids1 = np.concatenate([ids for _, ids in batch1]).astype("<i8")
    scores1 = np.concatenate([s for s, _ in batch1]).astype("<f4")
    ids1.tofile(os.path.join(a.data, "faiss_batch1_ids.i64"))
    scores1.tofile(os.path.join(a.data, "faiss_batch1_scores.f32"))
    ids64.astype("<i8").tofile(os.path.join(a.data, "faiss_batch64_ids.i64"))
    scores64.astype("<f4").tofile(os.path.join(a.data, "faiss_batch64_scores.f32"))

    print(json.dumps({"engine": "faiss", "version": faiss.__version__, "threads": a.threads,
                      "batch1_qps": batch1_qps, "batch64_qps": batch64_qps}))


if __name__ == "__main__":
    main()

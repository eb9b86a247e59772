#!/usr/bin/env python3
"""hnswlib on the same data and protocol as crates/zrag-index/examples/bench_hnsw.rs: the first
N rows of a raw f32 file as the base, the next Q rows as queries, inner product, M=16,
ef_construction=100, one thread; build time, recall@10 against brute force, queries/s per ef.

Usage: hnswlib_bench.py VECTORS.f32 DIM [N] [Q]
"""
import sys
import time

import hnswlib
import numpy as np

path, dim = sys.argv[1], int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 50000
q = int(sys.argv[4]) if len(sys.argv) > 4 else 500
data = np.fromfile(path, dtype="<f4").reshape(-1, dim)
base, queries = data[:n], data[n:n + q]
truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]

index = hnswlib.Index(space="ip", dim=dim)
index.init_index(max_elements=n, M=16, ef_construction=100, random_seed=100)
index.set_num_threads(1)
t = time.perf_counter()
index.add_items(base, np.arange(n))
print(f"hnswlib {n} x {dim}, M 16, ef_construction 100: built in {time.perf_counter() - t:.1f} s (1 thread)")
for ef in [16, 32, 64, 128, 256]:
    index.set_ef(ef)
    t = time.perf_counter()
    found = 0
    for i in range(q):  # one query at a time, like the Rust side
        labels, _ = index.knn_query(queries[i:i + 1], k=10)
        found += len(set(labels[0]) & set(truth[i]))
    s = time.perf_counter() - t
    print(f"ef {ef:>3}: recall@10 {found / (10 * q):.3f}, {q / s:.0f} queries/s (1 thread)")

#!/usr/bin/env python3
"""hnswlib (0.8.0, PyPI) in the HNSW benchmark: inner-product space, M, ef_construction, build
with --build-threads threads, search with --search-threads threads one query at a time; prints
the JSON lines described in common.py. Run by run.sh with /work/venv-llama/bin/python.

  hnswlib_bench.py --base B --queries Q --truth T --dim 384 --m 16 --ef-construction 100 \
      --build-threads 2 --search-threads 1 --ef 10,16,24,32,48,64,96,128,192,256 [--mode batch|loop]

index_bytes is hnswlib's own serialized size (index_file_size(): vectors, level-0 and upper
links, labels), i.e. what save_index writes.
"""
import importlib.metadata
import time

import hnswlib
import numpy as np

from common import emit, load, log, parse_args, run_searches


def main():
    a = parse_args("hnswlib")
    base, queries, truth = load(a)
    n, q = len(base), len(queries)
    index = hnswlib.Index(space="ip", dim=a.dim)
    index.init_index(max_elements=n, M=a.m, ef_construction=a.ef_construction, random_seed=100)
    ids = np.arange(n)
    t = time.perf_counter()
    index.add_items(base, ids, num_threads=a.build_threads)
    seconds = time.perf_counter() - t
    emit({"engine": "hnswlib", "event": "build", "n": n, "dim": a.dim, "m": a.m,
          "ef_construction": a.ef_construction, "threads": a.build_threads, "seconds": round(seconds, 3),
          "index_bytes": int(index.index_file_size()), "version": f"hnswlib {importlib.metadata.version('hnswlib')}"})
    log(f"hnswlib: built {n} x {a.dim} in {seconds:.1f} s on {a.build_threads} threads")
    index.set_num_threads(a.search_threads)
    k, threads = a.k, a.search_threads

    if a.mode == "batch":
        def search_all():
            labels, _ = index.knn_query(queries, k=k, num_threads=threads)
            return labels
    else:
        def search_all():
            out = np.empty((q, k), np.int64)
            for i in range(q):
                out[i] = index.knn_query(queries[i:i + 1], k=k, num_threads=threads)[0][0]
            return out

    run_searches("hnswlib", a, index.set_ef, search_all, truth)


if __name__ == "__main__":
    main()

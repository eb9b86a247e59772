#!/usr/bin/env python3
"""faiss-cpu IndexHNSWFlat (METRIC_INNER_PRODUCT) in the HNSW benchmark: M, efConstruction, build
with --build-threads OpenMP threads, search with --search-threads OpenMP threads one query at a
time; prints the JSON lines described in common.py. Run by run.sh with the system python3.

  faiss_hnsw_bench.py --base B --queries Q --truth T --dim 384 --m 16 --ef-construction 100 \
      --build-threads 2 --search-threads 1 --ef 10,16,24,32,48,64,96,128,192,256 [--mode batch|loop]

With one OpenMP thread, IndexHNSW::search over a batch runs the queries one after another (the
same as a loop of single-query calls, without the Python overhead). index_bytes is the size of
faiss.serialize_index (the vectors plus the graph), i.e. what write_index writes.
"""
import time

import faiss
import numpy as np

from common import emit, load, log, parse_args, run_searches


def main():
    a = parse_args("faiss")
    base, queries, truth = load(a)
    n, q = len(base), len(queries)
    index = faiss.IndexHNSWFlat(a.dim, a.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = a.ef_construction
    faiss.omp_set_num_threads(a.build_threads)
    t = time.perf_counter()
    index.add(base)
    seconds = time.perf_counter() - t
    index_bytes = len(faiss.serialize_index(index))
    emit({"engine": "faiss", "event": "build", "n": n, "dim": a.dim, "m": a.m,
          "ef_construction": a.ef_construction, "threads": a.build_threads, "seconds": round(seconds, 3),
          "index_bytes": int(index_bytes), "version": f"faiss-cpu {faiss.__version__}"})
    log(f"faiss: built {n} x {a.dim} in {seconds:.1f} s on {a.build_threads} threads")
    faiss.omp_set_num_threads(a.search_threads)
    k, threads = a.k, a.search_threads

    if a.mode == "batch":
        def search_all():
            return index.search(queries, k)[1]
    else:
        def search_all():
            out = np.empty((q, k), np.int64)
            for i in range(q):
                out[i] = index.search(queries[i:i + 1], k)[1][0]
            return out

    def set_ef(ef):
        index.hnsw.efSearch = ef

    run_searches("faiss", a, set_ef, search_all, truth)


if __name__ == "__main__":
    main()

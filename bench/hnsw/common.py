"""Shared by hnswlib_bench.py and faiss_hnsw_bench.py: the command line, data loading, recall and
the timing protocol, so that both engines (and the Rust example, which mirrors this) are measured
the same way. Needs only numpy.

Protocol (README.md):
  build    time of inserting all N rows into an empty index with --build-threads threads
           (index construction parameters M, efConstruction; nothing else timed).
  search   for each ef: one untimed warm-up pass over all Q queries, which also gives recall@k
           (k = 10: |returned top-k ∩ exact top-k| / k, averaged over the queries); then timed
           passes over all Q queries until at least --min-passes passes and --min-seconds seconds.
           The whole ef list is measured --rounds times (round-robin, so a burst of other load on
           the shared machine does not hit a single ef); qps = Q / (fastest pass over all rounds),
           the ann-benchmarks convention ("best of"), qps_mean the mean over all timed passes.
           Every query is searched on its own, one after another, on --search-threads (= 1)
           threads. --mode batch hands the whole query matrix to the library in one call with a
           one-thread pool: the library then loops over the queries in C++, one at a time
           (default, no Python overhead, comparable to a Rust loop); --mode loop calls the library
           once per query from Python (adds the interpreter + binding overhead per query).
  output   one JSON object per line on stdout:
           {"engine", "event": "build", "n", "dim", "threads", "seconds", "index_bytes", ...}
           {"engine", "event": "search", "ef", "k", "recall", "qps", "threads", ...}
           Further keys are informational; plot.py reads only the ones above.
"""
import argparse
import json
import sys
import time

import numpy as np

DEFAULT_EF = "10,16,24,32,48,64,96,128,192,256"


def parse_args(engine):
    ap = argparse.ArgumentParser(description=f"{engine} HNSW benchmark (bench/hnsw/README.md)")
    ap.add_argument("--base", required=True, help="N x dim little-endian f32")
    ap.add_argument("--queries", required=True, help="Q x dim little-endian f32")
    ap.add_argument("--truth", required=True, help="Q x T little-endian int32, exact ids by inner product")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--search-threads", type=int, default=1)
    ap.add_argument("--ef", default=DEFAULT_EF, help="comma-separated search ef values")
    ap.add_argument("--k", type=int, default=10, help="recall@k")
    ap.add_argument("--min-passes", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mode", choices=["batch", "loop"], default="batch")
    a = ap.parse_args()
    a.ef = [int(x) for x in a.ef.split(",") if x]
    return a


def load(a):
    base = np.fromfile(a.base, dtype="<f4").reshape(-1, a.dim)
    queries = np.fromfile(a.queries, dtype="<f4").reshape(-1, a.dim)
    truth = np.fromfile(a.truth, dtype="<i4").reshape(len(queries), -1)
    if truth.shape[1] < a.k:
        sys.exit(f"truth has {truth.shape[1]} ids per query, need at least k = {a.k}")
    return np.ascontiguousarray(base), np.ascontiguousarray(queries), truth[:, :a.k]


def recall(found, truth):
    """Mean |found[i, :k] ∩ truth[i, :k]| / k; -1 (missing) never matches."""
    k = truth.shape[1]
    hits = (found[:, :k, None] == truth[:, None, :]).any(-1).sum()
    return float(hits) / truth.size


def emit(obj):
    print(json.dumps(obj), flush=True)


def run_searches(engine, a, set_ef, search_all, truth):
    """The search protocol above. set_ef(ef) configures the index, search_all() searches all
    queries once and returns their top-k ids (Q x k)."""
    q = len(truth)
    recalls, times = {}, {ef: [] for ef in a.ef}
    for rnd in range(a.rounds):
        for ef in a.ef:
            set_ef(ef)
            found = search_all()  # untimed warm-up pass
            if rnd == 0:
                recalls[ef] = recall(found, truth)
            start = time.perf_counter()
            passes = 0
            while passes < a.min_passes or time.perf_counter() - start < a.min_seconds:
                t = time.perf_counter()
                search_all()
                times[ef].append(time.perf_counter() - t)
                passes += 1
            log(f"{engine} round {rnd + 1}/{a.rounds} ef {ef:>3}: recall@{a.k} {recalls[ef]:.4f}, "
                f"{q / min(times[ef][-passes:]):,.0f} q/s (best of {passes})")
    for ef in a.ef:
        t = times[ef]
        emit({"engine": engine, "event": "search", "ef": ef, "k": a.k, "recall": round(recalls[ef], 5),
              "qps": round(q / min(t), 1), "qps_mean": round(q * len(t) / sum(t), 1), "passes": len(t),
              "threads": a.search_threads, "mode": a.mode, "q": q})


def log(*args):
    print(*args, file=sys.stderr, flush=True)

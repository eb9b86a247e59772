"""faiss-cpu on the shared data at three precisions: IndexFlatIP (f32), IndexScalarQuantizer
QT_fp16 and QT_8bit (inner product), plus IndexRefineFlat over the QT_8bit index (faiss's own
"scan int8, re-score a shortlist in f32", the same scheme as zrag's int8 search).

Queries/s at batch 1 (the 64 queries one at a time) and batch 64, recall@10 against the exact
IndexFlatIP result, and bytes per vector of the scanned codes (sa_code_size). With --real, also
recall@10 on real MiniLM vectors (a zrag collection's segments; every floor(n/1000)-th row held
out as a query, exactly as the Rust bench does). Prints one JSON line.
"""
import argparse
import glob
import json
import os
import time

import faiss
import numpy as np


def qps(reps, n_queries, fn):
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn()
    return reps * n_queries / (time.perf_counter() - t0), out


def recall(ids, truth):
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))


def batches(index, queries, k, reps1, reps64):
    index.search(queries[:1], k)  # warm-up
    qps1, results = qps(reps1, len(queries), lambda: [index.search(queries[i:i + 1], k)[1] for i in range(len(queries))])
    ids1 = np.concatenate(results)
    qps64, (_, ids64) = qps(reps64, len(queries), lambda: index.search(queries, k))
    return (qps1, ids1), (qps64, ids64)


def real_vectors(collection, dim):
    files = sorted(glob.glob(os.path.join(collection, "segments", "*", "vectors.f32")))
    rows = np.concatenate([np.fromfile(f, dtype="<f4").reshape(-1, dim) for f in files])
    stride = len(rows) // 1000
    held_out = np.zeros(len(rows), dtype=bool)
    held_out[np.arange(1000) * stride] = True
    return np.ascontiguousarray(rows[~held_out]), np.ascontiguousarray(rows[held_out])


def scalar_quantizer(dim, qtype, base):
    index = faiss.IndexScalarQuantizer(dim, qtype, faiss.METRIC_INNER_PRODUCT)
    index.train(base)
    index.add(base)
    return index


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch1-reps", type=int, default=1)
    p.add_argument("--batch64-reps", type=int, default=3)
    p.add_argument("--shortlist", type=int, default=30,
                   help="IndexRefineFlat re-scores shortlist rows (k_factor = shortlist / k); 0 = no refine")
    p.add_argument("--real", help="a zrag collection directory whose segment vectors give the real data")
    a = p.parse_args()
    faiss.omp_set_num_threads(a.threads)

    with open(os.path.join(a.data, "meta.json")) as f:
        dim = json.load(f)["dim"]
    base = np.fromfile(os.path.join(a.data, "base.f32"), dtype="<f4").reshape(-1, dim)
    queries = np.fromfile(os.path.join(a.data, "queries.f32"), dtype="<f4").reshape(-1, dim)[:64]
    k = a.k
    rows = []

    def report(precision, index_name, measured, truth, bytes_per_vector):
        for batch, (rate, ids) in zip((1, 64), measured):
            rows.append({"precision": precision, "index": index_name, "batch": batch, "qps": rate,
                         "recall": recall(ids, truth), "bytes_per_vector": bytes_per_vector})

    flat = faiss.IndexFlatIP(dim)
    flat.add(base)
    measured = batches(flat, queries, k, a.batch1_reps, a.batch64_reps)
    truth = measured[1][1]
    report("f32", "IndexFlatIP", measured, truth, 4 * dim)
    del flat

    sq8 = None
    for precision, name, qtype in (("f16", "SQfp16", faiss.ScalarQuantizer.QT_fp16),
                                   ("int8", "SQ8", faiss.ScalarQuantizer.QT_8bit)):
        index = scalar_quantizer(dim, qtype, base)
        report(precision, name, batches(index, queries, k, a.batch1_reps, a.batch64_reps), truth, index.sa_code_size())
        if precision == "int8":
            sq8 = index
        else:
            del index
    if a.shortlist:
        refine = faiss.IndexRefineFlat(sq8, faiss.swig_ptr(base))
        refine.k_factor = a.shortlist / k
        report("int8+refine", "IndexRefineFlat(SQ8)", batches(refine, queries, k, a.batch1_reps, a.batch64_reps),
               truth, sq8.sa_code_size())
        del refine
    del sq8

    real = {}
    if a.real:
        rbase, rqueries = real_vectors(a.real, dim)
        flat = faiss.IndexFlatIP(dim)
        flat.add(rbase)
        _, rtruth = flat.search(rqueries, k)
        for precision, qtype in (("f16", faiss.ScalarQuantizer.QT_fp16), ("int8", faiss.ScalarQuantizer.QT_8bit)):
            index = scalar_quantizer(dim, qtype, rbase)
            real[precision] = recall(index.search(rqueries, k)[1], rtruth)
            if precision == "int8" and a.shortlist:
                refine = faiss.IndexRefineFlat(index, faiss.swig_ptr(rbase))
                refine.k_factor = a.shortlist / k
                real["int8+refine"] = recall(refine.search(rqueries, k)[1], rtruth)

    print(json.dumps({"engine": "faiss", "version": faiss.__version__, "threads": a.threads, "n": len(base),
                      "dim": dim, "k": k, "shortlist": a.shortlist, "rows": rows, "real_recall": real}))


if __name__ == "__main__":
    main()

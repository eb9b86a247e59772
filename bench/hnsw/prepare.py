#!/usr/bin/env python3
"""Data for the HNSW benchmark (bench/hnsw/run.sh): N x 384 base vectors, Q query vectors and the
exact top-100 of every query, all derived deterministically (seeded) from the reverse-dictionary
collection.

Needs numpy and faiss-cpu (system python3 here) and, for the queries, the `zrag` binary.

Base vectors
    The real rows are the MiniLM document embeddings of the reverse-dictionary collection:
    `bench-out/revdict.zrag/segments/seg-*/vectors.f32` concatenated in segment-id order
    (tombstoned rows dropped, exact duplicate rows dropped, first copy kept). If N is smaller than
    the number of real rows (or --max-real is given), a seeded sample of them is used.

    The rest, up to N, is synthetic, generated so that it stays on the data's manifold
    (a local, SMOTE-like recipe; recipe version "local-dirichlet-v2"):
      * parent p: a real row drawn uniformly (with replacement);
      * neighbourhood: p and its 10 exact nearest real rows by inner product, n_1..n_10;
      * centre c = normalise(sum_k w_k x_k) with w ~ Dirichlet(0.3, ..., 0.3) over those 11 rows,
        i.e. a random point inside the local neighbourhood, usually close to one of its members;
      * noise g ~ N(0, S), S = covariance of the real rows (data-shaped, not isotropic), scaled by
        the local spread of p: l_p = (1 - s10_p) / median(1 - s10), s10_p = similarity of p to its
        10th neighbour (clipped to [0.25, 4]); sparse regions get more noise, dense regions less;
      * y = normalise(c + 0.5 * l_p * g).
    The noise scale was tuned on the final 1M mix (131k real + 869k synthetic) for two things at
    once: (1) real and synthetic rows have similar similarities to their nearest and 10th nearest
    other row of the whole base (median top-1 0.87 real / 0.83 synthetic, top-10 0.74 / 0.75),
    and (2) the real queries treat synthetic rows almost like real ones: real rows are 19% of the
    queries' exact top-10 against 13% of the base. More noise (0.85) matches a synthetic row's
    distance to the real rows to a real row's leave-one-out distance, but makes the synthetic rows
    visibly less query-like (real rows 53% of the top-10) and sparser than the real ones; less
    noise makes near-duplicates. `meta.json` and the output record both checks.

    The rows of the base are then shuffled (seeded), so real and synthetic rows are interleaved.
    `origin.i32` says where each row came from: r >= 0 is real row r (index into the de-duplicated
    real rows), -1 - p is a synthetic row with parent p.

Queries
    Q query texts from `bench-out/revdict/queries.jsonl`, a seeded sample of the ids that have
    test qrels (topped up from the other ids if there are too few), embedded with E_Q by
    `zrag embed --as query --json` (100 texts per call). If the binary is missing or fails, Q real
    rows are held out of the base and used as queries instead (meta.json: "queries": "held-out").

Outputs (in --out)
    base.f32      N x dim little-endian f32
    queries.f32   Q x dim little-endian f32
    truth.i32     Q x 100 little-endian int32: exact top-100 ids by inner product (faiss IndexFlatIP)
    truth.f32     Q x 100 the matching inner products
    origin.i32    N int32, see above
    query_ids.txt the query ids, one a line, in the order of queries.f32
    meta.json     N, Q, dim, seed, recipe, sha256 of inputs and outputs, the neighbour check

The exact 10-NN of the real rows (needed by the recipe, about 4 minutes on 2 idle cores) is cached
in `bench-out/hnsw1m/cache/` keyed by the sha256 of the real rows.

Usage: prepare.py [--n 1000000] [--q 1000] [--seed 20240604] [--out DIR] [--force]
"""
import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import time

import faiss
import numpy as np

RECIPE = "local-dirichlet-v2"
K_NEIGHBOURS = 10
DIRICHLET_ALPHA = 0.3
NOISE_SCALE = 0.5
LOCAL_CLIP = (0.25, 4.0)
TRUTH_K = 100
PCT = [1, 10, 25, 50, 75, 90, 99]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def sha256_array(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def normalise(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def load_real(collection, dim):
    """Rows of the collection in segment-id order, without tombstoned rows. Returns (X, doc_ids,
    input description)."""
    manifest = json.load(open(os.path.join(collection, "MANIFEST")))
    if manifest["embedding"]["dim"] != dim:
        sys.exit(f"collection dim {manifest['embedding']['dim']} != --dim {dim}")
    segments = sorted(manifest["segments"], key=lambda s: int(s["id"].split("-")[1]))
    parts, doc_ids, inputs = [], [], []
    for seg in segments:
        d = os.path.join(collection, "segments", seg["id"])
        v = np.fromfile(os.path.join(d, "vectors.f32"), dtype="<f4").reshape(-1, dim)
        assert len(v) == seg["rows"], (seg["id"], len(v), seg["rows"])
        ids = [json.loads(line)["doc_id"] for line in open(os.path.join(d, "chunks.jsonl"))]
        assert len(ids) == len(v)
        keep = np.ones(len(v), bool)
        tomb = seg.get("tombstones")
        if tomb:
            name = tomb["name"]
            dead = np.fromfile(os.path.join(collection, "tombstones", name), dtype="<u4")
            keep[dead] = False
        parts.append(v[keep])
        doc_ids += [i for i, k in zip(ids, keep) if k]
        inputs.append({"segment": seg["id"], "rows": int(keep.sum()),
                       "crc32": seg["files"]["vectors.f32"]["crc32"]})
    return np.concatenate(parts), doc_ids, {"model": manifest["embedding"], "segments": inputs}


def dedup(X):
    """Drop exact duplicate rows (keep the first), so that the exact top-k is unambiguous."""
    _, first = np.unique(X, axis=0, return_index=True)
    keep = np.sort(first)
    return keep


def real_knn(X, k, cache_dir):
    """Exact k nearest other real rows by inner product (self excluded), cached."""
    key = sha256_array(X)[:16]
    path = os.path.join(cache_dir, f"real_knn{k}-{key}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return z["ids"], z["sims"]
    log(f"exact {k}-NN of the {len(X)} real rows (cached in {path}) ...")
    t = time.time()
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    ids = np.empty((len(X), k), np.int32)
    sims = np.empty((len(X), k), np.float32)
    block = 4096
    for s in range(0, len(X), block):
        D, I = index.search(X[s:s + block], k + 1)
        for r in range(len(I)):
            row = s + r
            m = I[r] != row
            if m.all():  # self not in the top k+1 (ties): drop the last
                m[-1] = False
            ids[row], sims[row] = I[r][m], D[r][m]
        if (s // block) % 8 == 0:
            log(f"  {s + len(I)}/{len(X)} rows, {time.time() - t:.0f} s")
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path + ".tmp.npz", ids=ids, sims=sims)
    os.replace(path + ".tmp.npz", path)
    log(f"  done in {time.time() - t:.0f} s")
    return ids, sims


def synthesize(X, nn_ids, nn_sims, count, rng, block=16384):
    """`count` synthetic rows by the recipe in the module doc. Returns (Y, parents)."""
    dim = X.shape[1]
    mean = X.mean(0, dtype=np.float64)
    cov = np.cov((X - mean).T.astype(np.float64))
    evals, evecs = np.linalg.eigh(cov)
    L = (evecs * np.sqrt(np.clip(evals, 0, None))).astype(np.float32)  # g = L z ~ N(0, cov)
    spread = 1.0 - nn_sims[:, K_NEIGHBOURS - 1].astype(np.float64)
    local = np.clip(spread / np.median(spread), *LOCAL_CLIP).astype(np.float32)
    parents = rng.integers(0, len(X), count)
    Y = np.empty((count, dim), np.float32)
    for s in range(0, count, block):
        p = parents[s:s + block]
        n = len(p)
        group = np.concatenate([p[:, None], nn_ids[p, :K_NEIGHBOURS]], 1)  # n x 11
        w = rng.dirichlet(np.full(K_NEIGHBOURS + 1, DIRICHLET_ALPHA), n).astype(np.float32)
        centre = np.einsum("nk,nkd->nd", w, X[group])
        centre = normalise(centre)
        z = rng.standard_normal((n, dim), dtype=np.float32)
        Y[s:s + n] = normalise(centre + (NOISE_SCALE * local[p])[:, None] * (z @ L.T))
    return Y, parents


def percentiles(a):
    return [round(float(x), 3) for x in np.percentile(a, PCT)]


def top_sims(index, rows, self_ids, k):
    """Similarities of `rows` to their k nearest base rows other than themselves."""
    D, I = index.search(rows, k + 1)
    out = np.empty((len(rows), k), np.float32)
    for r in range(len(rows)):
        m = I[r] != self_ids[r]
        if m.all():
            m[-1] = False
        out[r] = D[r][m]
    return out


def read_queries(path, qrels, q, rng):
    texts = {}
    for line in open(path):
        o = json.loads(line)
        texts[o["_id"]] = o["text"]
    test_ids = []
    seen = set()
    for i, line in enumerate(open(qrels)):
        qid = line.split("\t")[0]
        if i == 0 and qid == "query-id":
            continue
        if qid in texts and qid not in seen:
            seen.add(qid)
            test_ids.append(qid)
    test_ids.sort()
    chosen = list(rng.choice(test_ids, min(q, len(test_ids)), replace=False))
    if len(chosen) < q:
        rest = sorted(set(texts) - set(chosen))
        chosen += list(rng.choice(rest, q - len(chosen), replace=False))
    return chosen, [texts[i] for i in chosen]


def embed_queries(zrag, texts, dim, model_name, threads):
    out = []
    for s in range(0, len(texts), 100):
        batch = texts[s:s + 100]
        r = subprocess.run([zrag, "embed", "--as", "query", "--json", "--threads", str(threads), "--", *batch],
                           capture_output=True, text=True, check=True)
        o = json.loads(r.stdout)
        if o["dim"] != dim or o["model"] != model_name:
            raise RuntimeError(f"zrag embed gave model {o['model']} dim {o['dim']}, "
                               f"collection has {model_name} dim {dim}")
        if len(o["embeddings"]) != len(batch):
            raise RuntimeError("zrag embed returned a different number of embeddings")
        out += o["embeddings"]
        log(f"  embedded {len(out)}/{len(texts)} queries")
    return normalise(np.asarray(out, dtype=np.float32))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--q", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=20240604)
    ap.add_argument("--max-real", type=int, default=0, help="use at most this many real rows (0: all)")
    ap.add_argument("--collection", default="bench-out/revdict.zrag")
    ap.add_argument("--queries-jsonl", default="bench-out/revdict/queries.jsonl")
    ap.add_argument("--qrels", default="bench-out/revdict/qrels/test.tsv")
    ap.add_argument("--zrag", default="target/release/zrag")
    ap.add_argument("--cache", default="bench-out/hnsw1m/cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-rows", type=int, default=2000, help="rows per kind in the neighbour check")
    ap.add_argument("--out", default="bench-out/hnsw1m")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    faiss.omp_set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    meta_path = os.path.join(a.out, "meta.json")
    want = {"n": a.n, "q": a.q, "dim": a.dim, "seed": a.seed, "max_real": a.max_real, "recipe": RECIPE}
    if not a.force and os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        sizes_ok = all(os.path.exists(os.path.join(a.out, f)) and os.path.getsize(os.path.join(a.out, f)) == size
                       for f, size in ((f, o["bytes"]) for f, o in meta["outputs"].items()))
        if all(meta.get(k) == v for k, v in want.items()) and sizes_ok:
            log(f"{a.out}: data up to date (N={a.n}, Q={a.q}); --force to rebuild")
            return
    t0 = time.time()
    rng = np.random.default_rng(a.seed)

    # ---- real rows
    X, doc_ids, inputs = load_real(a.collection, a.dim)
    keep = dedup(X)
    log(f"real rows: {len(X)}, {len(X) - len(keep)} exact duplicates dropped")
    X, doc_ids = np.ascontiguousarray(X[keep]), [doc_ids[i] for i in keep]
    real_sha = sha256_array(X)

    # ---- queries
    qids, qtexts = read_queries(a.queries_jsonl, a.qrels, a.q, rng)
    queries_kind = "zrag-embed"
    try:
        log(f"embedding {len(qtexts)} queries with {a.zrag} embed --as query")
        Qv = embed_queries(a.zrag, qtexts, a.dim, inputs["model"]["name"], a.threads)
        zrag_sha = sha256_file(a.zrag)
        held_out = np.zeros(0, np.int64)
    except (OSError, subprocess.CalledProcessError, RuntimeError, ValueError) as e:
        log(f"WARNING: zrag embed failed ({e}); holding out {a.q} real rows as queries instead")
        queries_kind, zrag_sha = "held-out", None
        held_out = np.sort(rng.choice(len(X), a.q, replace=False))
        Qv = X[held_out].copy()
        qids = [f"row:{i}" for i in held_out]
    available = np.setdiff1d(np.arange(len(X)), held_out)

    # sanity check of the query embeddings: are the qrels documents found among the real rows?
    sanity = None
    if queries_kind == "zrag-embed":
        rel = {}
        for line in open(a.qrels):
            f = line.rstrip("\n").split("\t")
            if len(f) >= 2 and f[0] != "query-id":
                rel.setdefault(f[0], set()).add(f[1])
        index = faiss.IndexFlatIP(a.dim)
        index.add(X)
        _, I = index.search(Qv, 10)
        with_rel = [r for r, q in enumerate(qids) if q in rel]
        hit = sum(any(doc_ids[j] in rel[qids[r]] for j in I[r]) for r in with_rel)
        sanity = {"queries_with_qrels": len(with_rel), "relevant_doc_in_exact_top10": round(hit / max(1, len(with_rel)), 4)}
        log(f"query sanity: a relevant document is in the exact top-10 of the real rows for "
            f"{sanity['relevant_doc_in_exact_top10']:.1%} of {len(with_rel)} queries")
        del index

    # ---- base = real (all, or a sample) + synthetic
    n_real = min(a.n, len(available), a.max_real or len(available))
    real_rows = np.sort(rng.choice(available, n_real, replace=False)) if n_real < len(available) else available
    n_syn = a.n - n_real
    parts, origin = [X[real_rows]], [real_rows.astype(np.int64)]
    loo_check = None
    if n_syn:
        # parents and neighbourhoods come from all real rows not held out as queries
        Xp = np.ascontiguousarray(X[available])
        nn_ids, nn_sims = real_knn(Xp, K_NEIGHBOURS, a.cache)
        log(f"synthesizing {n_syn} rows ({RECIPE}) ...")
        t = time.time()
        Y, parents = synthesize(Xp, nn_ids, nn_sims, n_syn, rng)
        log(f"  done in {time.time() - t:.0f} s")
        parts.append(Y)
        origin.append(-1 - available[parents])
        # tuning check: synthetic rows vs the real rows, against real rows vs the other real rows
        index = faiss.IndexFlatIP(a.dim)
        index.add(Xp)
        m = min(a.check_rows, n_syn, len(Xp))
        sample_real = rng.choice(len(Xp), m, replace=False)
        sample_syn = rng.choice(n_syn, m, replace=False)
        D_syn, _ = index.search(Y[sample_syn], K_NEIGHBOURS)
        loo_check = {
            "what": "similarity to the nearest / 10th nearest real row: real rows (leave-one-out) vs synthetic rows",
            "percentiles": PCT,
            "real_top1": percentiles(nn_sims[sample_real, 0]), "synthetic_top1": percentiles(D_syn[:, 0]),
            "real_top10": percentiles(nn_sims[sample_real, 9]), "synthetic_top10": percentiles(D_syn[:, 9]),
        }
        del index, Xp
    base = np.concatenate(parts)
    origin = np.concatenate(origin)
    perm = rng.permutation(a.n)
    base, origin = np.ascontiguousarray(base[perm]), origin[perm].astype(np.int32)
    del parts

    # ---- exact truth, and the neighbour check against the whole base
    log(f"exact top-{TRUTH_K} of {len(Qv)} queries over {a.n} rows ...")
    index = faiss.IndexFlatIP(a.dim)
    index.add(base)
    D, I = index.search(Qv, TRUTH_K)
    truth, truth_sims = I.astype(np.int32), D.astype(np.float32)
    base_check = None
    if n_syn:
        real_pos, syn_pos = np.flatnonzero(origin >= 0), np.flatnonzero(origin < 0)
        m = min(a.check_rows, len(real_pos), len(syn_pos))
        rp, sp = rng.choice(real_pos, m, replace=False), rng.choice(syn_pos, m, replace=False)
        Sr, Ss = top_sims(index, base[rp], rp, 10), top_sims(index, base[sp], sp, 10)
        base_check = {
            "what": "similarity of a row to its nearest / 10th nearest other row of the whole base",
            "percentiles": PCT,
            "real_top1": percentiles(Sr[:, 0]), "synthetic_top1": percentiles(Ss[:, 0]),
            "real_top10": percentiles(Sr[:, 9]), "synthetic_top10": percentiles(Ss[:, 9]),
        }
    qcheck = {"what": "query similarity to its 1st / 10th / 100th exact neighbour in the base", "percentiles": PCT,
              "top1": percentiles(truth_sims[:, 0]), "top10": percentiles(truth_sims[:, 9]),
              "top100": percentiles(truth_sims[:, 99]),
              "real_share_of_top10": round(float((origin[truth[:, :10]] >= 0).mean()), 4)}
    del index

    # ---- write
    outputs = {"base.f32": base, "queries.f32": Qv.astype("<f4"), "truth.i32": truth.astype("<i4"),
               "truth.f32": truth_sims.astype("<f4"), "origin.i32": origin.astype("<i4")}
    meta = dict(want)
    meta.update({
        "n_real": int(n_real), "n_synthetic": int(n_syn), "n_real_available": int(len(X)),
        "queries": queries_kind, "truth_k": TRUTH_K, "metric": "inner product (all rows L2-normalised)",
        "recipe_text": (
            "synthetic row: parent p uniform over real rows; w ~ Dirichlet(0.3 x 11) over p and its 10 exact "
            "nearest real rows; c = normalise(sum w_k x_k); g ~ N(0, covariance of the real rows); "
            "l_p = clip((1 - s10_p) / median(1 - s10), 0.25, 4) with s10_p the similarity of p to its 10th "
            "neighbour; y = normalise(c + 0.5 * l_p * g). Rows shuffled with the seed."),
        "recipe_params": {"k": K_NEIGHBOURS, "dirichlet_alpha": DIRICHLET_ALPHA, "noise_scale": NOISE_SCALE,
                          "local_clip": LOCAL_CLIP},
        "inputs": {
            "collection": a.collection, "embedding": inputs["model"], "segments": inputs["segments"],
            "real_rows_sha256": real_sha, "duplicates_dropped": int(sum(s["rows"] for s in inputs["segments"]) - len(X)),
            "queries_jsonl": a.queries_jsonl, "queries_jsonl_sha256": sha256_file(a.queries_jsonl),
            "qrels": a.qrels, "qrels_sha256": sha256_file(a.qrels),
            "zrag_binary": a.zrag if zrag_sha else None, "zrag_binary_sha256": zrag_sha,
        },
        "query_sanity": sanity,
        "neighbour_check_vs_real_rows": loo_check,
        "neighbour_check_vs_base": base_check,
        "query_check": qcheck,
        "numpy": np.__version__, "faiss": faiss.__version__,
        "seconds": round(time.time() - t0, 1),
        "outputs": {},
    })
    for name, arr in outputs.items():
        path = os.path.join(a.out, name)
        arr.tofile(path + ".tmp")
        os.replace(path + ".tmp", path)
        meta["outputs"][name] = {"bytes": os.path.getsize(path), "shape": list(arr.shape), "sha256": sha256_array(arr)}
    with open(os.path.join(a.out, "query_ids.txt"), "w") as f:
        f.write("".join(f"{q}\n" for q in qids))
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)

    log(f"wrote {a.out}: N={a.n} ({n_real} real, {n_syn} synthetic), Q={len(Qv)} ({queries_kind}), "
        f"{time.time() - t0:.0f} s")
    for title, c in (("vs real rows", loo_check), ("vs whole base", base_check)):
        if c:
            log(f"neighbour check {title} ({c['what']}), percentiles {PCT}:")
            for key in ("real_top1", "synthetic_top1", "real_top10", "synthetic_top10"):
                log(f"  {key:16s} {c[key]}")
    log(f"queries: top1 {qcheck['top1']}, top10 {qcheck['top10']}, "
        f"real rows are {qcheck['real_share_of_top10']:.1%} of the true top-10 (base: {n_real / a.n:.1%})")


if __name__ == "__main__":
    main()

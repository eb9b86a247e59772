#!/usr/bin/env python3
"""Side-by-side table of the embedding benchmark: zrag vs the Python references.

Reads DIR/reference-results.json (reference.py run) and DIR/zrag-results.json (the
Rust example bench_embed), plus the embeddings DIR/<engine>-<workload>.npy (reference,
float32 n x 384) and DIR/<engine>-<workload>.f32 (zrag, raw little-endian float32
n x 384), all in workload input order. Writes DIR/summary.json and prints a markdown
table. Throughput ratios are sentences/s over the reference engine's on the same
workload; cosines are per text, then min / mean over the workload.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

DIM = 384
WORKLOAD_ORDER = ("query16", "passage128", "long256")


def load_results(path: pathlib.Path, required: bool) -> list[dict]:
    if not path.is_file():
        if required:
            sys.exit(f"error: {path} not found")
        print(f"warning: {path} not found; showing the reference engines only", file=sys.stderr)
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        sys.exit(f"error: {path}: expected a JSON list of result records")
    return data


def load_embeddings(out_dir: pathlib.Path, engine: str, workload: str, n: int) -> np.ndarray | None:
    npy = out_dir / f"{engine}-{workload}.npy"
    raw = out_dir / f"{engine}-{workload}.f32"
    if npy.is_file():
        a = np.load(npy)
    elif raw.is_file():
        a = np.fromfile(raw, dtype="<f4")
        if a.size % DIM:
            sys.exit(f"error: {raw}: {a.size} floats is not a multiple of {DIM}")
        a = a.reshape(-1, DIM)
    else:
        return None
    a = np.asarray(a, dtype=np.float32)
    if a.shape != (n, DIM):
        sys.exit(f"error: embeddings of {engine}/{workload} have shape {a.shape}, expected ({n}, {DIM})")
    if not np.isfinite(a).all():
        sys.exit(f"error: embeddings of {engine}/{workload} contain NaN/inf")
    return a


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return np.sum(a.astype(np.float64) * b, axis=1) / np.maximum(na * nb, 1e-30)


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="bench-out/embed", help="the --out-dir of both runs")
    ap.add_argument("--allow-missing-zrag", action="store_true", help="no error when zrag-results.json is missing")
    ap.add_argument("--min-cosine", type=float, default=0.0,
                    help="exit 1 if a zrag engine's min cosine vs st is below this (0: never)")
    args = ap.parse_args()
    out_dir = pathlib.Path(args.dir)

    ref = load_results(out_dir / "reference-results.json", required=True)
    zrag = load_results(out_dir / "zrag-results.json", required=not args.allow_missing_zrag)
    for r in zrag:
        r["_side"] = "zrag"
    for r in ref:
        r["_side"] = "reference"
    allrec = ref + zrag
    by = {(r["workload"], r["engine"]): r for r in allrec}
    workloads = [w for w in WORKLOAD_ORDER if any(r["workload"] == w for r in allrec)]
    workloads += sorted({r["workload"] for r in allrec} - set(workloads))

    problems: list[str] = []
    rows = []
    emb_cache: dict[tuple[str, str], np.ndarray | None] = {}

    def emb(w: str, e: str) -> np.ndarray | None:
        if (w, e) not in emb_cache:
            rec = by.get((w, e))
            emb_cache[(w, e)] = None if rec is None else load_embeddings(out_dir, e, w, rec["texts"])
        return emb_cache[(w, e)]

    for w in workloads:
        st, ort = by.get((w, "st")), by.get((w, "ort"))
        engines = [r["engine"] for r in allrec if r["workload"] == w]
        for e in engines:
            r = by[(w, e)]
            row = {k: r.get(k) for k in ("workload", "engine", "texts", "tokens", "batch", "threads",
                                         "seconds_best", "seconds_median", "sentences_per_s", "tokens_per_s")}
            row["side"] = r["_side"]
            if "graph" in r:
                row["graph"] = r["graph"]
            for base_name, base in (("st", st), ("ort", ort)):
                row[f"ratio_vs_{base_name}"] = None
                row[f"min_cosine_vs_{base_name}"] = row[f"mean_cosine_vs_{base_name}"] = None
                if base is None or e == base_name:
                    continue
                if base["texts"] != r["texts"]:
                    problems.append(f"{w}: {e} has {r['texts']} texts, {base_name} has {base['texts']}")
                    continue
                if base["tokens"] != r["tokens"]:
                    problems.append(f"{w}: {e} counts {r['tokens']} tokens, {base_name} {base['tokens']} (tokenizer mismatch?)")
                row[f"ratio_vs_{base_name}"] = round(r["sentences_per_s"] / base["sentences_per_s"], 4)
                a, b = emb(w, e), emb(w, base_name)
                if a is None or b is None:
                    problems.append(f"{w}: embeddings of {e} or {base_name} missing")
                    continue
                c = cosines(a, b)
                row[f"min_cosine_vs_{base_name}"] = round(float(c.min()), 6)
                row[f"mean_cosine_vs_{base_name}"] = round(float(c.mean()), 6)
                if base_name == "st":
                    row["worst_index_vs_st"] = int(c.argmin())
            rows.append(row)

    threads = sorted({r.get("threads") for r in allrec if r.get("threads") is not None})
    batches = sorted({r.get("batch") for r in allrec if r.get("batch") is not None})
    if len(threads) > 1 or len(batches) > 1:
        problems.append(f"runs differ in threads {threads} / batch {batches}: not a like-for-like comparison")
    versions = next((r["versions"] for r in ref if "versions" in r), {})
    summary = {"threads": threads, "batch": batches, "reference_versions": versions, "rows": rows, "problems": problems}

    print(f"threads {threads}, batch {batches}; reference: "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print()
    print("| workload | engine | sentences/s | tokens/s | ratio vs st | ratio vs ort | min cosine vs st | mean cosine vs st |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['workload']} | {row['engine']} | {row['sentences_per_s']:.1f} | {row['tokens_per_s']:.0f} "
              f"| {fmt(row['ratio_vs_st'], '.2f')} | {fmt(row['ratio_vs_ort'], '.2f')} "
              f"| {fmt(row['min_cosine_vs_st'], '.5f')} | {fmt(row['mean_cosine_vs_st'], '.5f')} |")
    print()
    # Sanity: the ONNX export must reproduce sentence-transformers (same weights, f32).
    for row in rows:
        if row["engine"] == "ort" and row["min_cosine_vs_st"] is not None:
            ok = row["min_cosine_vs_st"] >= 0.9999
            print(f"sanity: ort vs st on {row['workload']}: min cosine "
                  f"{row['min_cosine_vs_st']:.6f}, mean {row['mean_cosine_vs_st']:.6f} ({'ok' if ok else 'MISMATCH'})")
            if not ok:
                problems.append(f"{row['workload']}: ort disagrees with st (min cosine {row['min_cosine_vs_st']:.6f})")
    zr = [row for row in rows if row["side"] == "zrag" and row["min_cosine_vs_ort"] is not None]
    if zr:
        print()
        print("zrag vs ort (min / mean cosine): " + "; ".join(
            f"{row['engine']} {row['workload']} {row['min_cosine_vs_ort']:.5f} / {row['mean_cosine_vs_ort']:.5f}" for row in zr))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"\nwrote {out_dir / 'summary.json'}")

    if args.min_cosine > 0:
        bad = [row for row in rows if row["side"] == "zrag"
               and (row["min_cosine_vs_st"] is None or row["min_cosine_vs_st"] < args.min_cosine)]
        if bad:
            sys.exit("error: min cosine vs st below %.4f for: %s" % (
                args.min_cosine, ", ".join(f"{r['engine']}/{r['workload']}" for r in bad)))


if __name__ == "__main__":
    main()

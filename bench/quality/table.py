"""Markdown table of the runs bench/quality/run.sh wrote: one row per run."""
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out/quality-test")
rows = []
for path in sorted(out.glob("*.json")):
    text = path.read_text().strip()
    if not text:  # a run still going, or one that failed
        continue
    r = json.loads(text)
    rows.append((path.stem, r))
order = {"bm25": 0, "dense": 1, "hybrid": 2}
rows.sort(key=lambda x: ("@" in x[0], order.get(x[0].split("-")[0].split("+")[0].split("@")[0], 9), x[0]))
print("| run | mode | fusion | re-rank | queries | nDCG@10 | MRR@10 | R@10 | R@100 |")
print("|---|---|---|---|---:|---:|---:|---:|---:|")
for name, r in rows:
    rerank = r["rerank"] if r["rerank"] == "none" else f'{r["rerank"]} (top {r["rerank_depth"]})'
    fusion = r["fusion"] if r["mode"] == "hybrid" else ""
    mode = r["mode"] + (" exact" if r["exact"] and r["mode"] != "bm25" else "")
    print(f'| {name} | {mode} | {fusion} | {rerank} | {r["num_queries"]} | {r["ndcg@10"]:.4f} | '
          f'{r["mrr@10"]:.4f} | {r["recall@10"]:.4f} | {r["recall@100"]:.4f} |')

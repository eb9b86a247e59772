#!/usr/bin/env python3
"""Paired comparison of two `zrag eval retrieval --report` runs on the same queries:
mean difference per metric, a 95% paired bootstrap interval, and wins/losses per query.
usage: paired.py BASELINE_REPORT_DIR OTHER_REPORT_DIR [metric ...]"""
import json
import random
import sys


def load(d):
    with open(f"{d}/per_query.jsonl") as f:
        return {r["query_id"]: r for r in map(json.loads, f)}


def main():
    base, other = load(sys.argv[1]), load(sys.argv[2])
    metrics = sys.argv[3:] or ["ndcg@10", "recall@10", "recall@100"]
    ids = sorted(base.keys() & other.keys())
    if len(ids) != len(base) or len(ids) != len(other):
        sys.exit(f"the runs cover different queries ({len(base)} vs {len(other)}, {len(ids)} shared)")
    rng = random.Random(0)
    for m in metrics:
        d = [other[q][m] - base[q][m] for q in ids]
        mean = sum(d) / len(d)
        boots = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(2000))
        lo, hi = boots[49], boots[1949]
        wins = sum(x > 0 for x in d)
        losses = sum(x < 0 for x in d)
        print(f"{m}: {mean:+.4f} (95% CI {lo:+.4f} .. {hi:+.4f}); {wins} queries better, "
              f"{losses} worse, {len(d) - wins - losses} equal, of {len(d)}")


main()

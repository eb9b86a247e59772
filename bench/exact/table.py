"""Renders the markdown table of bench/exact/run.sh from its JSON lines (one per engine run).

Each engine ran several rounds, interleaved with the other; the table takes each engine's best
round (the machine is shared, and the best round is the one least disturbed by other jobs) and
lists every round below it.
"""
import json
import sys


def main():
    runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip().startswith("{")]
    best = {}
    for run in runs:
        b = best.setdefault(run["engine"], {})
        for key in ("batch1_qps", "batch64_qps", "batch1_prefiltered_qps"):
            if key in run:
                b[key] = max(b.get(key, 0.0), run[key])
    zrag, faiss = best["zrag"], best["faiss"]
    zrag_runs = [r for r in runs if r["engine"] == "zrag"]
    faiss_runs = [r for r in runs if r["engine"] == "faiss"]
    threads = zrag_runs[-1]["threads"]
    print(f"| batch | zrag q/s | faiss-cpu {faiss_runs[-1]['version']} IndexFlatIP q/s | zrag / faiss |")
    print("|---:|---:|---:|---:|")
    for batch, key in ((1, "batch1_qps"), (64, "batch64_qps")):
        print(f"| {batch} | {zrag[key]:.1f} | {faiss[key]:.1f} | {zrag[key] / faiss[key]:.2f}x |")
    if "batch1_prefiltered_qps" in zrag:
        key = "batch1_prefiltered_qps"
        print(f"| 1, zrag with int8 prefilter | {zrag[key]:.1f} | {faiss['batch1_qps']:.1f} | "
              f"{zrag[key] / faiss['batch1_qps']:.2f}x |")
    print()
    last = zrag_runs[-1]
    print(f"Threads: {threads} for both; zrag kernels: {last['isa']}; zrag corpus storage: {last['storage']}.")
    for name in ("batch1", "batch64"):
        a = last.get(f"{name}_agreement")
        if a:
            print(f"Top-10 agreement with faiss ({name}): {a['identical_lists']}/{a['queries']} identical lists, "
                  f"recall {a['recall']:.4f}, max score difference {a['max_score_diff']:.1e}.")
        else:
            print(f"Top-10 agreement with faiss ({name}): not checked (no faiss results).")
    if "prefiltered_identical" in last:
        print(f"int8 prefilter: built in {last['prefilter_build_s']:.1f} s; results identical to the plain "
              f"scan: {'yes' if last['prefiltered_identical'] else 'NO'}.")
    print()
    print("Every round (q/s at batch 1 / batch 64" + (" / batch 1 prefiltered" if "batch1_prefiltered_qps" in zrag else "") + "):")
    for run in runs:
        extra = f" / {run['batch1_prefiltered_qps']:.2f}" if "batch1_prefiltered_qps" in run else ""
        print(f"- {run['engine']}: {run['batch1_qps']:.2f} / {run['batch64_qps']:.2f}{extra}"
              + (f" (load average {run['load']} at start)" if "load" in run else ""))


if __name__ == "__main__":
    main()

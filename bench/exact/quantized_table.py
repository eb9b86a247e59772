"""Renders the markdown tables of bench/exact/quantized_run.sh from its JSON lines (one per engine
run): speed, recall@10 and bytes per vector per engine, precision and batch; recall on real
MiniLM vectors; and every round.

Each engine ran several rounds, interleaved with the other; q/s is each configuration's best
round (the machine is shared: the best round is the least disturbed), recall the last round's
(both engines are deterministic).
"""
import json
import sys

PRECISIONS = ("f32", "f16", "int8", "int8+refine")


def main():
    runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip().startswith("{")]
    best, last = {}, {}
    for run in runs:
        for row in run["rows"]:
            key = (run["engine"], row["precision"], row["batch"])
            best[key] = max(best.get(key, 0.0), row["qps"])
            last[key] = (run, row)
    zrag = [r for r in runs if r["engine"] == "zrag"][-1]
    faiss = [r for r in runs if r["engine"] == "faiss"][-1]
    k = zrag["k"]

    print(f"| engine | precision | batch | q/s | recall@{k} | bytes/vector | zrag / faiss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for precision in PRECISIONS:
        for batch in (1, 64):
            for engine in ("zrag", "faiss"):
                key = (engine, precision, batch)
                if key not in best:
                    continue
                run, row = last[key]
                if engine == "zrag":
                    name = "zrag"
                    if precision != "f32":
                        name += f" (shortlist {run['shortlist']})"
                    peer = best.get(("faiss", precision, batch))
                    ratio = f"{best[key] / peer:.2f}x" if peer else ""
                else:
                    name = f"faiss {run['version']} {row['index']}"
                    if precision == "int8+refine":
                        name += f" k_factor {run['shortlist'] / run['k']:g}"
                    zrag_rate = best.get(("zrag", "int8" if precision == "int8+refine" else precision, batch))
                    ratio = f"({zrag_rate / best[key]:.2f}x)" if precision == "int8+refine" and zrag_rate else ""
                print(f"| {name} | {precision} | {batch} | {best[key]:.1f} | {row['recall']:.4f} | "
                      f"{row['bytes_per_vector']:.1f} | {ratio} |")
    print()
    print(f"Threads: {zrag['threads']} for both; zrag kernels: {zrag['isa']}; {zrag['n']:,} x {zrag['dim']} "
          f"random unit vectors, 64 queries. bytes/vector = the scanned copy (zrag: file size / rows, incl. "
          f"the per-row scale and bound of int8; faiss: sa_code_size). zrag f16/int8 also read "
          f"{zrag['shortlist']} f32 rows ({zrag['shortlist'] * zrag['dim'] * 4 // 1024} KiB) per query for the "
          f"re-scoring; faiss IndexRefineFlat keeps its own f32 copy in memory.")
    print()
    real_z, real_f = zrag.get("real_recall", {}), faiss.get("real_recall", {})
    if real_z or real_f:
        print(f"Recall@{k} on real MiniLM vectors (bench-out/revdict.zrag, 1000 held-out rows as queries):")
        print()
        print(f"| precision | zrag (shortlist {zrag['shortlist']}) | faiss SQ | faiss SQ8 + IndexRefineFlat |")
        print("|---|---:|---:|---:|")
        for precision in ("f16", "int8"):
            z = real_z.get(precision)
            f = real_f.get(precision)
            refine = real_f.get("int8+refine") if precision == "int8" else None
            cells = [f"{v:.4f}" if v is not None else "" for v in (z, f, refine)]
            print(f"| {precision} | " + " | ".join(cells) + " |")
        print()
    sweep = zrag.get("sweep", {})
    if sweep:
        print("zrag sweep (last round):")
        for key, value in sweep.items():
            print(f"- {key}: {value}")
        print()
    print("Every round (q/s at batch 1 / batch 64 per precision):")
    for run in runs:
        cells = []
        for precision in PRECISIONS:
            rates = [r["qps"] for r in run["rows"] if r["precision"] == precision]
            if rates:
                cells.append(f"{precision} " + " / ".join(f"{v:.1f}" for v in rates))
        print(f"- {run['engine']}: " + "; ".join(cells) + (f" (load average {run['load']} at start)" if "load" in run else ""))


if __name__ == "__main__":
    main()

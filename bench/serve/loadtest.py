"""Load test of a running `zrag serve` with `hey` (Debian package): queries/s, p50/p99
latency and errors for /v1/search and /v1/ask at several concurrency levels.

Usage: python3 bench/serve/loadtest.py --base http://127.0.0.1:8080 --out results.json
Prints a Markdown table; writes every level's numbers to --out.
"""

import argparse
import csv
import io
import json
import subprocess
import urllib.request


def run_hey(url: str, body: dict, concurrency: int, seconds: int) -> dict:
    out = subprocess.run(
        ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-t", "0",
         "-T", "application/json", "-d", json.dumps(body), "-o", "csv", url],
        check=True, capture_output=True, text=True).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    ok = sorted(float(r["response-time"]) for r in rows if r["status-code"] == "200")
    statuses: dict = {}
    for r in rows:
        statuses[r["status-code"]] = statuses.get(r["status-code"], 0) + 1
    # The wall time of the run: from the first request's start to the last one's end.
    end = max((float(r["offset"]) + float(r["response-time"]) for r in rows), default=seconds)
    def pct(p: float) -> float:
        return ok[min(len(ok) - 1, int(p * len(ok)))] * 1000 if ok else float("nan")
    return {
        "concurrency": concurrency,
        "requests": len(rows),
        "ok": len(ok),
        "errors": len(rows) - len(ok),
        "statuses": statuses,
        "qps": len(ok) / end if end > 0 else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--search-levels", default="1,2,4,16,64")
    parser.add_argument("--ask-levels", default="1,2,4")
    parser.add_argument("--search-seconds", type=int, default=15)
    parser.add_argument("--ask-seconds", type=int, default=40)
    parser.add_argument("--query", default="a small furry animal that lives in burrows")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    health = json.load(urllib.request.urlopen(f"{args.base}/healthz"))
    runs = []
    for mode in ["dense", "bm25", "hybrid"]:
        for c in map(int, args.search_levels.split(",")):
            r = run_hey(f"{args.base}/v1/search", {"query": args.query, "k": 10, "mode": mode},
                        c, args.search_seconds)
            runs.append({"endpoint": f"/v1/search ({mode}, k 10)", **r})
            print(json.dumps(runs[-1]), flush=True)
    for c in map(int, args.ask_levels.split(",")):
        body = {"question": args.query, "k": 5, "max_tokens": args.max_tokens}
        r = run_hey(f"{args.base}/v1/ask", body, c, args.ask_seconds)
        runs.append({"endpoint": f"/v1/ask (RAG-Sequence, k 5, {args.max_tokens} tokens)", **r})
        print(json.dumps(runs[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"health": health, "runs": runs}, f, indent=1)
    print("\n| endpoint | concurrency | requests | queries/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in runs:
        errors = ", ".join(f"{n}× {s}" for s, n in sorted(r["statuses"].items()) if s != "200")
        print(f"| {r['endpoint']} | {r['concurrency']} | {r['requests']} | {r['qps']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {errors or '0'} |")


if __name__ == "__main__":
    main()

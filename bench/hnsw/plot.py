#!/usr/bin/env python3
"""Plots and tables of the HNSW benchmark, from the JSON lines of the engines (common.py).

  plot.py RESULTS.jsonl [--meta meta.json] [--svg recall_qps.svg] [--build-svg build.svg]
          [--md summary.md] [--xmin 0.8]

Writes
  --svg        recall@10 (x, linear from --xmin to 1) vs queries/s (y, log), one curve per engine,
               points labelled with ef, build time and index size in the legend;
  --nines-svg  the same with x = -log10(1 - recall) up to 0.999 (spreads out the high-recall end);
  --build-svg  build seconds per engine (bars), with index bytes per vector;
and prints (and writes to --md) a markdown summary: build seconds, index bytes per vector, the
queries/s at recall 0.90 / 0.95 / 0.99 interpolated between the measured ef values (log q/s linear
in recall) with the ratio zrag / best other engine, and the raw ef -> recall, q/s table.

Plain Python (no matplotlib): the SVG is written by hand, so this runs under any python3.
If an engine appears more than once in RESULTS, its last build and last search per ef count.
"""
import argparse
import html
import json
import math
import os

ORDER = ["zrag", "hnswlib", "faiss", "pgvector"]
COLOURS = {"zrag": "#d62728", "hnswlib": "#1f77b4", "faiss": "#2ca02c", "pgvector": "#9467bd"}
EXTRA_COLOURS = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
MARKERS = {"zrag": "circle", "hnswlib": "square", "faiss": "triangle", "pgvector": "diamond"}
TARGETS = [0.90, 0.95, 0.99]


def read(path):
    builds, searches = {}, {}
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        o = json.loads(line)
        e = o.get("engine")
        if o.get("event") == "build":
            builds[e] = o
            searches.setdefault(e, {})
        elif o.get("event") == "search":
            searches.setdefault(e, {})[o["ef"]] = o
    engines = [e for e in ORDER if e in searches] + sorted(e for e in searches if e not in ORDER)
    curves = {e: [searches[e][ef] for ef in sorted(searches[e])] for e in engines}
    return engines, builds, curves


def colour(e, engines):
    if e in COLOURS:
        return COLOURS[e]
    return EXTRA_COLOURS[[x for x in engines if x not in COLOURS].index(e) % len(EXTRA_COLOURS)]


def qps_at(curve, target):
    """q/s at `target` recall: log q/s linear in recall between the two ef values around the
    first crossing. Returns (qps, note) with note '' (interpolated), '≥' (the smallest ef is already
    above target: its q/s is a lower bound) or None (target not reached)."""
    pts = [(p["recall"], p["qps"]) for p in curve]
    if not pts:
        return None, None
    if pts[0][0] >= target:
        return pts[0][1], "≥"
    for (r0, q0), (r1, q1) in zip(pts, pts[1:]):
        if r0 < target <= r1:
            f = (target - r0) / (r1 - r0)
            return math.exp(math.log(q0) + f * (math.log(q1) - math.log(q0))), ""
    return None, None


def fmt_int(x):
    return f"{x:,.0f}"


def fmt_n(n):
    return f"{n:,}"


def describe(meta, builds, curves):
    """(title, subtitle) for the plots."""
    b = next(iter(builds.values()), {})
    n = meta.get("n") or b.get("n")
    dim = meta.get("dim") or b.get("dim", 384)
    m = b.get("m", 16)
    efc = b.get("ef_construction", 100)
    bt = b.get("threads", 2)
    c = next(iter(curves.values()), [])
    st = c[0].get("threads", 1) if c else 1
    q = meta.get("q") or (c[0].get("q") if c else None)
    k = c[0].get("k", 10) if c else 10
    data = ""
    if meta:
        data = (f" ({fmt_n(meta['n_real'])} MiniLM + {fmt_n(meta['n_synthetic'])} synthetic)"
                if meta.get("n_synthetic") else " (MiniLM)")
    title = f"HNSW, N = {fmt_n(n) if n else '?'} × {dim}{data}, M = {m}, efConstruction = {efc}"
    sub = (f"inner product; build {bt} threads; search {st} thread, one query at a time"
           f"{f', Q = {fmt_n(q)}' if q else ''}; recall@{k} vs exact")
    return title, sub


def svg_text(x, y, s, size=12, anchor="start", colour="#222", weight="normal", extra=""):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{colour}" '
            f'font-weight="{weight}" {extra}>{html.escape(s)}</text>')


def marker(kind, x, y, c, r=4.0):
    if kind == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" fill="{c}"/>'
    if kind == "triangle":
        return (f'<polygon points="{x:.1f},{y - r * 1.2:.1f} {x - r * 1.1:.1f},{y + r * 0.8:.1f} '
                f'{x + r * 1.1:.1f},{y + r * 0.8:.1f}" fill="{c}"/>')
    if kind == "diamond":
        d = r * 1.3
        return (f'<polygon points="{x:.1f},{y - d:.1f} {x + d:.1f},{y:.1f} {x:.1f},{y + d:.1f} '
                f'{x - d:.1f},{y:.1f}" fill="{c}"/>')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{c}"/>'


NINES_TICKS = [0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999]


def plot_recall_qps(path, engines, builds, curves, title, sub, xmin, nines=False):
    """nines=False: recall linear from xmin to 1; nines=True: x = -log10(1 - recall) from xmin to
    0.999, which spreads out the high-recall end."""
    W, H = 960, 640
    L, R, T, B = 90, 30, 78, 64
    pw, ph = W - L - R, H - T - B
    shown = [p["qps"] for e in engines for p in curves[e] if p["recall"] >= xmin - 0.02 and p["qps"] > 0]
    if not shown:
        shown = [p["qps"] for e in engines for p in curves[e] if p["qps"] > 0] or [1, 10]
    lo = 10 ** math.floor(math.log10(min(shown)))
    hi = 10 ** math.ceil(math.log10(max(shown)))
    if hi / lo < 10:
        hi = lo * 10
    # trim to the 1-2-5 ticks that bound the data
    steps = [lo * 10 ** d * s for d in range(int(round(math.log10(hi / lo))) + 1) for s in (1, 2, 5)]
    lo = max(s for s in steps if s <= min(shown))
    hi = min(s for s in steps + [hi] if s >= max(shown))
    ylo, yhi = math.log10(lo), math.log10(hi)

    xmax = 0.999 if nines else 1.0

    def nine(r):
        return -math.log10(max(1.0 - r, 1e-6))

    def X(r):
        if nines:
            return L + (nine(r) - nine(xmin)) / (nine(xmax) - nine(xmin)) * pw
        return L + (r - xmin) / (1.0 - xmin) * pw

    def Y(q):
        return T + (yhi - math.log10(q)) / (yhi - ylo) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="Helvetica, Arial, sans-serif">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<defs><clipPath id="plot"><rect x="{L}" y="{T}" width="{pw}" height="{ph}"/></clipPath></defs>',
           svg_text(W / 2, 28, title, 16, "middle", weight="bold"),
           svg_text(W / 2, 50, sub, 12.5, "middle", "#444")]
    # grid and ticks
    step = 0.02 if 1.0 - xmin <= 0.25 else 0.05
    if nines:
        xticks = [t for t in NINES_TICKS if t >= xmin - 1e-9]
    else:
        xticks = [xmin + i * step for i in range(int(round((1.0 - xmin) / step)) + 1)]
    for r in xticks:
        x = X(r)
        out.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{T + ph}" stroke="#e3e3e3"/>')
        label = f"{r:.3f}".rstrip("0") if nines else f"{r:.2f}"
        out.append(svg_text(x, T + ph + 18, label, 11.5, "middle", "#333"))
    for s in steps:
        if lo <= s <= hi:
            y = Y(s)
            major = abs(math.log10(s) - round(math.log10(s))) < 1e-9
            out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="{"#cfcfcf" if major else "#ececec"}"/>')
            out.append(svg_text(L - 8, y + 4, fmt_int(s), 11.5, "end", "#333"))
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    xlabel = "recall@10, scale -log10(1 - recall)" if nines else "recall@10"
    out.append(svg_text(L + pw / 2, H - 18, xlabel + " (higher is better) →", 13.5, "middle"))
    out.append(svg_text(22, T + ph / 2, "queries / s, one thread (log scale, higher is better) →", 13.5, "middle",
                        extra=f'transform="rotate(-90 22 {T + ph / 2:.1f})"'))
    # curves
    offsets = [(7, -7), (7, 14), (-8, -8), (-8, 14)]
    for i, e in enumerate(engines):
        c = colour(e, engines)
        pts = [(X(min(p["recall"], xmax + 0.0005 if nines else 1.0)), Y(p["qps"]), p["ef"], p["recall"])
               for p in curves[e] if p["qps"] > 0]
        g = [f'<g clip-path="url(#plot)">']
        g.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in pts)}" fill="none" '
                 f'stroke="{c}" stroke-width="2"/>')
        dx, dy = offsets[i % len(offsets)]
        labels = []
        for x, y, ef, r in pts:
            g.append(marker(MARKERS.get(e, "circle"), x, y, c))
            if xmin <= r <= xmax:
                labels.append(svg_text(x + dx, y + dy, str(ef), 9.5, "end" if dx < 0 else "start", c))
        g.append("</g>")
        out += g + labels
    # legend (bottom left: the curves run from top left to bottom right)
    lx, ly = L + 14, T + ph - 16 - 22 * len(engines)
    texts = []
    for e in engines:
        b = builds.get(e, {})
        label = e
        if b:
            label += f" — build {b['seconds']:,.1f} s"
            if b.get("index_bytes") and b.get("n"):
                label += f", {b['index_bytes'] / b['n']:,.0f} B/vector"
        texts.append(label)
    lw = max(300, 50 + 7.2 * max(len(t) for t in texts))
    out.append(f'<rect x="{lx - 8}" y="{ly - 16}" width="{lw:.0f}" height="{22 * len(engines) + 30}" '
               f'fill="white" fill-opacity="0.92" stroke="#bbb"/>')
    for i, e in enumerate(engines):
        c = colour(e, engines)
        label = texts[i]
        y = ly + 22 * i
        out.append(f'<line x1="{lx}" y1="{y - 4}" x2="{lx + 26}" y2="{y - 4}" stroke="{c}" stroke-width="2"/>')
        out.append(marker(MARKERS.get(e, "circle"), lx + 13, y - 4, c))
        out.append(svg_text(lx + 36, y, label, 12.5))
    out.append(svg_text(lx, ly + 22 * len(engines) + 2, "numbers next to the points: search ef", 10.5, colour="#666"))
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def plot_build(path, engines, builds, title):
    es = [e for e in engines if e in builds]
    if not es:
        return
    W, rowh = 760, 46
    L, R, T, B = 110, 40, 64, 48
    H = T + B + rowh * len(es)
    pw = W - L - R
    mx = max(builds[e]["seconds"] for e in es) * 1.7
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="Helvetica, Arial, sans-serif">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           svg_text(W / 2, 24, "HNSW build time (lower is better)", 15, "middle", weight="bold"),
           svg_text(W / 2, 44, title, 11, "middle", "#444")]
    for i, e in enumerate(es):
        b = builds[e]
        y = T + i * rowh
        w = b["seconds"] / mx * pw
        out.append(f'<rect x="{L}" y="{y + 8}" width="{w:.1f}" height="{rowh - 16}" fill="{colour(e, engines)}"/>')
        out.append(svg_text(L - 10, y + rowh / 2 + 4, e, 13, "end"))
        note = f"{b['seconds']:,.1f} s on {b.get('threads', '?')} threads"
        if b.get("index_bytes") and b.get("n"):
            note += f", {b['index_bytes'] / b['n']:,.0f} B/vector"
        out.append(svg_text(L + w + 6, y + rowh / 2 + 4, note, 11.5))
    out.append(f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + rowh * len(es)}" stroke="#888"/>')
    out.append(svg_text(L + pw / 2, H - 16, "seconds to insert all N vectors", 12.5, "middle"))
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def summary(engines, builds, curves, title, sub):
    lines = [f"**{title}**; {sub}.", ""]
    head = "| engine | build s | index bytes / vector | " + " | ".join(f"q/s @ recall {t:.2f}" for t in TARGETS) + " |"
    lines += [head, "|---|---:|---:|" + "---:|" * len(TARGETS)]
    vals = {}
    for e in engines:
        b = builds.get(e, {})
        bs = b.get("seconds")
        bpv = b["index_bytes"] / b["n"] if b.get("index_bytes") and b.get("n") else None
        qs = [qps_at(curves[e], t) for t in TARGETS]
        vals[e] = (bs, bpv, qs)
        cells = [f"{bs:,.1f}" if bs is not None else "—", f"{bpv:,.0f}" if bpv is not None else "—"]
        cells += [f"{note}{fmt_int(q)}" if q is not None else "not reached" for q, note in qs]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    others = [e for e in engines if e != "zrag"]
    if "zrag" in engines and others:
        zb, zm, zq = vals["zrag"]
        cells = []
        ob = [vals[e][0] for e in others if vals[e][0]]
        cells.append(f"{zb / min(ob):.2f}×" if zb and ob else "—")
        om = [vals[e][1] for e in others if vals[e][1]]
        cells.append(f"{zm / min(om):.2f}×" if zm and om else "—")
        for i in range(len(TARGETS)):
            oq = [vals[e][2][i][0] for e in others if vals[e][2][i][0]]
            z = zq[i][0]
            cells.append(f"{z / max(oq):.2f}×" if z and oq else "—")
        lines.append("| **zrag / best other** | " + " | ".join(cells) + " |")
        lines += ["", "zrag / best other: build time and bytes against the smallest of the other engines "
                  "(below 1 is better), q/s against the fastest other engine at that recall (above 1 is better)."]
    lines += ["", "q/s at a recall target: interpolated between the two ef values around it (log q/s linear in "
              "recall); '≥' means the smallest ef measured already exceeds the target.", ""]
    efs = sorted({p["ef"] for e in engines for p in curves[e]})
    lines.append("| ef | " + " | ".join(f"{e} recall@10 | {e} q/s" for e in engines) + " |")
    lines.append("|---:|" + "---:|---:|" * len(engines))
    for ef in efs:
        cells = []
        for e in engines:
            p = next((p for p in curves[e] if p["ef"] == ef), None)
            cells += [f"{p['recall']:.4f}", fmt_int(p["qps"])] if p else ["—", "—"]
        lines.append(f"| {ef} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--meta", help="meta.json of the data (default: next to RESULTS)")
    ap.add_argument("--svg", default="bench/hnsw/recall_qps.svg")
    ap.add_argument("--nines-svg", default="", help="also the plot with x = -log10(1 - recall)")
    ap.add_argument("--build-svg", default="")
    ap.add_argument("--md", default="")
    ap.add_argument("--xmin", type=float, default=0.8)
    a = ap.parse_args()
    meta_path = a.meta or os.path.join(os.path.dirname(a.results), "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    engines, builds, curves = read(a.results)
    if not engines:
        raise SystemExit(f"no search results in {a.results}")
    title, sub = describe(meta, builds, curves)
    plot_recall_qps(a.svg, engines, builds, curves, title, sub, a.xmin)
    if a.nines_svg:
        plot_recall_qps(a.nines_svg, engines, builds, curves, title, sub, a.xmin, nines=True)
    if a.build_svg:
        plot_build(a.build_svg, engines, builds, title)
    md = summary(engines, builds, curves, title, sub)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    print(md, end="")


if __name__ == "__main__":
    main()

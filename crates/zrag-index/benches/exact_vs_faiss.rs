//! zrag exact MIPS on the data `bench/exact/gen_data.py` writes, side by side with faiss
//! (`bench/exact/faiss_bench.py`): queries/s at batch 1 and batch 64, and agreement of the top-k
//! with faiss's when its result files are present. `bench/exact/run.sh` runs both.
//!
//! ```text
//! cargo bench -p zrag-index --bench exact_vs_faiss -- --data bench-out/exact --threads 2
//!     [--k 10] [--batch1-reps 2] [--batch64-reps 5] [--storage heap|mmap|huge] [--sweep | --sweep-batches 1,8,64] [--json]
//! ```
//!
//! `--sweep` also measures both execution paths over a range of batch sizes (to place
//! `exact::gemm_min_queries`) and the cost of a liveness filter. Reports only: no timing asserts.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use zrag_index::exact::{self, kernels, Hit, Strategy};

struct Args {
    data: PathBuf,
    threads: usize,
    k: usize,
    batch1_reps: usize,
    batch64_reps: usize,
    storage: Storage,
    sweep: Option<Vec<usize>>,
    json: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        data: PathBuf::from("bench-out/exact"),
        threads: 2,
        k: 10,
        batch1_reps: 2,
        batch64_reps: 5,
        storage: Storage::Heap,
        sweep: None,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--data" => args.data = PathBuf::from(value()),
            "--threads" => args.threads = value().parse().expect("--threads"),
            "--k" => args.k = value().parse().expect("--k"),
            "--batch1-reps" => args.batch1_reps = value().parse().expect("--batch1-reps"),
            "--batch64-reps" => args.batch64_reps = value().parse().expect("--batch64-reps"),
            "--storage" => {
                args.storage = match value().as_str() {
                    "heap" => Storage::Heap,
                    "mmap" => Storage::Mmap,
                    "huge" => Storage::HugePages,
                    other => panic!("--storage heap|mmap|huge, not {other}"),
                }
            }
            "--sweep" => args.sweep = Some(vec![1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128]),
            "--sweep-batches" => {
                args.sweep = Some(
                    value()
                        .split(',')
                        .map(|b| b.parse().expect("--sweep-batches"))
                        .collect(),
                )
            }
            "--json" => args.json = true,
            // `cargo bench` passes `--bench` to harness = false targets.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// Where the benchmark keeps the corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    /// Read into 64-byte-aligned heap memory (what faiss does with its own copy).
    Heap,
    /// Mapped from the file (what a zrag collection does).
    Mmap,
    /// Read into anonymous memory advised to use transparent huge pages (fewer TLB misses).
    HugePages,
}

enum Vectors {
    Heap(Vec<CacheLine>, usize),
    Mapped(memmap2::Mmap),
    Anonymous(memmap2::MmapMut),
}

impl Vectors {
    fn load(path: &Path, storage: Storage) -> Vectors {
        let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let bytes = file.metadata().expect("metadata").len() as usize;
        assert_eq!(bytes % 4, 0);
        match storage {
            Storage::Heap => {}
            Storage::Mmap => {
                // SAFETY: the benchmark owns the data directory; nothing truncates the file meanwhile.
                let map = unsafe { memmap2::Mmap::map(&file) }.expect("mmap");
                return Vectors::Mapped(map);
            }
            Storage::HugePages => {
                let mut map = memmap2::MmapOptions::new()
                    .len(bytes)
                    .map_anon()
                    .expect("anonymous map");
                #[cfg(target_os = "linux")]
                map.advise(memmap2::Advice::HugePage)
                    .expect("madvise(MADV_HUGEPAGE)");
                (&file).read_exact(&mut map).expect("read vectors");
                return Vectors::Anonymous(map);
            }
        }
        let floats = bytes / 4;
        let mut lines = vec![CacheLine([0.0; 16]); floats.div_ceil(16)];
        // SAFETY: `lines` owns at least `bytes` bytes of plain f32 data; any bit pattern is valid.
        let buf = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, bytes) };
        (&file).read_exact(buf).expect("read vectors");
        Vectors::Heap(lines, floats)
    }

    fn as_slice(&self) -> &[f32] {
        match self {
            // SAFETY: `CacheLine` is 16 plain f32s (repr C) and `floats` fits in `lines`.
            Vectors::Heap(lines, floats) => unsafe {
                std::slice::from_raw_parts(lines.as_ptr() as *const f32, *floats)
            },
            // SAFETY: page-aligned mapping of little-endian f32s; length checked in `load`.
            Vectors::Mapped(map) => unsafe {
                std::slice::from_raw_parts(map.as_ptr() as *const f32, map.len() / 4)
            },
            // SAFETY: as above.
            Vectors::Anonymous(map) => unsafe {
                std::slice::from_raw_parts(map.as_ptr() as *const f32, map.len() / 4)
            },
        }
    }
}

/// 64 bytes of floats, aligned like a cache line, so that rows of 384 floats start on one.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([f32; 16]);

fn read_raw<T: Copy + Default>(path: &Path) -> Option<Vec<T>> {
    let bytes = std::fs::read(path).ok()?;
    let size = std::mem::size_of::<T>();
    assert_eq!(bytes.len() % size, 0, "{}", path.display());
    let mut out = vec![T::default(); bytes.len() / size];
    // SAFETY: `out` has exactly `bytes.len()` bytes; T is a plain number type.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, bytes.len())
    };
    Some(out)
}

/// Times `reps` runs of `f`, each handling `queries_per_run` queries, and returns queries/s.
fn queries_per_second(reps: usize, queries_per_run: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    (reps * queries_per_run) as f64 / start.elapsed().as_secs_f64()
}

/// Seconds of CPU time this process has used (user + system), from /proc (Linux; 0 elsewhere).
/// The sweep reports queries per CPU-second next to wall-clock rates: on a machine shared with
/// other jobs, wall-clock rates mostly measure the contention.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after_name = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}

/// Compares zrag's top-k with faiss's for the same queries.
struct Agreement {
    queries: usize,
    identical_lists: usize,
    recall: f64,
    max_score_diff: f32,
}

fn agreement(ours: &[Vec<Hit>], faiss_ids: &[i64], faiss_scores: &[f32], k: usize) -> Agreement {
    let mut identical_lists = 0;
    let mut found = 0;
    let mut max_score_diff = 0.0f32;
    for (q, hits) in ours.iter().enumerate() {
        let ids = &faiss_ids[q * k..(q + 1) * k];
        let scores = &faiss_scores[q * k..(q + 1) * k];
        if hits.iter().map(|h| h.row as i64).eq(ids.iter().copied()) {
            identical_lists += 1;
        }
        found += hits
            .iter()
            .filter(|h| ids.contains(&(h.row as i64)))
            .count();
        for (h, s) in hits.iter().zip(scores) {
            max_score_diff = max_score_diff.max((h.score - s).abs());
        }
    }
    Agreement {
        queries: ours.len(),
        identical_lists,
        recall: found as f64 / (ours.len() * k) as f64,
        max_score_diff,
    }
}

fn main() {
    let args = parse_args();
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .expect("rayon pool");

    let meta =
        std::fs::read_to_string(args.data.join("meta.json")).expect("meta.json (run gen_data.py)");
    let meta: serde_json::Value = serde_json::from_str(&meta).expect("meta.json");
    let dim = meta["dim"].as_u64().expect("meta.json: dim") as usize;
    let load_start = Instant::now();
    let vectors = Vectors::load(&args.data.join("base.f32"), args.storage);
    let vectors = vectors.as_slice();
    let queries: Vec<f32> = read_raw(&args.data.join("queries.f32")).expect("queries.f32");
    let n = vectors.len() / dim;
    let n_queries = queries.len() / dim;
    assert!(n_queries >= 64, "the benchmark needs 64 queries");
    let queries = &queries[..64 * dim];
    eprintln!(
        "zrag: {n} x {dim} vectors ({:?}) loaded in {:.1} s; isa {:?}; {} threads",
        args.storage,
        load_start.elapsed().as_secs_f64(),
        kernels::active_isa(),
        rayon::current_num_threads()
    );

    // Warm-up: faults in the pages and the thread pool.
    let _ = exact::search(vectors, dim, &queries[..dim], args.k, None);

    let mut batch1 = Vec::new();
    let batch1_qps = queries_per_second(args.batch1_reps, 64, || {
        batch1 = queries
            .chunks_exact(dim)
            .map(|q| exact::search(vectors, dim, q, args.k, None).remove(0))
            .collect();
    });
    // The same exact search with the int8 prefilter (a quarter of the bytes per query).
    let build_start = Instant::now();
    let prefilter = exact::Int8Prefilter::build(vectors, dim);
    let prefilter_build_s = build_start.elapsed().as_secs_f64();
    let mut prefiltered = Vec::new();
    let prefiltered_qps = queries_per_second(args.batch1_reps, 64, || {
        prefiltered = queries
            .chunks_exact(dim)
            .map(|q| exact::search_prefiltered(vectors, &prefilter, q, args.k, None).remove(0))
            .collect();
    });
    let prefilter_identical = prefiltered == batch1;
    eprintln!(
        "zrag: batch 1 with int8 prefilter: {prefiltered_qps:.1} q/s (built in {prefilter_build_s:.1} s); \
         results identical to the plain scan: {prefilter_identical}"
    );
    let mut batch64 = Vec::new();
    let batch64_qps = queries_per_second(args.batch64_reps, 64, || {
        batch64 = exact::search(vectors, dim, queries, args.k, None);
    });
    eprintln!(
        "zrag: batch 1: {batch1_qps:.1} q/s ({:.1}M vectors/s); batch 64: {batch64_qps:.1} q/s",
        batch1_qps * n as f64 / 1e6
    );

    let mut agreement_json = Vec::new();
    for (name, ours) in [("batch1", &batch1), ("batch64", &batch64)] {
        let ids = read_raw::<i64>(&args.data.join(format!("faiss_{name}_ids.i64")));
        let scores = read_raw::<f32>(&args.data.join(format!("faiss_{name}_scores.f32")));
        match (ids, scores) {
            (Some(ids), Some(scores)) if ids.len() == 64 * args.k => {
                let a = agreement(ours, &ids, &scores, args.k);
                eprintln!(
                    "agreement with faiss ({name}): {}/{} identical top-{} lists, recall {:.4}, max score diff {:.2e}",
                    a.identical_lists, a.queries, args.k, a.recall, a.max_score_diff
                );
                agreement_json.push(format!(
                    "\"{name}_agreement\": {{\"identical_lists\": {}, \"queries\": {}, \"recall\": {:.6}, \"max_score_diff\": {:e}}}",
                    a.identical_lists, a.queries, a.recall, a.max_score_diff
                ));
            }
            _ => eprintln!(
                "agreement with faiss ({name}): no faiss results for k={} in {}",
                args.k,
                args.data.display()
            ),
        }
    }

    if let Some(batches) = &args.sweep {
        sweep(vectors, dim, queries, args.k, batches);
    }

    if args.json {
        let mut fields = vec![
            "\"engine\": \"zrag\"".to_string(),
            format!("\"threads\": {}", rayon::current_num_threads()),
            format!("\"isa\": \"{:?}\"", kernels::active_isa()),
            format!("\"storage\": \"{:?}\"", args.storage),
            format!("\"batch1_qps\": {batch1_qps}"),
            format!("\"batch64_qps\": {batch64_qps}"),
            format!("\"batch1_prefiltered_qps\": {prefiltered_qps}"),
            format!("\"prefilter_build_s\": {prefilter_build_s}"),
            format!("\"prefiltered_identical\": {prefilter_identical}"),
        ];
        fields.extend(agreement_json);
        println!("{{{}}}", fields.join(", "));
    }
}

/// Both execution paths over a range of batch sizes, and the liveness filter's cost.
fn sweep(vectors: &[f32], dim: usize, queries: &[f32], k: usize, batches: &[usize]) {
    let n = vectors.len() / dim;
    // Up to 512 queries: the 64 given, repeated.
    let many: Vec<f32> = queries.iter().cycle().take(512 * dim).copied().collect();
    eprintln!("| batch | streaming q/s | gemm q/s | streaming q/CPU-s | gemm q/CPU-s |");
    eprintln!("|---:|---:|---:|---:|---:|");
    for &batch in batches {
        assert!(batch <= 512, "sweep batches go up to 512");
        let batch_queries = &many[..batch * dim];
        let mut rates = Vec::new();
        let mut cpu_rates = Vec::new();
        for strategy in [Strategy::Streaming, Strategy::Gemm] {
            // About 40 corpus passes' worth of streaming work, at least two runs.
            let reps = (40 / batch.div_ceil(4)).max(2);
            let cpu_start = cpu_seconds();
            rates.push(queries_per_second(reps, batch, || {
                std::hint::black_box(exact::search_with(
                    vectors,
                    dim,
                    batch_queries,
                    k,
                    None,
                    strategy,
                ));
            }));
            cpu_rates.push((reps * batch) as f64 / (cpu_seconds() - cpu_start));
        }
        eprintln!(
            "| {batch} | {:.1} | {:.1} | {:.1} | {:.1} |",
            rates[0], rates[1], cpu_rates[0], cpu_rates[1]
        );
    }
    // Batch 1 on a single thread: the per-core memory-bandwidth bound (SPEC: ~13M vectors/s).
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let cpu_start = cpu_seconds();
    let single = one_thread.install(|| {
        queries_per_second(20, 1, || {
            std::hint::black_box(exact::search(vectors, dim, &queries[..dim], k, None));
        })
    });
    let single_cpu = 20.0 / (cpu_seconds() - cpu_start);
    eprintln!(
        "batch 1, one thread: {:.1}M vectors/s wall, {:.1}M vectors per CPU-s",
        single * n as f64 / 1e6,
        single_cpu * n as f64 / 1e6
    );
    let prefilter = exact::Int8Prefilter::build(vectors, dim);
    let cpu_start = cpu_seconds();
    let single = one_thread.install(|| {
        queries_per_second(20, 1, || {
            std::hint::black_box(exact::search_prefiltered(
                vectors,
                &prefilter,
                &queries[..dim],
                k,
                None,
            ));
        })
    });
    let single_cpu = 20.0 / (cpu_seconds() - cpu_start);
    eprintln!(
        "batch 1 with int8 prefilter, one thread: {:.1}M vectors/s wall, {:.1}M vectors per CPU-s",
        single * n as f64 / 1e6,
        single_cpu * n as f64 / 1e6
    );
    // Liveness filter: 1% of rows deleted, batch 1.
    let mut live = vec![u64::MAX; n.div_ceil(64)];
    for row in (0..n).step_by(100) {
        live[row / 64] &= !(1 << (row % 64));
    }
    let q = &queries[..dim];
    let without = queries_per_second(20, 1, || {
        std::hint::black_box(exact::search(vectors, dim, q, k, None));
    });
    let with = queries_per_second(20, 1, || {
        std::hint::black_box(exact::search(vectors, dim, q, k, Some(&live)));
    });
    eprintln!(
        "liveness filter (1% deleted), batch 1: {without:.1} q/s without, {with:.1} q/s with"
    );
}

//! HNSW build time, and recall@10 / queries per second at several `ef`, on raw little-endian
//! f32 vector files, printing one JSON object per line (the schema of `bench/hnsw/*.py`).
//!
//! ```text
//! bench_hnsw --base B.f32 --queries Q.f32 --truth T.i32 --dim 384 [--m 16]
//!            [--ef-construction 100] [--build-threads 2] [--search-threads 1]
//!            [--ef 10,16,32,64,128,256] [--n N] [--save graph.hnsw | --load graph.hnsw]
//!            [--rounds 2] [--min-passes 3] [--min-seconds 1]
//! ```
//! `--truth` holds the exact top-100 ids per query (int32); without it, exact search here
//! computes the top 10.

use std::collections::HashMap;
use std::time::Instant;

use zrag_index::exact;
use zrag_index::hnsw::{FlatVectors, Hnsw, HnswParams};

fn read_f32(path: &str) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let bytes = std::fs::read(path)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts: HashMap<String, String> = HashMap::new();
    for pair in args.chunks(2) {
        let key = pair[0].trim_start_matches("--").to_string();
        opts.insert(key, pair.get(1).cloned().unwrap_or_default());
    }
    let get = |k: &str, default: &str| opts.get(k).cloned().unwrap_or_else(|| default.into());
    let dim: usize = get("dim", "384").parse()?;
    let m: usize = get("m", "16").parse()?;
    let ef_construction: usize = get("ef-construction", "100").parse()?;
    let build_threads: usize = get("build-threads", "2").parse()?;
    let search_threads: usize = get("search-threads", "1").parse()?;
    let efs: Vec<usize> = get("ef", "10,16,24,32,48,64,96,128,192,256")
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let mut base = read_f32(&get("base", ""))?;
    if let Some(n) = opts.get("n") {
        base.truncate(n.parse::<usize>()? * dim);
    }
    let queries = read_f32(&get("queries", ""))?;
    let n = base.len() / dim;
    let n_queries = queries.len() / dim;
    let truth: Vec<Vec<u32>> = match opts.get("truth") {
        Some(path) => {
            let ids: Vec<i32> = std::fs::read(path)?
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let per = ids.len() / n_queries;
            ids.chunks_exact(per)
                .map(|c| c[..10].iter().map(|&i| i as u32).collect())
                .collect()
        }
        None => exact::search(&base, dim, &queries, 10, None)
            .into_iter()
            .map(|hits| hits.into_iter().map(|h| h.row).collect())
            .collect(),
    };

    let vectors = FlatVectors::new(&base, dim);
    let params = HnswParams {
        m,
        ef_construction,
        ..HnswParams::default()
    };
    let started = Instant::now();
    let index = match opts.get("load") {
        Some(path) => Hnsw::from_bytes(&std::fs::read(path)?, std::path::Path::new(path))?,
        None => Hnsw::build(&vectors, params, build_threads),
    };
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{{\"engine\": \"zrag\", \"event\": \"build\", \"n\": {n}, \"threads\": {build_threads}, \"seconds\": {seconds:.3}, \"index_bytes\": {}}}",
        index.memory_bytes() + base.len() * 4
    );
    if let Some(path) = opts.get("save") {
        std::fs::write(path, index.to_bytes())?;
    }
    // The protocol of bench/hnsw/common.py: per ef an untimed warm-up pass (which gives the
    // recall), then timed passes until --min-passes and --min-seconds; the ef list round-robin
    // --rounds times; qps from the fastest pass, qps_mean from all.
    let rounds: usize = get("rounds", "2").parse()?;
    let min_passes: usize = get("min-passes", "3").parse()?;
    let min_seconds: f64 = get("min-seconds", "1.0").parse()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(search_threads)
        .build()?;
    let search_all = |ef: usize| -> usize {
        pool.install(|| {
            use rayon::prelude::*;
            queries
                .par_chunks_exact(dim)
                .zip(&truth)
                .map(|(q, expected)| {
                    index
                        .search(&vectors, q, 10, ef)
                        .iter()
                        .filter(|h| expected.contains(&h.row))
                        .count()
                })
                .sum()
        })
    };
    let mut recalls: HashMap<usize, f64> = HashMap::new();
    let mut times: HashMap<usize, Vec<f64>> = HashMap::new();
    for round in 0..rounds.max(1) {
        for &ef in &efs {
            let found = search_all(ef);
            recalls
                .entry(ef)
                .or_insert(found as f64 / (10 * n_queries) as f64);
            let start = Instant::now();
            let mut passes = 0;
            while passes < min_passes || start.elapsed().as_secs_f64() < min_seconds {
                let t = Instant::now();
                std::hint::black_box(search_all(ef));
                times.entry(ef).or_default().push(t.elapsed().as_secs_f64());
                passes += 1;
            }
            let this_round = &times[&ef][times[&ef].len() - passes..];
            let best = this_round.iter().cloned().fold(f64::INFINITY, f64::min);
            eprintln!(
                "zrag round {}/{rounds} ef {ef:>3}: recall@10 {:.4}, {:.0} q/s (best of {passes})",
                round + 1,
                recalls[&ef],
                n_queries as f64 / best
            );
        }
    }
    for &ef in &efs {
        let t = &times[&ef];
        let best = t.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "{{\"engine\": \"zrag\", \"event\": \"search\", \"ef\": {ef}, \"k\": 10, \"recall\": {:.5}, \"qps\": {:.1}, \"qps_mean\": {:.1}, \"passes\": {}, \"threads\": {search_threads}, \"q\": {n_queries}}}",
            recalls[&ef],
            n_queries as f64 / best,
            n_queries as f64 * t.len() as f64 / t.iter().sum::<f64>(),
            t.len()
        );
    }
    Ok(())
}

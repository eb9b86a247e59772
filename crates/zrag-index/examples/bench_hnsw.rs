//! HNSW build time, recall@10 against exact search and queries/s at several `ef`, on the
//! first N rows of a raw little-endian f32 vector file (e.g. a collection segment's
//! `vectors.f32`), with the last Q rows held out as queries.
//!
//! `cargo run --release -p zrag-index --example bench_hnsw -- VECTORS.f32 DIM [N] [Q]`

use std::time::Instant;

use zrag_index::exact;
use zrag_index::hnsw::{Hnsw, HnswParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().ok_or("VECTORS.f32 DIM [N] [Q]")?;
    let dim: usize = args.get(1).ok_or("DIM")?.parse()?;
    let n: usize = args.get(2).map_or(Ok(50_000), |s| s.parse())?;
    let q: usize = args.get(3).map_or(Ok(500), |s| s.parse())?;
    let bytes = std::fs::read(path)?;
    let all: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let rows = all.len() / dim;
    let n = n.min(rows.saturating_sub(q));
    let (base, queries) = (&all[..n * dim], &all[n * dim..(n + q) * dim]);

    let started = Instant::now();
    let index = Hnsw::build(base, dim, HnswParams::default());
    let build_seconds = started.elapsed().as_secs_f64();
    let truth = exact::search(base, dim, queries, 10, None);
    println!("{n} x {dim}, M 16, ef_construction 100: built in {build_seconds:.1} s (1 thread)");
    for ef in [16, 32, 64, 128, 256] {
        let started = Instant::now();
        let mut found = 0;
        for (query, expected) in queries.chunks_exact(dim).zip(&truth) {
            let hits = index.search(query, 10, ef);
            found += hits
                .iter()
                .filter(|h| expected.iter().any(|e| e.row == h.row))
                .count();
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "ef {ef:>3}: recall@10 {:.3}, {:.0} queries/s (1 thread)",
            found as f64 / (10 * q) as f64,
            q as f64 / seconds
        );
    }
    Ok(())
}

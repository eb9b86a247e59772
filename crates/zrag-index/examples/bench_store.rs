//! The two stores side by side on the same synthetic collection: ingest throughput (documents
//! with precomputed 384-d vectors and ~60-word chunks, committed in batches, as `zrag index`
//! does after encoding) and search queries/s (exact dense, HNSW dense with recall@10 against
//! exact, BM25), one query at a time on one thread. Prints one JSON object per measurement.
//!
//! ```text
//! bench_store --pg postgres://.../db [--chunks 100000] [--batch 2000] [--queries 200]
//!             [--stores embedded,postgres] [--dir /tmp/bench-store] [--hnsw on|off]
//! ```
//! Encoding is left out on purpose: it costs the same for both stores (and dominates a real
//! `zrag index`); this measures what the store adds.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use zrag_index::collection::{Collection, EmbeddingInfo, NewChunk, NewDocument};
use zrag_index::store::{ChunkKey, DenseSearch, PgOptions, Store, StoreLocation};

const DIM: usize = 384;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    /// Clustered unit vectors (64 centres plus noise), closer to real embeddings than
    /// uniform noise, on which every graph index looks bad.
    fn vector(&mut self, centres: &[Vec<f32>]) -> Vec<f32> {
        let centre = &centres[(self.next() % centres.len() as u64) as usize];
        let v: Vec<f32> = centre.iter().map(|c| c + 0.35 * self.unit()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect()
    }
    /// A word from a Zipf-like vocabulary of 5000 pseudo-words.
    fn word(&mut self) -> String {
        let r = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let rank = (5000f64.powf(r)) as u64;
        let syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "si", "pe", "du"];
        let mut w = String::new();
        let mut x = rank + 7;
        while x > 0 {
            w.push_str(syllables[(x % 10) as usize]);
            x /= 10;
        }
        w
    }
}

fn documents(n_chunks: usize) -> (Vec<NewDocument>, Vec<Vec<f32>>) {
    let mut rng = Rng(0x5eed);
    let centres: Vec<Vec<f32>> = (0..64)
        .map(|_| (0..DIM).map(|_| rng.unit()).collect())
        .collect();
    let mut docs = Vec::new();
    let mut made = 0;
    while made < n_chunks {
        let chunks = (1 + docs.len() % 3).min(n_chunks - made);
        let i = docs.len();
        docs.push(NewDocument {
            id: format!("doc-{i}"),
            source: format!("corpus/{}/{i}.txt", i % 10),
            title: Some(format!("Document {i}")),
            content_hash: format!("{:016x}", rng.next()),
            metadata: serde_json::Map::new(),
            chunks: (0..chunks)
                .map(|c| {
                    let words: Vec<String> = (0..60).map(|_| rng.word()).collect();
                    NewChunk {
                        chunk_id: format!("doc-{i}#{c}"),
                        ordinal: c as u32,
                        text: words.join(" "),
                        start_byte: 0,
                        end_byte: 0,
                    }
                })
                .collect(),
            vectors: (0..chunks).flat_map(|_| rng.vector(&centres)).collect(),
        });
        made += chunks;
    }
    let queries = (0..1000).map(|_| rng.vector(&centres)).collect();
    (docs, queries)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts: HashMap<String, String> = HashMap::new();
    for pair in args.chunks(2) {
        opts.insert(
            pair[0].trim_start_matches("--").to_string(),
            pair.get(1).cloned().unwrap_or_default(),
        );
    }
    let get = |k: &str, d: &str| opts.get(k).cloned().unwrap_or_else(|| d.to_string());
    let n_chunks: usize = get("chunks", "100000").parse()?;
    let batch: usize = get("batch", "2000").parse()?;
    let n_queries: usize = get("queries", "200").parse()?;
    let dir = std::path::PathBuf::from(get("dir", "/tmp/zrag-bench-store"));
    let stores = get("stores", "embedded,postgres");
    let hnsw = get("hnsw", "on") == "on";
    let pg = get("pg", "");

    let (docs, queries) = documents(n_chunks);
    let queries = &queries[..n_queries.min(queries.len())];
    let model = EmbeddingInfo {
        name: "synthetic-384".into(),
        sha256: "0".repeat(64),
        dim: DIM,
    };
    let mut bm25_queries = Rng(99);
    let bm25_queries: Vec<String> = (0..n_queries)
        .map(|_| {
            (0..3)
                .map(|_| bm25_queries.word())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();

    for name in stores.split(',') {
        let store = match name {
            "embedded" => {
                let _ = std::fs::remove_dir_all(&dir);
                Store::Embedded(Collection::open_or_create(&dir)?)
            }
            "postgres" => {
                if pg.is_empty() {
                    return Err("--pg URL is needed for the postgres store".into());
                }
                Store::open_or_create(&StoreLocation::Postgres(pg.clone()), &PgOptions::default())?
            }
            other => return Err(format!("unknown store {other}").into()),
        };
        let started = Instant::now();
        let mut writer = store.writer()?;
        writer.set_ann_settings(hnsw, 16, 100, 20_000);
        writer.ensure_embedding(&model)?;
        let mut in_batch = 0;
        for doc in &docs {
            in_batch += doc.chunks.len();
            writer.upsert(doc.clone())?;
            if in_batch >= batch {
                // As `zrag index`: frequent commits, the embedded graph updated at the end.
                writer.commit_with(false)?;
                in_batch = 0;
            }
        }
        writer.commit()?;
        drop(writer);
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"store": name, "measure": "ingest", "chunks": n_chunks,
                "documents": docs.len(), "batch_chunks": batch, "seconds": seconds,
                "chunks_per_second": n_chunks as f64 / seconds})
        );

        let snapshot = store.snapshot()?;
        let mut exact_lists = Vec::new();
        for exact in [true, false] {
            let started = Instant::now();
            let mut lists = Vec::new();
            for q in queries {
                let hits = snapshot.search(
                    q,
                    10,
                    DenseSearch {
                        exact,
                        ..DenseSearch::default()
                    },
                )?;
                lists.push(
                    hits[0]
                        .iter()
                        .map(ChunkKey::of)
                        .collect::<BTreeSet<ChunkKey>>(),
                );
            }
            let qps = queries.len() as f64 / started.elapsed().as_secs_f64();
            let recall = if exact {
                exact_lists = lists;
                1.0
            } else {
                let found: usize = lists
                    .iter()
                    .zip(&exact_lists)
                    .map(|(a, e)| a.intersection(e).count())
                    .sum();
                found as f64 / (10 * queries.len()) as f64
            };
            println!(
                "{}",
                serde_json::json!({"store": name, "measure": if exact {"exact"} else {"hnsw"},
                    "chunks": n_chunks, "queries_per_second": qps, "recall_at_10": recall})
            );
        }
        let started = Instant::now();
        let mut found = 0;
        for q in &bm25_queries {
            found += snapshot.bm25_search(q, 10, None)?.len();
        }
        println!(
            "{}",
            serde_json::json!({"store": name, "measure": "bm25", "chunks": n_chunks,
                "queries_per_second": bm25_queries.len() as f64 / started.elapsed().as_secs_f64(),
                "mean_hits": found as f64 / bm25_queries.len() as f64})
        );
    }
    Ok(())
}

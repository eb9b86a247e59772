//! BM25 indexing and query speed, and retrieval quality per analyzer, on a BEIR-style corpus
//! (by default the reverse-dictionary benchmark, `zrag data revdict --out bench-out/revdict`).
//!
//! cargo run --release -p zrag-index --example bench_bm25 -- [DIR] [SPLIT]
//!
//! DIR holds corpus.jsonl (`_id`, `title`, `text`), queries.jsonl and qrels/SPLIT.tsv (default
//! `test`). Each corpus line becomes one chunk, 10,000 rows per segment as the collection
//! would number them; queries run one at a time on one thread, top 100.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use zrag_index::bm25::{Analyzer, Bm25Doc, Bm25Index, ChunkKey};

const ROWS_PER_SEGMENT: usize = 10_000;
const DEPTH: usize = 100;

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::BufReader::new(file)
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect()
}

fn field(value: &serde_json::Value, name: &str) -> String {
    value[name].as_str().unwrap_or_default().to_string()
}

fn key_of(index: usize) -> ChunkKey {
    ChunkKey {
        segment: format!("seg-{:08}", index / ROWS_PER_SEGMENT + 1),
        row: (index % ROWS_PER_SEGMENT) as u32,
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let data = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench-out/revdict"));
    let split = args.get(1).map_or("test", String::as_str);

    let corpus = read_jsonl(&data.join("corpus.jsonl"));
    let ids: Vec<String> = corpus.iter().map(|d| field(d, "_id")).collect();
    let docs: Vec<Bm25Doc> = corpus
        .iter()
        .enumerate()
        .map(|(i, d)| Bm25Doc {
            key: key_of(i),
            title: Some(field(d, "title")).filter(|t| !t.is_empty()),
            text: field(d, "text"),
        })
        .collect();
    let row_of: HashMap<ChunkKey, usize> = (0..docs.len()).map(|i| (key_of(i), i)).collect();
    let bytes: usize = docs
        .iter()
        .map(|d| d.text.len() + d.title.as_ref().map_or(0, String::len))
        .sum();

    let mut qrels: HashMap<String, HashMap<String, f64>> = HashMap::new();
    let qrels_path = data.join("qrels").join(format!("{split}.tsv"));
    let qrels_text = std::fs::read_to_string(&qrels_path)
        .unwrap_or_else(|e| panic!("{}: {e}", qrels_path.display()));
    for line in qrels_text.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let grade: f64 = cols[2].trim().parse().unwrap();
        if grade > 0.0 {
            qrels
                .entry(cols[0].to_string())
                .or_default()
                .insert(cols[1].to_string(), grade);
        }
    }
    let queries: Vec<(String, String)> = read_jsonl(&data.join("queries.jsonl"))
        .iter()
        .map(|q| (field(q, "_id"), field(q, "text")))
        .filter(|(id, _)| qrels.contains_key(id))
        .collect();
    println!(
        "corpus {}: {} chunks, {:.1} MB of text; {} {split} queries",
        data.display(),
        docs.len(),
        bytes as f64 / 1e6,
        queries.len()
    );

    for analyzer in [Analyzer::English, Analyzer::EnglishNoStem] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bm25");
        let mut index = Bm25Index::open_or_create_with(&dir, analyzer).unwrap();
        let start = Instant::now();
        index.rebuild(1, docs.iter().cloned()).unwrap();
        let indexed = start.elapsed().as_secs_f64();
        let start = Instant::now();
        index.close().unwrap();
        let merged = start.elapsed().as_secs_f64();
        let index = Bm25Index::open_or_create_with(&dir, analyzer).unwrap();
        assert_eq!(index.num_docs(), docs.len() as u64);
        println!(
            "\n{analyzer:?}: indexed in {indexed:.2} s ({:.0} chunks/s, commit included), \
             background merges {merged:.2} s more, {:.1} MB on disk",
            docs.len() as f64 / indexed,
            dir_size(&dir) as f64 / 1e6
        );

        for k in [10, DEPTH] {
            let start = Instant::now();
            for (_, text) in &queries {
                std::hint::black_box(index.search(text, k).unwrap());
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "  top-{k}: {:.0} queries/s ({:.3} ms/query, one thread)",
                queries.len() as f64 / secs,
                1e3 * secs / queries.len() as f64
            );
        }

        let (mut ndcg, mut mrr, mut r1, mut r10, mut r100) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (id, text) in &queries {
            let relevant = &qrels[id];
            let ranked: Vec<&str> = index
                .search(text, DEPTH)
                .unwrap()
                .iter()
                .map(|(key, _)| ids[row_of[key]].as_str())
                .collect();
            let grade = |i: usize| relevant.get(ranked[i]).copied().unwrap_or(0.0);
            let dcg: f64 = (0..ranked.len().min(10))
                .map(|i| grade(i) / (i as f64 + 2.0).log2())
                .sum();
            let mut ideal: Vec<f64> = relevant.values().copied().collect();
            ideal.sort_by(|a, b| b.total_cmp(a));
            let idcg: f64 = ideal
                .iter()
                .take(10)
                .enumerate()
                .map(|(i, g)| g / (i as f64 + 2.0).log2())
                .sum();
            ndcg += dcg / idcg;
            if let Some(first) = (0..ranked.len().min(10)).find(|&i| grade(i) > 0.0) {
                mrr += 1.0 / (first as f64 + 1.0);
            }
            let recall = |n: usize| {
                ranked
                    .iter()
                    .take(n)
                    .filter(|d| relevant.contains_key(**d))
                    .count() as f64
                    / relevant.len() as f64
            };
            r1 += recall(1);
            r10 += recall(10);
            r100 += recall(100);
        }
        let n = queries.len() as f64;
        println!(
            "  nDCG@10 {:.4}  MRR@10 {:.4}  recall@1 {:.4}  recall@10 {:.4}  recall@100 {:.4}",
            ndcg / n,
            mrr / n,
            r1 / n,
            r10 / n,
            r100 / n
        );
    }
}
